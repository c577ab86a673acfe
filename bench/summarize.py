#!/usr/bin/env python3
"""Combine the run.py results of one bench/run.sh run into one markdown summary + target check.

    summarize.py OUT_DIR [--rss-kb N] [--rss-start-kb N]

Reads OUT_DIR/{main,stream,delay}.jsonl (the `summary` and `rss` lines written by run.py) and
OUT_DIR/facts.txt, prints markdown: one table of every target x case x mode (medians over rounds),
then the hxgwd targets (issue 15's) with measured value and verdict. A target "versus" another
compares hxgwd's req/s with that target's in the same run (`floor-httptools`: run.sh --floor; the
`hxgwd-<rev>` of run.sh --also-rev); without it in the run, it is "not measured".
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PARTS = ("main", "stream", "delay")

# (description, part, case, mode, field or "versus:TARGET" (hxgwd's req/s / TARGET's), op, threshold, format);
# TARGET "hxgwd-*": the first target of that prefix (run.sh --also-rev names it hxgwd-<short rev>)
TARGETS = [
    ("chat, 64 conns: share of the bare trio+httptools pass-through's req/s", "main", "chat", "tput",
     "versus:floor-httptools", ">=", 0.35, "{:.1%}"),
    ("added p50 latency at 1 conn (chat, static upstream)", "main", "chat", "lat", "p50_add_ms", "<=", 0.15, "{:+.3f} ms"),
    ("streamed chat (20 events), 64 conns: req/s against the --also-rev build", "stream", "chat_stream", "tput",
     "versus:hxgwd-*", ">=", 2.0, "x{:.2f}"),
    ("50 ms upstream, chat, 64 conns: share of direct req/s", "delay", "chat", "tput", "rps_ratio", ">=", 0.99, "{:.1%}"),
]


def measured(rows: list[dict], case: str, mode: str, field: str) -> float | None:
    def row(target: str) -> dict | None:
        return next((r for r in rows if (r["target"] == target or target.endswith("*") and r["target"].startswith(
            target[:-1]) and r["target"] != "hxgwd") and r["case"] == case and r["mode"] == mode), None)
    s = row("hxgwd")
    if s is None:
        return None
    if not field.startswith("versus:"):
        return s.get(field)
    other = row(field.split(":", 1)[1])
    return None if other is None or not other["rps"] else s["rps"] / other["rps"]


def load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def fmt_num(v, spec: str, dash: str = "-") -> str:
    return dash if v is None else spec.format(v)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rss-kb", type=int, help="hxgwd VmRSS after the runs")
    ap.add_argument("--rss-start-kb", type=int, help="hxgwd VmRSS after start")
    a = ap.parse_args()

    rows: dict[str, list[dict]] = {}
    rss: dict[str, dict] = {}
    for part in PARTS:
        recs = load(os.path.join(a.out, f"{part}.jsonl"))
        rows[part] = [r for r in recs if r.get("type") == "summary"]
        for r in recs:
            if r.get("type") == "rss":
                rss[r["target"]] = r
    lines = []
    facts = os.path.join(a.out, "facts.txt")
    if os.path.exists(facts):
        lines += ["```", open(facts).read().rstrip(), "```", ""]
    lines += ["| part | case | conns | target | RPS | p50 ms | p99 ms | added p50 | added p99 | RPS vs direct "
              "| srv CPU µs/req | errors | n |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for part in PARTS:
        for s in rows[part]:
            add50 = fmt_num(s.get("p50_add_ms"), "{:+.3f} ms")
            add99 = fmt_num(s.get("p99_add_ms"), "{:+.3f} ms")
            ratio = fmt_num(s.get("rps_ratio"), "x{:.3f}")
            cpu = fmt_num(s.get("server_cpu_us_per_req"), "{:,.0f}")
            lines.append(f"| {part} | {s['case']} | {s['conns']} | {s['target']} | {s['rps']:,.0f} | "
                         f"{s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {add50} | {add99} | {ratio} | {cpu} | "
                         f"{s['errors']} | {s['n']} |")
    if rss:
        lines += ["", "RSS after each part (run.py, whole process tree): " + ", ".join(
            f"{t} {r['rss_mib']} MiB" for t, r in rss.items())]

    lines += ["", "### hxgwd targets", "", "| target | wanted | measured | met? |", "|---|---|---|---|"]
    ok_all = True
    for desc, part, case, mode, field, op, thr, spec in TARGETS:
        v = measured(rows.get(part, []), case, mode, field)
        if v is None:
            lines.append(f"| {desc} | {op} {thr} | not measured | - |")
            continue
        met = v >= thr if op == ">=" else v <= thr
        ok_all &= met
        lines.append(f"| {desc} | {op} {spec.format(thr)} | {spec.format(v)} | {'yes' if met else '**no**'} |")
    if a.rss_kb:
        mib = a.rss_kb / 1024
        met = mib < 60
        ok_all &= met
        start = f" (after start {a.rss_start_kb / 1024:.1f} MiB)" if a.rss_start_kb else ""
        lines.append(f"| hxgwd RSS after the runs | < 60 MiB | {mib:.1f} MiB{start} | {'yes' if met else '**no**'} |")
    lines += ["", f"All targets met: {'yes' if ok_all else 'no'}"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
