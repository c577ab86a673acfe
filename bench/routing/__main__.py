"""Routing benchmark: replay each scenario's requests through each strategy of the real Router.

    .venv/bin/python -m bench.routing                 # all scenarios, 3 seeds, prints the table
    .venv/bin/python -m bench.routing --write         # ... and writes bench/routing/RESULTS.md
    .venv/bin/python -m bench.routing --seeds 1 --only failure-burst --why

Completion time is from a request's arrival to its successful answer, every attempt included;
mean and p99 are over the requests that succeeded; "lost" are those that did not (all attempts
failed, a stream was cut after its first byte, the deadline passed, or no deployment was usable).
Requests of all seeds are pooled. The config each run uses is real TOML compiled by
`hxgwd.runtime.compile_config`, with the default [routing] section (3 attempts, breaker 5 / 50%).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import time

from bench.routing.scenarios import SCENARIOS, Scenario, workload
from bench.routing.sim import Result, run
from hxgwd.config import load
from hxgwd.pipeline.route import Router
from hxgwd.runtime import compile_config

STRATEGIES = ("scored", "least-latency", "least-busy", "weighted", "priority")
RIVALS = ("least-latency", "least-busy", "weighted")


def config_text(scenario: Scenario, strategy: str) -> str:
    lines = ['[database]', 'url = ""']
    ups = scenario.upstreams()
    for u in ups:
        lines += ["[[backends]]", f'name = "{u.name}"', 'url = "http://127.0.0.1:9/v1"']
    for u in ups:
        lines += ["[[models]]", f'name = "{u.name}"', f'backend = "{u.name}"', f"weight = {u.weight}",
                  f"max_concurrency = {u.max_concurrency}", f"max_queue = {u.max_queue}",
                  f"queue_timeout = {u.queue_timeout}", f"input_cost_per_1k = {u.input_cost_per_1k}",
                  f"output_cost_per_1k = {u.output_cost_per_1k}"]
    names = ", ".join(f'"{u.name}"' for u in ups)
    lines += ["[groups.g]", f"models = [{names}]", f'strategy = "{strategy}"']
    return "\n".join(lines) + "\n"


def replay(scenario: Scenario, strategy: str, seed: int) -> list[Result]:
    runtime = compile_config(load.loads(config_text(scenario, strategy)), 1, environ={})
    router = Router(rng=random.Random(seed), settings=runtime.config.routing)
    requests = workload(scenario.rate, scenario.seconds, seed)
    return run(router, runtime.targets["g"], scenario.upstreams(), requests, scenario.timeouts,
               runtime.config.routing.max_attempts, seed)


def _replay(run: tuple[str, str, int]) -> list[Result]:
    name, strategy, seed = run
    return replay(next(s for s in SCENARIOS if s.name == name), strategy, seed)


def summarize(results: list[Result]) -> tuple[float, float, float]:
    times = sorted(r.done - r.arrival for r in results if r.done is not None)
    lost = sum(1 for r in results if r.done is None)
    mean = sum(times) / len(times) if times else float("nan")
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))] if times else float("nan")
    return mean, p99, lost / len(results) if results else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.routing")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", action="append", help="scenario name (repeatable)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (results do not depend on it)")
    ap.add_argument("--why", action="store_true", help="count lost requests by cause")
    ap.add_argument("--write", action="store_true", help="write bench/routing/RESULTS.md")
    args = ap.parse_args(argv)
    began = time.perf_counter()
    rows, verdicts = [], []
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    runs = [(s.name, strategy, seed) for s in chosen for strategy in STRATEGIES
            for seed in range(1, args.seeds + 1)]
    with multiprocessing.Pool(max(1, args.jobs)) as pool:
        done = dict(zip(runs, pool.map(_replay, runs)))
    for scenario in chosen:
        stats = {}
        for strategy in STRATEGIES:
            pooled: list[Result] = []
            for seed in range(1, args.seeds + 1):
                pooled += done[(scenario.name, strategy, seed)]
            stats[strategy] = summarize(pooled) + (len(pooled),)
            mean, p99, lost, n = stats[strategy]
            rows.append((scenario.name, strategy, mean, p99, lost, n))
            why: dict[str, int] = {}
            for r in pooled:
                if r.why:
                    why[r.why] = why.get(r.why, 0) + 1
            print(f"{scenario.name:14} {strategy:14} mean {mean:7.2f} s   p99 {p99:7.2f} s   "
                  f"lost {lost * 100:6.2f} %   ({n} requests) {why if args.why else ''}", flush=True)
        s = stats["scored"]
        beaten = [r for r in RIVALS if not (s[0] < stats[r][0] and s[1] < stats[r][1])]
        verdicts.append((scenario.name, beaten, s[2]))
    elapsed = time.perf_counter() - began
    print()
    ok = True
    for name, beaten, lost in verdicts:
        fine = not beaten and (name != "failure-burst" or lost < 0.005)
        ok &= fine
        print(f"{name:14} scored beats {', '.join(RIVALS)} on mean and p99: "
              f"{'yes' if not beaten else 'NO (' + ', '.join(beaten) + ')'}"
              + (f"; lost {lost * 100:.2f} % (< 0.5 %: {'yes' if lost < 0.005 else 'NO'})"
                 if name == "failure-burst" else ""))
    print(f"\n{elapsed:.1f} s")
    if args.write:
        write_results(rows, verdicts, args.seeds, elapsed)
    return 0 if ok else 1


def write_results(rows, verdicts, seeds: int, elapsed: float) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    out = ["# Routing benchmark results", "",
           "Produced by:", "", "    .venv/bin/python -m bench.routing --write", "",
           f"{seeds} seeds per scenario and strategy, requests pooled; virtual time, "
           f"{elapsed:.0f} s of wall time. Completion time runs from arrival to the successful "
           "answer, failovers included; mean and p99 are over successful requests; lost = requests "
           "that got no answer. See `__main__.py` and `sim.py` for what is simulated and how.", ""]
    for scenario in SCENARIOS:
        mine = [r for r in rows if r[0] == scenario.name]
        if not mine:
            continue
        out += [f"## {scenario.name}", "", scenario.about + f"; {scenario.rate:g} requests/s for "
                f"{scenario.seconds:g} s.", "",
                "| strategy | mean (s) | p99 (s) | lost |", "|---|---:|---:|---:|"]
        for _, strategy, mean, p99, lost, n in mine:
            out.append(f"| {strategy} | {mean:.2f} | {p99:.2f} | {lost * 100:.2f} % |")
        out.append("")
    out += ["## Verdict", ""]
    for name, beaten, lost in verdicts:
        out.append(f"- {name}: scored beats {', '.join(RIVALS)} on mean and p99: "
                   + ("yes" if not beaten else "no (" + ", ".join(beaten) + ")")
                   + (f"; lost {lost * 100:.2f} %" if name == "failure-burst" else ""))
    with open(os.path.join(here, "RESULTS.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    sys.exit(main())
