"""The Router on a virtual clock with a seeded rng: each strategy, health, accounting, the table."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from hxgwd.config import load
from hxgwd.config.model import Routing
from hxgwd.pipeline.route import Outcome, RequestFeatures, Router
from hxgwd.runtime import compile_config

SMALL = RequestFeatures(prompt_bytes=1024, max_tokens=100, stream=False)
BIG = RequestFeatures(prompt_bytes=64 * 1024, max_tokens=100, stream=False)


def runtime(strategy="scored", models=("a", "b", "c"), extra: dict[str, str] | None = None,
            group_extra: str = ""):
    lines = ['[database]', 'url = ""']
    for m in models:
        lines += ["[[backends]]", f'name = "{m}"', f'url = "http://127.0.0.1:1/{m}"']
    for m in models:
        lines += ["[[models]]", f'name = "{m}"', f'backend = "{m}"', (extra or {}).get(m, "")]
    names = ", ".join(f'"{m}"' for m in models)
    lines += ["[groups.g]", f"models = [{names}]", f'strategy = "{strategy}"', group_extra]
    return compile_config(load.loads("\n".join(lines)), 1, environ={})


def ok(duration: float, features=SMALL, tokens=100, **kw) -> Outcome:
    return Outcome(ok=True, status=200, ttfb=duration, duration=duration, features=features,
                   output_tokens=tokens, **kw)


def fail(status=500, duration=0.1, features=SMALL, **kw) -> Outcome:
    return Outcome(ok=False, status=status, ttfb=0.0, duration=duration, features=features, **kw)


def serve(router: Router, target, features, now: float, timing) -> str:
    """One request: plan, try the first choice, report `timing(dep_id, features)` seconds."""
    dep = router.plan(target, features, now).order[0]
    router.started(dep, now)
    took = timing(dep.model, features)
    router.finished(dep, ok(took, features), now + took)
    return dep.model


def names(plan) -> list[str]:
    return [d.model for d in plan.order]


# --- strategies -----------------------------------------------------------------------------------

def test_priority_is_config_order_and_skips_open_breakers():
    rt = runtime("priority")
    r = Router(rng=random.Random(0), settings=Routing(breaker_failures=2))
    t = rt.targets["g"]
    assert names(r.plan(t, SMALL, 0.0)) == ["a", "b", "c"]
    a = t.deployments[0]
    for now in (1.0, 2.0):
        r.started(a, now)
        r.finished(a, fail(), now)
    plan = r.plan(t, SMALL, 3.0)
    assert names(plan) == ["b", "c"] and plan.strategy == "priority"


def test_weighted_follows_weights_and_is_deterministic_under_a_seed():
    rt = runtime("weighted", extra={"a": "weight = 3.0", "b": "weight = 1.0", "c": "weight = 0.0001"})
    t = rt.targets["g"]
    firsts = Counter(names(Router(rng=random.Random(i)).plan(t, SMALL, 0.0))[0] for i in range(2000))
    assert 0.70 < firsts["a"] / 2000 < 0.80 and firsts["c"] < 10
    one, two = Router(rng=random.Random(7)), Router(rng=random.Random(7))
    assert [names(one.plan(t, SMALL, i)) for i in range(20)] == [names(two.plan(t, SMALL, i)) for i in range(20)]


def test_least_busy_counts_in_flight_relative_to_capacity():
    rt = runtime("least-busy", extra={"a": "max_concurrency = 10", "b": "max_concurrency = 2"})
    r = Router(rng=random.Random(0))
    t = rt.targets["g"]
    a, b, c = t.deployments
    for _ in range(3):
        r.started(a, 0.0)            # a: 3 / 10
    r.started(b, 0.0)                # b: 1 / 2
    for _ in range(4):
        r.started(c, 0.0)            # c, uncapped, weight 1 -> capacity 6 (capped ones: 12 per weight 2)
    assert names(r.plan(t, SMALL, 0.0)) == ["a", "b", "c"]
    r.finished(b, ok(1.0), 1.0)      # b: 0 / 2
    r.finished(c, ok(1.0), 1.0)
    r.finished(c, ok(1.0), 1.0)      # c: 2 / 6, a: 3 / 10
    assert names(r.plan(t, SMALL, 1.0)) == ["b", "a", "c"]


def test_least_latency_measures_new_ones_first_then_takes_the_fastest():
    rt = runtime("least-latency")
    r = Router(rng=random.Random(0))
    t = rt.targets["g"]
    speed = {"a": 3.0, "b": 1.0, "c": 2.0}
    seen = [serve(r, t, SMALL, float(i), lambda m, f: speed[m]) for i in range(3)]
    assert sorted(seen) == ["a", "b", "c"]                # each measured once
    assert names(r.plan(t, SMALL, 10.0)) == ["b", "c", "a"]


def test_scored_learns_which_deployment_is_fastest_for_which_request_size():
    # a: fixed overhead, fast prefill; b: quick to start, slow prefill. Small prompts belong on
    # b, large ones on a: a size-aware choice that least-latency's one number cannot make.
    rt = runtime("scored", models=("a", "b"))
    r = Router(rng=random.Random(1))
    t = rt.targets["g"]

    def timing(m, f):
        kib = f.prompt_bytes / 1024
        return 1.0 + 0.005 * kib if m == "a" else 0.1 + 0.05 * kib

    rng = random.Random(2)
    for i in range(400):
        f = RequestFeatures(rng.choice([512, 1024, 2048, 48 * 1024, 96 * 1024]), 100, False)
        serve(r, t, f, i * 5.0, timing)
    small_first = Counter(serve(r, t, SMALL, 2000 + i * 5.0, timing) for i in range(50))
    big_first = Counter(serve(r, t, BIG, 3000 + i * 5.0, timing) for i in range(50))
    assert small_first["b"] >= 45 and big_first["a"] >= 45
    plan = r.plan(t, BIG, 4000.0)
    assert plan.predicted["a@a"] == pytest.approx(1.0 + 0.005 * 64, rel=0.2)


def test_scored_leaves_a_failing_deployment_and_keeps_a_fast_failing_one_as_failover():
    rt = runtime("scored", models=("a", "b"))
    r = Router(rng=random.Random(0), settings=Routing(breaker_failures=100, breaker_min_requests=1000))
    t = rt.targets["g"]
    a, b = t.deployments
    now = 0.0
    for i in range(40):                           # both equally fast; a fails 60% of the time
        for dep in (a, b):
            r.started(dep, now)
            r.finished(dep, fail(duration=5.0) if dep is a and i % 5 < 3 else ok(1.0), now + 1.0)
        now += 1.0
    firsts = Counter(names(r.plan(t, SMALL, now))[0] for _ in range(50))
    assert firsts["b"] == 50
    assert names(r.plan(t, SMALL, now)) == ["b", "a"]       # still there, for failover


def test_scored_spreads_a_burst_over_equals_instead_of_piling_on_one():
    rt = runtime("scored")
    r = Router(rng=random.Random(0))
    t = rt.targets["g"]
    for i in range(60):
        serve(r, t, SMALL, i * 2.0, lambda m, f: 1.0)
    burst = Counter()
    for _ in range(30):                           # 30 at once, none finished yet
        dep = r.plan(t, SMALL, 200.0).order[0]
        r.started(dep, 200.0)
        burst[dep.model] += 1
    assert max(burst.values()) <= 12


def test_a_new_deployment_is_measured_and_kept_only_if_good():
    rt = runtime("scored", models=("a", "b"))
    r = Router(rng=random.Random(0))
    t = rt.targets["g"]
    for i in range(100):
        serve(r, t, SMALL, i * 2.0, lambda m, f: 1.0 if m == "a" else 1.0)
    rt2 = runtime("scored", models=("a", "b", "c"))     # a reload adds c, which is slow
    t2 = rt2.targets["g"]
    r.retain(rt2.deployments)
    seen = Counter(serve(r, t2, SMALL, 200 + i * 2.0, lambda m, f: 4.0 if m == "c" else 1.0)
                   for i in range(200))
    assert 1 <= seen["c"] <= 20


def test_exploration_floor_revisits_a_deployment_nobody_tried_for_long():
    rt = runtime("scored", models=("a", "b"), group_extra="exploration = 0.2")
    r = Router(rng=random.Random(0))
    t = rt.targets["g"]
    for i in range(200):
        serve(r, t, SMALL, i * 0.5, lambda m, f: 1.0 if m == "a" else 5.0)
    b = r.state(t.deployments[1])
    before = b.requests
    for i in range(400):                           # 200 s more
        serve(r, t, SMALL, 100 + i * 0.5, lambda m, f: 1.0 if m == "a" else 5.0)
    assert b.requests - before >= 3                 # about one every STALE seconds
    assert b.requests - before <= 40


def test_exploration_zero_is_greedy():
    rt = runtime("scored", models=("a", "b"), group_extra="exploration = 0.0")
    r = Router(rng=random.Random(0))
    t = rt.targets["g"]
    for i in range(50):
        for dep in t.deployments:
            r.started(dep, float(i))
            r.finished(dep, ok(1.0 if dep.model == "a" else 1.1), float(i) + 1)
    assert Counter(names(r.plan(t, SMALL, 60.0))[0] for _ in range(20)) == {"a": 20}


def test_cost_weight_trades_time_for_money():
    cheap = {"a": "output_cost_per_1k = 0.0", "b": "output_cost_per_1k = 60.0"}
    for weight, expected in (("0.0", "b"), ("10.0", "a")):
        rt = runtime("scored", models=("a", "b"), extra=cheap, group_extra=f"cost_weight = {weight}")
        r = Router(rng=random.Random(0))
        t = rt.targets["g"]
        for i in range(60):
            for dep in t.deployments:
                r.started(dep, float(i))
                r.finished(dep, ok(2.0 if dep.model == "a" else 1.0), float(i) + 1)
        assert names(r.plan(t, SMALL, 100.0))[0] == expected, weight


# --- health ---------------------------------------------------------------------------------------

def test_retry_after_cools_a_deployment_and_an_empty_plan_says_when_to_come_back():
    rt = runtime("scored", models=("a", "b"))
    r = Router(rng=random.Random(0))
    t = rt.targets["g"]
    a, b = t.deployments
    r.started(a, 0.0)
    r.finished(a, fail(429, retry_after=5.0), 0.0)
    assert names(r.plan(t, SMALL, 1.0)) == ["b"]
    r.started(b, 1.0)
    r.finished(b, fail(503, retry_after=30.0), 1.0)
    plan = r.plan(t, SMALL, 2.0)
    assert plan.order == () and plan.retry_after == pytest.approx(3.0)
    assert not r.usable(rt, 2.0)
    assert names(r.plan(t, SMALL, 5.0)) == ["a"] and r.usable(rt, 5.0)


def test_half_open_deployment_goes_first_one_probe_at_a_time():
    rt = runtime("scored", models=("a", "b"))
    r = Router(rng=random.Random(0), settings=Routing(breaker_failures=2, breaker_cooldown=10.0))
    t = rt.targets["g"]
    a, b = t.deployments
    for now in (0.0, 0.1):
        r.started(a, now)
        r.finished(a, fail(), now)
    assert names(r.plan(t, SMALL, 5.0)) == ["b"]
    plan = r.plan(t, SMALL, 10.1)
    assert names(plan) == ["a", "b"]                      # a's probe, b as its failover
    r.started(a, 10.1)
    assert names(r.plan(t, SMALL, 10.2)) == ["b"]         # probe out: nobody else goes to a
    r.finished(a, ok(0.5), 10.6)
    assert sorted(names(r.plan(t, SMALL, 10.7))) == ["a", "b"]
    assert r.table(rt, 10.7)["g"]["deployments"][0]["breaker"] == "closed"


def test_probe_results_open_and_close_every_deployment_of_a_backend():
    rt = compile_config(load.loads("""
        [database]
        url = ""
        [[backends]]
        name = "shared"
        url = "http://127.0.0.1:1"
        probe_path = "/health"
        [[backends]]
        name = "other"
        url = "http://127.0.0.1:2"
        [[models]]
        name = "m1"
        backend = "shared"
        [[models]]
        name = "m2"
        backend = "shared"
        [[models]]
        name = "m3"
        backend = "other"
        [groups.g]
        models = ["m1", "m2", "m3"]
    """), 1, environ={})
    r = Router(rng=random.Random(0))
    t = rt.targets["g"]
    r.probe_result("shared", False, 0.0)
    assert names(r.plan(t, SMALL, 1.0)) == ["m3"]
    assert r.usable(rt, 1.0)
    r.probe_result("other", False, 1.0)
    assert not r.usable(rt, 1.0) and r.plan(t, SMALL, 1.0).order == ()
    r.probe_result("shared", True, 2.0)
    assert sorted(names(r.plan(t, SMALL, 2.0))) == ["m1", "m2"]


def test_cancelled_attempts_release_in_flight_and_teach_nothing():
    rt = runtime("scored", models=("a", "b"))
    r = Router(rng=random.Random(0), settings=Routing(breaker_failures=1))
    t = rt.targets["g"]
    a = t.deployments[0]
    for _ in range(3):
        r.started(a, 0.0)
    for _ in range(3):
        r.finished(a, Outcome(ok=True, status=0, ttfb=0.0, duration=0.0, features=SMALL, cancelled=True), 1.0)
    st = r.state(a)
    assert st.in_flight == 0 and st.latency.observations == 0 and st.failures == 0
    assert st.breaker.current(1.0) == "closed"


def test_gateway_queue_counts_against_a_capped_deployment():
    rt = runtime("scored", models=("a", "b"), extra={"a": "max_concurrency = 2\nqueue_timeout = 5.0"})
    r = Router(rng=random.Random(0))
    t = rt.targets["g"]
    for i in range(100):
        for dep in t.deployments:
            r.started(dep, float(i))
            r.finished(dep, ok(2.0 if dep.model == "a" else 3.0), float(i) + 1)
    a = t.deployments[0]
    assert names(r.plan(t, SMALL, 101.0))[0] == "a"
    for _ in range(8):                 # 2 running, 6 waiting: about 6 x 2 s / 2 slots = 6 s away
        r.started(a, 101.0)
    plan = r.plan(t, SMALL, 101.0)
    assert names(plan)[0] == "b"
    assert plan.predicted["a@a"] > 5.0


def test_overdue_requests_count_as_failures_before_their_timeout_reports_them():
    rt = runtime("scored", models=("a", "b"))
    r = Router(rng=random.Random(0))
    t = rt.targets["g"]
    for i in range(100):
        serve(r, t, SMALL, i * 1.0, lambda m, f: 1.0)
    a = t.deployments[0]
    for i in range(6):                 # a starts hanging: nothing comes back
        r.plan(t, SMALL, 100.0 + i)
        r.started(a, 100.0 + i)
    firsts = Counter(names(r.plan(t, SMALL, 125.0))[0] for _ in range(20))
    assert firsts["b"] == 20


# --- state across reloads, views ------------------------------------------------------------------

def test_state_survives_reload_for_deployments_that_still_exist():
    rt = runtime("scored")
    r = Router(rng=random.Random(0))
    t = rt.targets["g"]
    for i in range(50):
        serve(r, t, SMALL, float(i), lambda m, f: {"a": 1.0, "b": 2.0, "c": 3.0}[m])
    learned = r.state("a@a").latency.params()
    r.started(t.deployments[2], 60.0)             # c has a request in flight through the reload
    rt2 = runtime("least-busy", models=("a", "c"), group_extra="")
    r.configure(Routing(max_attempts=2))
    r.retain(rt2.deployments)
    assert r.state("a@a").latency.params() == learned
    assert "b@b" not in r.states and "c@c" in r.states
    r.finished(rt.targets["g"].deployments[2], ok(1.0), 61.0)
    assert "c@c" in r.states                       # still configured: kept


def test_gone_deployment_is_dropped_when_its_last_request_ends():
    rt = runtime("scored")
    r = Router(rng=random.Random(0))
    c = rt.targets["g"].deployments[2]
    r.started(c, 0.0)
    r.retain(["a@a", "b@b"])
    assert "c@c" in r.states
    r.finished(c, ok(1.0), 1.0)
    assert "c@c" not in r.states


def test_table_is_json_and_shows_breaker_load_model_and_score():
    rt = runtime("scored", extra={"a": "max_concurrency = 4"})
    r = Router(rng=random.Random(0))
    t = rt.targets["g"]
    for i in range(30):
        serve(r, t, SMALL, float(i), lambda m, f: 1.0)
    r.started(t.deployments[0], 40.0)
    table = json.loads(json.dumps(r.table(rt, 40.0)))
    assert set(table) == {"a", "b", "c", "g"}
    g = table["g"]
    assert g["strategy"] == "scored" and g["group"] is True
    row = g["deployments"][0]
    assert row["deployment"] == "a@a" and row["in_flight"] == 1 and row["max_concurrency"] == 4
    assert row["breaker"] == "closed" and row["error_rate"] == 0.0
    assert set(row["latency"]) == {"intercept_s", "per_prompt_kib_s", "per_output_token_ms",
                                   "slowdown_per_concurrent"}
    assert row["predicted_s"] > 0 and row["score"] >= row["predicted_s"]


def test_single_deployment_plan_is_that_deployment_with_a_prediction():
    rt = runtime("scored", models=("a",))
    r = Router(rng=random.Random(0))
    t = rt.targets["a"]
    for i in range(20):
        serve(r, t, SMALL, float(i), lambda m, f: 1.5)
    plan = r.plan(t, SMALL, 30.0)
    assert names(plan) == ["a"] and plan.predicted["a@a"] == pytest.approx(1.5, rel=0.1)


def test_scored_is_deterministic_under_a_seed():
    rt = runtime("scored")
    t = rt.targets["g"]

    def run(seed: int) -> list[list[str]]:
        r = Router(rng=random.Random(seed))
        rng = random.Random(99)
        out = []
        for i in range(200):
            f = RequestFeatures(rng.choice([512, 8192, 65536]), rng.choice([0, 50, 500]), rng.random() < 0.5)
            plan = r.plan(t, f, i * 0.3)
            out.append(names(plan))
            r.started(plan.order[0], i * 0.3)
            if rng.random() < 0.1:
                r.finished(plan.order[0], fail(duration=0.2, features=f), i * 0.3 + 0.2)
            else:
                r.finished(plan.order[0], ok(0.1 + f.prompt_bytes / 1e5, f), i * 0.3 + 0.25)
        return out

    assert run(5) == run(5)
    assert run(5) != run(6)
