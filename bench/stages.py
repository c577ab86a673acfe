#!/usr/bin/env python3
"""CPU per request by stage of the chat path, from a py-spy raw profile (bench/hotspots.py's input).

    stages.py profile.txt --us-per-request 315

Each sample goes to exactly one stage: walking its stack from the leaf towards the root, the first
(deepest) frame that matches a stage rule below names the stage; a sample that matches none goes
to "trio scheduling" when its leaf is in trio/outcome, else to "pipeline glue". Samples of threads
other than the event loop are one row; idle trio worker threads in their lock wait (which py-spy
samples as running) are left out. Socket syscalls count to the stage that makes them
(answer write = send to the client, upstream = send/receive to the upstream). µs = share of all
samples x the process's CPU µs per request measured without the profiler (utime + stime, /proc).
Also prints, overlapping the stages, the share under trio cancel scopes / fail_* / nurseries.
"""

from __future__ import annotations

import argparse
import re
import sys

sys.path.insert(0, __import__("os").path.dirname(__file__))
from hotspots import _fmt, parse  # noqa: E402

# (stage, regex on "function (file:line)"); the deepest match wins, so order here only breaks ties
# between rules that match the same frame.
STAGES = [
    ("HTTP read/parse (client request: llhttp, head, body)",
     r"^(_next_request|read_body|_take_arrived|_wait_for_first_byte|next_event|_next_piece|_read_loop) \(hxgwd/http/connection"
     r"|\(hxgwd/http/server_llhttp"),
    ("auth", r"^(_authenticate|authenticate) \(hxgwd/pipeline/"),
    ("limit admit/settle", r"\(hxgwd/limits/"),
    ("JSON parse of the request", r"^(_payload|json_document) \(hxgwd/pipeline/"),
    ("routing plan/update", r"\(hxgwd/routing/|^(plan|started|finished|resolve) \(hxgwd/pipeline/route\.py"),
    ("transform (body re-serialisation, headers, usage_from_body)", r"\(hxgwd/pipeline/transform\.py"),
    ("upstream pool: request write + response read/parse", r"\(hxgwd/upstream/|\(hxgwd/http/client"),
    ("answer write (head + body to the client)", r"^_send_whole |^(send|send_full|_write_head) \(hxgwd/http/connection|\(hxgwd/http/protocol\.py"),
    ("journal (usage record hand-off)", r"\(hxgwd/store/"),
    ("access log", r"\(hxgwd/logs\.py|^(log_line|log_fields) \(hxgwd/pipeline/record"),
    ("idle work: the rest of the deferred finish (_finish, _values)", r"\(hxgwd/idle\.py|^(_finish|_values|_cost) \(hxgwd/pipeline/handle"),
]
SYSCALLS = ("_send_now", "_receive_now", "has_pending")   # sockio's send()/recv()/MSG_PEEK, as leaf
SCOPES = r"^(CancelScope\.|__enter__ \(trio|__exit__ \(trio|_close \(trio|fail_(after|at)|move_on_|open_nursery|helper \(stdlib/contextlib|__(enter|exit)__ \(stdlib/contextlib|__aenter__|__aexit__)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("--us-per-request", type=float, required=True)
    a = ap.parse_args()
    stacks = parse(a.profile)
    total = sum(c for _, c in stacks)
    rules = [(label, re.compile(rx)) for label, rx in STAGES]
    counts = {label: 0 for label, _ in STAGES}
    extra = {"trio scheduling (no stage frame; trio/outcome leaf)": 0, "pipeline glue (handle/_api/forward/_attempt own code)": 0,
             "other threads (journal writer: SQLite insert)": 0}
    sysc = dict.fromkeys(list(counts) + list(extra), 0)
    scopes = re.compile(SCOPES)
    in_scopes = 0
    idle = 0
    for frames, n in stacks:
        if frames and frames[-1][0] == "_work" and frames[-1][1] == "trio/_core/_thread_cache.py":
            idle += n     # an idle worker thread in its lock wait: py-spy counts it, the CPU does not
            continue
        if not (frames and frames[0][0] in ("_run_module_as_main", "<module>")):
            extra["other threads (journal writer: SQLite insert)"] += n
            continue
        if any(scopes.search(_fmt(f)) for f in frames[-4:]):
            in_scopes += n
        for f in reversed(frames):
            s = _fmt(f)
            hit = next((label for label, rx in rules if rx.search(s)), None)
            if hit:
                counts[hit] += n
                if frames[-1][1] == "hxgwd/http/sockio.py" and frames[-1][0] in SYSCALLS:
                    sysc[hit] += n
                break
        else:
            leaf = frames[-1][1]
            key = ("trio scheduling (no stage frame; trio/outcome leaf)" if leaf.startswith(("trio/", "outcome/", "<attrs generated methods trio", "sniffio"))
                   else "pipeline glue (handle/_api/forward/_attempt own code)")
            extra[key] += n
    counts.update(extra)
    total -= idle
    print(f"samples {total} (left out: {idle} of idle worker threads waiting for work); {a.us_per_request:.0f} µs CPU/request (unprofiled)\n")
    print("| stage | % of samples | µs CPU / request | of which socket send/recv |\n|---|---:|---:|---:|")
    for label, n in counts.items():
        print(f"| {label} | {100 * n / total:.1f} | {a.us_per_request * n / total:.0f} | {a.us_per_request * sysc[label] / total:.0f} |")
    print(f"| **total** | 100.0 | {a.us_per_request:.0f} | {a.us_per_request * sum(sysc.values()) / total:.0f} |")
    print(f"\noverlapping: a trio cancel-scope / contextlib / nursery frame within the 4 innermost frames: "
          f"{100 * in_scopes / total:.1f}% = {a.us_per_request * in_scopes / total:.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
