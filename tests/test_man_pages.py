"""The man pages: hxgwd(8) (packaging/hxgwd.8, written by hand) and hxgwd.toml(5) (made from
hxgwd.toml.example's comments by docs/build.py). Up to date, rendered by groff without a warning,
and hxgwd(8) naming every command, action, option and endpoint."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hxgwd.cli import build_parser
from hxgwd.pipeline import models_api
from hxgwd.pipeline.endpoints import ENDPOINTS
from tests.test_openapi import load_build

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "packaging" / "hxgwd.8", ROOT / "packaging" / "hxgwd.toml.5"]
needs_groff = pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed (groff-base)")


def rendered(page: Path) -> tuple[str, str]:
    """(plain text, groff's warnings), as man(1) would show it on an 80-column terminal."""
    done = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-rLL=78n", "-P-cbou", str(page)],
                          capture_output=True, text=True, timeout=60, env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_the_toml_page_is_made_from_the_example_and_up_to_date():
    build = load_build()
    assert (ROOT / "packaging" / "hxgwd.toml.5").read_text() == build.toml_man_page(), \
        "packaging/hxgwd.toml.5 is out of date: run python docs/build.py"


@needs_groff
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_render_without_warnings(page):
    text, warnings = rendered(page)
    assert warnings == "" and len(text) > 2000


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[f"{prefix}{name}"] = sub
                out.update(_commands(sub, f"{prefix}{name} "))
    return out


@needs_groff
def test_hxgwd_8_names_every_command_action_and_option():
    text = " ".join(rendered(PAGES[0])[0].split())
    missing = []
    for command, parser in _commands(build_parser()).items():
        if command not in text:
            missing.append(command)
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag not in ("--help", "--config") and flag not in text:
                    missing.append(f"{command} {flag}")
    assert not missing, f"not in packaging/hxgwd.8: {missing}"


@needs_groff
def test_hxgwd_8_names_every_endpoint():
    text = " ".join(rendered(PAGES[0])[0].split())
    missing = []
    for ep in ENDPOINTS:
        if ep.serve in (models_api.not_served, models_api.unknown):
            continue
        path = ep.paths[0].rstrip("/")
        wanted = path.removeprefix("/v1/") if ep.model_from != "none" else path
        if wanted not in text:
            missing.append(f"{ep.name}: {wanted}")
    assert not missing, f"not in packaging/hxgwd.8: {missing}"


@needs_groff
def test_hxgwd_toml_5_documents_every_key_of_the_example():
    text = rendered(PAGES[1])[0]
    keys = re.findall(r"^#?\s?([a-z_][a-z0-9_]*)\s*=", (ROOT / "hxgwd.toml.example").read_text(), re.M)
    missing = sorted({k for k in keys if not re.search(rf"^\s+{k} =", text, re.M)})
    assert not missing, f"not in hxgwd.toml.5: {missing}"
