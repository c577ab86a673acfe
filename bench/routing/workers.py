"""Does learning apart hurt? Each worker of a host (hxgwd/workers/) has its own router, which
learns only from the requests its worker gets, and holds its share of each cap. This replays the
target scenarios with `scored` for 1, 2 and 4 workers (requests spread at random, as the kernel
spreads connections) and writes the table to bench/routing/WORKERS.md.

    .venv/bin/python -m bench.routing.workers          # about a minute on two cores
"""

from __future__ import annotations

import multiprocessing
import os
import sys

from bench.routing.__main__ import replay, summarize
from bench.routing.scenarios import SCENARIOS

WORKERS = (1, 2, 4)
SEEDS = (1, 2, 3)


def _run(job: tuple[str, int]) -> tuple[float, float, float]:
    name, workers = job
    scenario = next(s for s in SCENARIOS if s.name == name)
    return summarize([r for seed in SEEDS for r in replay(scenario, "scored", seed, workers)])


def main() -> int:
    jobs = [(s.name, w) for s in SCENARIOS for w in WORKERS]
    with multiprocessing.Pool(os.cpu_count() or 1) as pool:
        done = dict(zip(jobs, pool.map(_run, jobs)))
    out = ["# Routing with workers: learned state per worker", "",
           "Produced by `.venv/bin/python -m bench.routing.workers` (the scenarios and model of "
           "RESULTS.md; `scored`; 3 seeds pooled). Each worker's router sees only its own requests "
           "(a request goes to a worker at random) and routes with its share of each "
           "`max_concurrency` and `max_queue`, as `hxgwd.workers.worker.shares` compiles it.", "",
           "| scenario | workers | mean (s) | p99 (s) | lost | mean vs 1 | p99 vs 1 |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for s in SCENARIOS:
        base = done[(s.name, 1)]
        for w in WORKERS:
            mean, p99, lost = done[(s.name, w)]
            out.append(f"| {s.name} | {w} | {mean:.2f} | {p99:.2f} | {lost * 100:.2f} % | "
                       f"{(mean / base[0] - 1) * 100:+.1f} % | {(p99 / base[1] - 1) * 100:+.1f} % |")
    out += ["", "Why the shares: with each router seeing the host's caps but only its own in-flight "
            "requests, the saturation scenario's small capped deployments were overloaded (2 workers: "
            "mean +33 %); with shares the model of each worker agrees with its gates.", ""]
    text = "\n".join(out)
    print(text)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "WORKERS.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
