#!/usr/bin/env python3
"""Summarize a py-spy raw (collapsed-stack) profile as markdown tables.

    hotspots.py profile.txt [--top 25]

Input: `py-spy record --format raw` output, one line per distinct stack:
`frame;frame;...;leaf COUNT`, each frame `function (file:line)`.

Tables (percentages are of all samples; py-spy without --idle only samples a thread that is
running, so this is the share of the process's CPU time):
  - self time by function (the leaf frame), with the hottest lines of each;
  - inclusive time by function (a function counted once per stack it appears in);
  - self time by package (hxgwd / trio / h11 / stdlib module / ...).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def short(path: str) -> str:
    """Shorten a file path to package-relative: .../site-packages/trio/_core/_run.py -> trio/_core/_run.py."""
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    m = re.search(r"/(hxgwd/.*)$", path)
    if m:
        return m.group(1)
    m = re.search(r"/lib/python3\.\d+/(.*)$", path)
    if m:
        return "stdlib/" + m.group(1)
    return path


def package(file: str) -> str:
    if file.startswith("stdlib/"):
        rest = file[len("stdlib/"):]
        return "stdlib " + rest.split("/")[0].removesuffix(".py")
    if file.startswith("<frozen"):
        return "stdlib (frozen)"
    top = file.split("/")[0]
    if top == "hxgwd":
        parts = file.split("/")
        return "/".join(parts[:2]) if len(parts) > 2 else file
    return top.removesuffix(".py")


def parse(path: str):
    stacks = []
    with open(path) as f:
        for raw in f:
            raw = raw.rstrip("\n")
            if not raw:
                continue
            stack, _, count = raw.rpartition(" ")
            frames = []
            for fr in stack.split(";"):
                m = FRAME.match(fr)
                if m:
                    frames.append((m["func"], short(m["file"]), int(m["line"]) if m["line"] else 0))
                else:
                    frames.append((fr, "?", 0))
            stacks.append((frames, int(count)))
    return stacks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()

    stacks = parse(a.profile)
    total = sum(c for _, c in stacks)
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    self_fn: collections.Counter = collections.Counter()
    self_line: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    incl_fn: collections.Counter = collections.Counter()
    self_pkg: collections.Counter = collections.Counter()
    for frames, n in stacks:
        func, file, line = frames[-1]
        key = (func, file)
        self_fn[key] += n
        self_line[key][line] += n
        self_pkg[package(file)] += n
        for k in {(f, fl) for f, fl, _ in frames}:
            incl_fn[k] += n

    pct = lambda n: f"{100.0 * n / total:.1f}"  # noqa: E731
    out = [f"py-spy samples: {total} (`{a.profile}`)\n",
           "### Self time by function (leaf frame)\n",
           "| % | samples | function | file:line (hottest lines, % of all) |", "|---:|---:|---|---|"]
    for (func, file), n in self_fn.most_common(a.top):
        lines = ", ".join(f"{ln} ({pct(c)}%)" for ln, c in self_line[(func, file)].most_common(3))
        out.append(f"| {pct(n)} | {n} | `{func}` | `{file}`: {lines} |")
    out += ["\n### Inclusive time by function (on the stack)\n",
            "| % | samples | function | file |", "|---:|---:|---|---|"]
    for (func, file), n in incl_fn.most_common(a.top + 10):
        out.append(f"| {pct(n)} | {n} | `{func}` | `{file}` |")
    out += ["\n### Self time by package/module\n", "| % | samples | package |", "|---:|---:|---|"]
    for pkg, n in self_pkg.most_common(20):
        out.append(f"| {pct(n)} | {n} | {pkg} |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
