"""docs/runbook.md names only things that exist: every alert of packaging/hxgwd-alerts.yml has its
section and every alert it names is a rule; every metric it names is in a real `/metrics` scrape;
every log event and message is written by the code; every `hxgwd ...` command line of its ```sh
blocks is accepted by the real parser; every path it curls is served; every `[table] key` is a
config key; its sqlite3 SQL runs on the real schema. The markup it follows is stated in its
first lines."""

from __future__ import annotations

import glob
import os
import re
import shlex
import sqlite3
import textwrap
import typing

import attrs
import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from hxgwd.cli import build_parser
from hxgwd.config import model as config_model
from hxgwd.events import BREAKER_EVENTS
from hxgwd.pipeline.endpoints import ENDPOINTS
from tests.conftest import DEV_KEY, ROOT, gateway_config, start_gateway
from tests.test_tls_server import client_context, make_cert

RUNBOOK = os.path.join(ROOT, "docs", "runbook.md")
RULES = os.path.join(ROOT, "packaging", "hxgwd-alerts.yml")
WORKER_METRICS = {"hxgwd_workers", "hxgwd_worker_restarts_total"}
METRIC = re.compile(r"(?<![\w/.-])((?:hxgwd|gen_ai)_[a-z][a-z0-9_]*)(?![\w(])")
ALTERNATIVES = re.compile(r"((?:hxgwd|gen_ai)_[a-z0-9_]*)\(([a-z0-9_|]+)\)")
PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*>")


def runbook() -> str:
    with open(RUNBOOK, encoding="utf-8") as f:
        return f.read()


def blocks(text: str, lang: str) -> list[str]:
    return [textwrap.dedent(b) for b in re.findall(rf"^ *```{lang}\n(.*?)^ *```", text, re.S | re.M)]


def sh_lines(text: str) -> list[str]:
    lines = []
    for block in blocks(text, "sh"):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def hxgwd_invocations(line: str) -> list[list[str]]:
    """The argument lists of `hxgwd` run by a shell line: as the command of a pipeline segment,
    or after `runuser ... --` / `sudo`."""
    line = PLACEHOLDER.sub("1", line)            # <KEY_NAME> is not a redirection here; <RPM> a number
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set("|&;()<>"):
            segments.append([])
        else:
            segments[-1].append(token)
    found = []
    for words in segments:
        for i, word in enumerate(words):
            if os.path.basename(word) == "hxgwd" and (i == 0 or words[i - 1] in ("--", "sudo")):
                found.append(words[i + 1:])
                break
    return found


def source_text() -> str:
    parts = []
    for path in glob.glob(os.path.join(ROOT, "hxgwd", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)


def test_runbook_states_its_markup_and_every_section_has_symptoms_confirm_act():
    text = runbook()
    assert "Markup (checked by `tests/test_runbook.py`)" in text.split("\n## ", 1)[0]
    for section in re.split(r"^## ", text, flags=re.M)[2:]:      # after the intro and "Before you start"
        title = section.splitlines()[0]
        assert "**Symptoms.**" in section, title
        assert "**Confirm" in section or "**Before.**" in section, title
        assert re.search(r"\*\*(Confirm / )?Act", section) or "**Roll back.**" in section, title


def test_every_alert_has_a_section_and_every_alert_named_is_a_rule():
    with open(RULES, encoding="utf-8") as f:
        rules = set(re.findall(r"- alert: (\w+)", f.read()))
    text = runbook()
    sections = set(re.findall(r"^## Alert: (\w+)$", text, re.M))
    assert rules and sections == rules
    assert set(re.findall(r"\b(Hxgwd[A-Z]\w+)", text)) <= rules


def test_every_log_event_and_message_named_is_written_by_the_code():
    code = source_text()
    events = set(re.findall(r'event="([a-z_]+)"', code)) | {name for name, _, _ in BREAKER_EVENTS.values()}
    text = runbook()
    named = set(re.findall(r"event=([a-z_]+)", text)) | set(re.findall(r'\.event [!=]= "([a-z_]+)"', text))
    assert len(named) >= 12
    assert sorted(named - events) == []
    messages = [" ".join(m.split()) for m in re.findall(r'msg="([^"]+)"', text)]
    flat = " ".join(code.split())
    assert messages and [m for m in messages if m not in flat] == []


def test_every_hxgwd_command_line_is_accepted_by_the_parser():
    parser = build_parser()
    invocations = [args for line in sh_lines(runbook()) for args in hxgwd_invocations(line)]
    assert len(invocations) >= 15
    for args in invocations:
        try:
            parser.parse_args(args)
        except SystemExit as exc:       # argparse's way of saying no
            raise AssertionError(f"hxgwd {' '.join(args)}: not accepted") from exc
    # and the subcommands the runbook relies on are all there
    used = {" ".join(a[:2]) for a in invocations if a and not a[0].startswith("-")}
    assert {"keys revoke", "keys list", "keys show", "keys create", "db status", "db migrate"} <= used


def test_every_path_curled_is_served():
    served = [p for ep in ENDPOINTS for p in ep.paths]
    paths = set()
    for line in sh_lines(runbook()):
        paths |= set(re.findall(r"\$HX(/[A-Za-z0-9_./-]*)", line))
    paths |= set(re.findall(r"`(/(?:admin/[a-z/]+|metrics|healthz|readyz|openapi\.json))`", runbook()))
    assert {"/metrics", "/admin/routing", "/admin/stats", "/healthz", "/readyz"} <= paths
    for path in paths:
        assert path in served or any(p.endswith("/") and path.startswith(p) and p != "/admin/" for p in served), path


def _table_class(table: str, double: bool) -> type:
    hints = typing.get_type_hints(config_model.Config)
    assert table in hints, f"[{table}] is not a config table"
    kind = hints[table]
    if typing.get_origin(kind) is tuple:
        assert double, f"[[{table}]] is an array of tables"
        return typing.get_args(kind)[0]
    assert not double, f"[{table}] is a table, not an array"
    return kind


def test_every_config_key_named_exists():
    named = re.findall(r"`(\[\[?)([a-z]+)\]\]? ([a-z_]+)", runbook())
    assert len(named) >= 15
    for brackets, table, key in named:
        if (table, key) == ("table", "key"):      # the markup line's own example
            continue
        cls = _table_class(table, brackets == "[[")
        assert key in attrs.fields_dict(cls), f"[{table}] {key}"


async def test_every_metric_named_is_scraped_and_the_sqlite_queries_run(nursery, tmp_path):
    """A gateway with a database, Redis (unreachable: its gauge is exported all the same), TLS, a
    dead backend (breakers, pools, failures) and a live one with prices (tokens, cost)."""
    cert, key = make_cert(tmp_path, "gw", days=30)
    text = gateway_config("""
        [redis]
        url = "redis://127.0.0.1:1/0"
        [[backends]]
        name = "dead"
        url = "http://127.0.0.1:1/v1"
        max_connections = 4
        [[backends]]
        name = "live"
        kind = "echo"
        max_connections = 4
        [[models]]
        name = "m"
        backend = "dead"
        max_concurrency = 8
        [[models]]
        name = "m"
        backend = "live"
        input_cost_per_1k = 1.0
        output_cost_per_1k = 1.0
        max_concurrency = 8
    """, database=f"sqlite:///{tmp_path}/usage.db").replace(
        "[database]\n", f'[database]\nspool_dir = "{tmp_path}/spool"\n', 1).replace(
        "[server]\n", f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n', 1).replace(
        "sha256 = ", "admin = true\nrpm = 1000\nsha256 = ", 1)
    gw = await start_gateway(nursery, text)
    auth = {"Authorization": f"Bearer {DEV_KEY}"}
    async with httpx.AsyncClient(base_url=gw.url.replace("http:", "https:"), verify=client_context(cert),
                                 timeout=30) as client:
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        for body in (chat, {**chat, "stream": True}, chat, chat):
            assert (await client.post("/v1/chat/completions", json=body, headers=auth)).status_code == 200
        await trio.sleep(0.3)       # the records are observed in idle work
        r = await client.get("/metrics", headers=auth)
    assert r.status_code == 200
    families = list(text_string_to_metric_families(r.text))
    samples = [s for fam in families for s in fam.samples]
    scraped = {s.name for s in samples} | {fam.name for fam in families}
    labels = {name for s in samples for name in s.labels}       # gen_ai_token_type is a label
    text = runbook()
    for prefix, alternatives in ALTERNATIVES.findall(text):     # grep -E 'hxgwd_usage_(a|b)'
        text += " " + " ".join(prefix + a for a in alternatives.split("|"))
    named = set(METRIC.findall(text)) - labels
    assert len(named) >= 25
    # a single process has no workers: tests/test_workers.py scrapes these from a supervisor's
    assert sorted(named - scraped - WORKER_METRICS) == []
    # the runbook's sqlite3 queries, on the database that gateway made (placeholders as strings)
    queries = [b for b in blocks(runbook(), "sql") if b.startswith("-- sqlite3")]
    assert len(queries) >= 2
    with sqlite3.connect(f"{tmp_path}/usage.db") as db:
        for query in queries:
            db.execute(PLACEHOLDER.sub("1", query)).fetchall()
    assert all(b.startswith(("-- sqlite3", "-- psql")) for b in blocks(runbook(), "sql"))
