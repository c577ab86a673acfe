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


def test_two_workers_learning_apart_route_as_well_as_one_process():
    """Learned state is per worker (README "Workers"): each worker's router sees half the requests
    and holds half of each cap. In the scenario where routing matters most (saturation: small
    capped deployments beside a big one) the mean time stays within 10 % of one process's (900 s,
    3 seeds: +1 %); the p99 pays more (+11 % there, up to +17 % in this shorter run)."""
    scenario = attrs.evolve(next(s for s in SCENARIOS if s.name == "saturation"), seconds=400)
    one = [r for seed in (1, 2) for r in replay(scenario, "scored", seed)]
    two = [r for seed in (1, 2) for r in replay(scenario, "scored", seed, workers=2)]
    (mean1, p99_1, lost1), (mean2, p99_2, lost2) = summarize(one), summarize(two)
    assert mean2 < mean1 * 1.10 and p99_2 < p99_1 * 1.25 and lost2 < 0.005, (summarize(one), summarize(two))
