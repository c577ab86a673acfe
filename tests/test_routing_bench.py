"""The routing simulation (bench/routing) runs the real Router; keep it working, quickly."""

from __future__ import annotations

import attrs

from bench.routing.__main__ import replay, summarize
from bench.routing.scenarios import SCENARIOS, workload


def test_a_short_failure_burst_replays_through_the_real_router():
    scenario = attrs.evolve(next(s for s in SCENARIOS if s.name == "failure-burst"), seconds=260)
    results = {strategy: replay(scenario, strategy, 1) for strategy in ("scored", "weighted")}
    assert len(results["scored"]) == len(workload(scenario.rate, scenario.seconds, 1))
    for res in results.values():
        mean, p99, lost = summarize(res)
        assert 0 < mean < p99 and lost < 0.05
        assert any(len(r.trail) > 1 for r in res)           # failovers happened
    assert summarize(results["scored"]) == summarize(replay(scenario, "scored", 1))   # deterministic
