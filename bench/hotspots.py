#!/usr/bin/env python3
"""Summarize a py-spy raw (collapsed-stack) profile as markdown tables.

    hotspots.py profile.txt [--top 25] [--group LABEL=REGEX ...] [--hxgwd-groups]

Input: `py-spy record --format raw` output, one line per distinct stack:
`frame;frame;...;leaf COUNT`, each frame `function (file:line)`.

Tables (percentages are of all samples; py-spy without --idle only samples a thread that is
running, so this is the share of the process's CPU time):
  - self time by function (the leaf frame), with the hottest lines of each;
  - inclusive time by function (a function counted once per stack it appears in);
  - self time by package (hxgwd / trio / h11 / stdlib module / ...);
  - with --group / --hxgwd-groups: share of samples whose stack holds a frame matching REGEX
    (matched against "function (file:line)"), or, for a LABEL starting with "self:", whose leaf does.
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


# Cost centres of hxgwd's request path (checked against hxgwd at the time of writing; a renamed
# function silently drops out, so read a 0 % with care).
HXGWD_GROUPS = [
    ("parse the client request (h11 server side)", r"^(ServerConn\.next|HttpConnection\._next_request) "),
    ("read the request body", r"^Request\.read_body "),
    ("authenticate", r"^Gateway\._authenticate "),
    ("JSON parse of the request (_payload)", r"^_payload "),
    ("route: resolve + plan", r"^(resolve|Router\.plan) "),
    ("routing bookkeeping (router.started/finished)", r"^Router\.(started|finished) "),
    ("limits (admit/settle)", r"hxgwd/limits/"),
    ("transform: plan_chat/json/embeddings (JSON re-encode of the body)", r"^plan_(chat|json|embeddings) "),
    ("upstream exchange (Pool.request: h11 client, send, wait for head)", r"^Pool\.request "),
    ("read upstream body (answers.read)", r"^read \(hxgwd/pipeline/answers"),
    ("usage_from_body", r"^usage_from_body "),
    ("send the answer to the client (_send_whole)", r"^_send_whole "),
    ("access log (Gateway._record)", r"^Gateway\._record "),
    ("per-connection reader task (_read_loop)", r"^HttpConnection\._read_loop "),
    ("trio.fail_after / fail_at (contextlib-based)", r"^fail_(after|at) \(.*trio/_timeouts"),
    ("trio CancelScope enter+exit (all timeouts/scopes)", r"^CancelScope\.(__enter__|__exit__) "),
    ("self: socket syscalls (send/recv in trio _nonblocking_helper)", r"^_SocketType\._nonblocking_helper .*:10(49|50|51|55)\)"),
    ("self: h11", r"\(.*h11/"),
    ("self: trio scheduler loop (unrolled_run, epoll, reschedule)", r"^(unrolled_run|EpollIOManager\.\w+|Runner\.reschedule) "),
]


def grouped(stacks, total, groups):
    out = []
    for label, rx in groups:
        pat = re.compile(rx)
        if label.startswith("self:"):
            n = sum(c for frames, c in stacks if pat.search(_fmt(frames[-1])))
        else:
            n = sum(c for frames, c in stacks if any(pat.search(_fmt(f)) for f in frames))
        out.append((label, n, 100.0 * n / total))
    return out


def _fmt(frame) -> str:
    func, file, line = frame
    return f"{func} ({file}:{line})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--group", action="append", default=[], metavar="LABEL=REGEX")
    ap.add_argument("--hxgwd-groups", action="store_true", help="the cost centres of hxgwd's request path")
    ap.add_argument("--main-thread", action="store_true",
                    help="only stacks of the main thread (rooted in runpy/__main__): the event loop")
    a = ap.parse_args()

    stacks = parse(a.profile)
    everything = sum(c for _, c in stacks)
    main_thread = [(f, c) for f, c in stacks if f and f[0][0] in ("_run_module_as_main", "<module>")]
    n_main = sum(c for _, c in main_thread)
    if a.main_thread:
        stacks = main_thread
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
    out = [f"py-spy samples: {everything} (`{a.profile}`); main thread (event loop) {n_main} "
           f"({100.0 * n_main / everything:.1f}%), other threads {everything - n_main}"
           + ("; **percentages below are of the main thread's samples**" if a.main_thread else
              "; percentages below are of all samples") + "\n",
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
    groups = [tuple(g.split("=", 1)) for g in a.group] + (HXGWD_GROUPS if a.hxgwd_groups else [])
    if groups:
        out += ["\n### Cost centres (share of samples with a matching frame on the stack; they overlap)\n",
                "| % | samples | what |", "|---:|---:|---|"]
        for label, n, p in grouped(stacks, total, groups):
            out.append(f"| {p:.1f} | {n} | {label} |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
