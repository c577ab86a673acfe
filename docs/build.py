"""Makes the generated documents from their sources, or checks that they are up to date.

    docs/openapi.yaml     -> hxgwd/openapi.json         (package data, served at GET /openapi.json)
    hxgwd.toml.example    -> packaging/hxgwd.toml.5     (the hxgwd.toml(5) man page)

    python docs/build.py            write both
    python docs/build.py --check    exit 1, naming them, if either is not what its source makes

The YAML is turned into JSON here, at build time, so the daemon needs no YAML parser: it serves
the JSON file's bytes. Needs PyYAML (the `test` extra). tests/test_openapi.py and
tests/test_man_pages.py run the check.

The man page is rendered from the example file's own comments, so the two cannot disagree. The
conventions the example follows (and this script reads):

- the comment block before the first section is the page's DESCRIPTION; a block before a section
  is that section's introduction; one between keys goes before the next key;
- `key = value   # comment` documents a key, and comment lines indented below the comment (a line
  that starts with blanks, then `#`) continue it; `# key = value   # comment`, commented out,
  documents a key that is unset in the example;
- a section header seen before (`[[models]]` again), or a commented-out one (`# [[backends]]`), goes
  on documenting that section: keys already documented are not repeated, and the comment block
  before it (about the example itself) is left out;
- a comment line with four or more blanks after the `#` is shown as is (a command, a snippet).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OPENAPI_YAML = ROOT / "docs" / "openapi.yaml"
OPENAPI_JSON = ROOT / "hxgwd" / "openapi.json"
EXAMPLE = ROOT / "hxgwd.toml.example"
TOML_MAN = ROOT / "packaging" / "hxgwd.toml.5"


def version() -> str:
    text = (ROOT / "hxgwd" / "__init__.py").read_text()
    found = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.M)
    assert found, "hxgwd/__init__.py: no __version__"
    return found.group(1)


# --- OpenAPI ------------------------------------------------------------------------------------

def openapi_document() -> dict[str, Any]:
    import yaml

    doc: dict[str, Any] = yaml.safe_load(OPENAPI_YAML.read_text())
    doc["info"]["version"] = version()
    return doc


def openapi_json() -> str:
    # compact but one key per line would be larger; sorted keys are not wanted (path order is the
    # reading order): dumped as loaded, small, with a final newline
    return json.dumps(openapi_document(), ensure_ascii=False, separators=(",", ":")) + "\n"


# --- hxgwd.toml(5) ------------------------------------------------------------------------------

SECTION = re.compile(r"^(#\s?)?(\[\[?)([A-Za-z0-9_.-]+)(\]\]?)\s*(?:#\s?(.*))?$")
KEY = re.compile(r"^(#\s?)?([a-z_][a-z0-9_]*)\s*=\s*(.*)$")
CONTINUATION = re.compile(r"^\s+#\s?(.*)$")
LITERAL = re.compile(r"^#(\s{4,}.*)$")


def _split_comment(rest: str) -> tuple[str, str | None]:
    """`value   # comment` -> (value, comment): the first # outside a string."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            if ch == "\\" and quote == '"':
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return rest[:i].rstrip(), rest[i + 1:].strip()
    return rest.rstrip(), None


class _Section:
    def __init__(self, header: str, note: str | None) -> None:
        self.header = header
        self.intro: list[str] = []       # prose lines ("" between paragraphs); literal lines start with "\0"
        self.note = note
        self.keys: list[dict[str, Any]] = []
        self.names: set[str] = set()


def parse_example(text: str) -> tuple[list[str], list[_Section]]:
    """-> (the header's lines, the sections in file order, repeated ones merged)."""
    header: list[str] = []
    sections: list[_Section] = []
    by_header: dict[str, _Section] = {}
    current: _Section | None = None
    pending: list[str] = []      # prose waiting for the next key or section
    last_key: dict[str, Any] | None = None

    def prose(line: str) -> None:
        lit = LITERAL.match(line)
        pending.append("\0" + lit.group(1)[4:] if lit else line[1:].strip())

    for raw in text.splitlines():
        line = raw.rstrip()
        if not line.strip():
            if current is None and pending:
                header.extend(pending + [""])
                pending.clear()
            elif pending and pending[-1] != "":
                pending.append("")
            last_key = None
            continue
        if (cont := CONTINUATION.match(line)) and last_key is not None:
            last_key["doc"].append(cont.group(1))
            continue
        if sec := SECTION.match(line):
            commented, opening, name, _closing, note = sec.groups()
            head, _, sub = name.partition(".")
            shown = f"{opening}{head}{'.NAME' if sub else ''}{opening.replace('[', ']')}"
            if current is None and pending:
                header.extend(pending)
                pending.clear()
            if current is None and header and header[0].startswith("hxgwd.toml:"):
                del header[:header.index("") + 1 if "" in header else len(header)]   # the file's title
            current = by_header.get(shown)
            if current is None:
                current = by_header[shown] = _Section(shown, note)
                sections.append(current)
                current.intro.extend(_trimmed(pending))
            pending.clear()
            last_key = None
            continue
        if (key := KEY.match(line)) and current is not None:
            commented, name, rest = key.groups()
            value, comment = _split_comment(rest)
            if name in current.names:        # a repeat ([[models]] again): documented once
                if comment:
                    raise ValueError(f"hxgwd.toml.example: {current.header} {name} is documented twice")
                pending.clear()
                last_key = None
                continue
            current.names.add(name)
            last_key = {"name": name, "value": value, "set": not commented, "before": _trimmed(pending),
                        "doc": [comment] if comment else []}
            current.keys.append(last_key)
            pending.clear()
            continue
        if line.startswith("#"):
            prose(line)
            last_key = None
            continue
        raise ValueError(f"hxgwd.toml.example: cannot read this line for the man page: {line!r}")
    return _trimmed(header), sections


def _trimmed(lines: list[str]) -> list[str]:
    lines = list(lines)
    while lines and lines[-1] == "":
        lines.pop()
    while lines and lines[0] == "":
        lines.pop(0)
    return lines


_ESCAPES = str.maketrans({"\\": "\\e", "-": "\\-"})


def roff(text: str) -> str:
    """Plain text -> roff text: backslashes and hyphens escaped, `code` in bold, a leading . or '
    protected."""
    out = []
    for i, part in enumerate(text.split("`")):
        part = part.translate(_ESCAPES)
        out.append(f"\\fB{part}\\fR" if i % 2 else part)
    line = "".join(out)
    return "\\&" + line if line[:1] in (".", "'") else line


def _paragraphs(lines: list[str]) -> list[str]:
    """Prose lines -> roff lines: paragraphs filled, literal lines in a no-fill block."""
    out: list[str] = []
    in_literal = False
    for line in lines:
        if line.startswith("\0"):
            if not in_literal:
                out += [".PP" if out else ".PP", ".RS", ".nf"]
                in_literal = True
            out.append(roff(line[1:]) or "\\&")
            continue
        if in_literal:
            out += [".fi", ".RE"]
            in_literal = False
            if line:
                out.append(".PP")
        if line == "":
            if out and out[-1] != ".PP":
                out.append(".PP")
            continue
        out.append(roff(line))
    if in_literal:
        out += [".fi", ".RE"]
    if out and out[0] != ".PP":
        out.insert(0, ".PP")
    return out


def toml_man_page() -> str:
    header, sections = parse_example(EXAMPLE.read_text())
    ver = version()
    lines = [
        '.\\" hxgwd.toml(5): generated by docs/build.py from hxgwd.toml.example. Do not edit: edit the',
        '.\\" example\'s comments and run python docs/build.py.',
        f'.TH HXGWD.TOML 5 "" "hxgwd {ver}" "File Formats"',
        ".nh",
        ".SH NAME",
        "hxgwd.toml \\- configuration file of the hxgwd gateway daemon",
        ".SH SYNOPSIS",
        ".I /etc/hxgwd/hxgwd.toml",
        ".SH DESCRIPTION",
        "The configuration of",
        ".BR hxgwd (8)",
        "is one TOML file: the one given with",
        ".BR \\-c ,",
        "else the one named by",
        ".BR HXGWD_CONFIG ,",
        "else",
        ".IR /etc/hxgwd/hxgwd.toml .",
        "This page documents every key, section by section, as the annotated example",
        ".I hxgwd.toml.example",
        "does (this page is made from its comments).",
        "Each key is shown with the value the example gives it; most are the defaults, and",
        ".B hxgwd \\-\\-print\\-config",
        "shows the defaults in effect.",
        "Keys shown commented out are unset in the example.",
        *_paragraphs(header),
    ]
    for sec in sections:
        lines.append(f".SH {roff(sec.header)}")
        if sec.note:
            lines += [".PP", roff(sec.note[:1].upper() + sec.note[1:] + ("" if sec.note.endswith(".") else "."))]
        lines += _paragraphs(sec.intro)
        for key in sec.keys:
            if key["before"]:
                lines += _paragraphs(key["before"])
            name, value = f"\\fB{roff(key['name'])}\\fR", "\\%" + roff(key["value"])
            unset = "" if key["set"] else " (unset)"
            doc = roff(" ".join(key["doc"]).strip())
            if len(key["name"]) + len(key["value"]) > 50:     # a long value goes below its key
                lines += [".TP", f"{name} =", ".TQ", f"{value}{unset}", doc or "\\&"]
            else:
                lines += [".TP", f"{name} = {value}{unset}", doc or "\\&"]
    lines += [
        ".SH FILES",
        ".TP",
        ".I /etc/hxgwd/hxgwd.toml",
        "The configuration of the packaged daemon, mode 0640, owner root, group hxgwd.",
        ".TP",
        ".I /usr/share/doc/hxgwd",
        "The package's documentation.",
        ".SH SEE ALSO",
        ".BR hxgwd (8)",
    ]
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------

def outputs() -> dict[Path, str]:
    return {OPENAPI_JSON: openapi_json(), TOML_MAN: toml_man_page()}


def stale() -> list[Path]:
    return [path for path, text in outputs().items() if not path.exists() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    if args.check:
        old = stale()
        for path in old:
            print(f"{path.relative_to(ROOT)} is out of date: run python docs/build.py", file=sys.stderr)
        return 1 if old else 0
    for path, text in outputs().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
