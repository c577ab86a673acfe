"""The router's pure parts on their own: the latency model, the rates, the breaker's transitions."""

from __future__ import annotations

import math
import random

import pytest

from hxgwd.config.model import Routing
from hxgwd.routing.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from hxgwd.routing.estimator import LatencyModel, OutputLength, Rates


def synthetic(model: LatencyModel, rng: random.Random, n: int, *, ttft=0.15, per_kib=0.012, tpot=0.015,
              kappa=0.02, start=0.0) -> float:
    t = start
    for _ in range(n):
        kb = math.exp(rng.uniform(math.log(0.3), math.log(96)))
        out = rng.choice([2, 150, 120, 900]) * math.exp(rng.gauss(0, 0.5))
        c = rng.randint(0, 15)
        jitter = math.exp(rng.gauss(0, 0.25) - 0.25 ** 2 / 2)
        model.update(kb, out / 1000, c, (ttft + per_kib * kb + tpot * out) * (1 + kappa * c) * jitter, t)
        t += 0.2
    return t


def test_latency_model_recovers_time_to_first_token_prefill_decode_and_load():
    m = LatencyModel()
    synthetic(m, random.Random(1), 3000)
    p = m.params()
    assert p["intercept_s"] == pytest.approx(0.15, abs=0.08)
    assert p["per_prompt_kib_s"] == pytest.approx(0.012, abs=0.006)
    assert p["per_output_token_ms"] == pytest.approx(15.0, rel=0.15)
    assert p["slowdown_per_concurrent"] == pytest.approx(0.02, abs=0.012)
    mean, var = m.predict(50.0, 0.2, 0)
    assert mean == pytest.approx(0.15 + 0.6 + 3.0, rel=0.15)
    assert m.predict(50.0, 0.2, 10)[0] > mean                      # load slows it down


def test_latency_model_tracks_a_change_and_survives_outliers():
    m = LatencyModel()
    rng = random.Random(2)
    t = synthetic(m, rng, 600)
    for _ in range(5):                                              # stuck requests: clipped
        m.update(1.0, 0.1, 0, 600.0, t)
    assert m.predict(1.0, 0.15, 0)[0] < 10
    synthetic(m, rng, 600, tpot=0.045, start=t)                     # three times slower decoding
    assert m.params()["per_output_token_ms"] == pytest.approx(45.0, rel=0.2)


def test_uncertainty_shrinks_with_data_and_grows_back_with_silence():
    m = LatencyModel()
    prior = m.predict(4.0, 0.2, 0)[1]
    t = synthetic(m, random.Random(3), 300)
    measured = m.predict(4.0, 0.2, 0)[1]
    assert measured < prior / 100
    m.drift(t + 600)                                                # ten minutes unobserved
    assert m.predict(4.0, 0.2, 0)[1] > 20 * measured
    m.drift(t + 1e6)
    assert m.predict(4.0, 0.2, 0)[1] <= prior * 1.0001             # bounded by the prior


def test_rates_decay_and_weigh_old_evidence_less():
    r = Rates()
    r.add(0.0, 20.0, error=True)
    assert r.failure_rate() > 0.5
    r.decay(100.0, 20.0)
    assert r.failure_rate() < 0.2
    fresh, stale = Rates(), Rates()
    fresh.add(0.0, 20.0)
    fresh.add(0.0, 20.0, error=True)
    stale.add(0.0, 20.0)
    stale.add(0.0, 20.0, error=True, age=120.0)                     # a hang reported by its timeout
    assert stale.failure_rate() < fresh.failure_rate() / 5
    t = Rates()
    t.add(0.0, 20.0, throttled=True)
    assert t.throttle_rate() == 1.0 and t.error_rate() == 0.0


def test_output_length_learns_the_share_of_max_tokens():
    lengths = OutputLength()
    for _ in range(200):
        lengths.observe(1000, 200)
        lengths.observe(0, 50)
    assert lengths.expect(1000) == pytest.approx(200, rel=0.05)
    assert lengths.expect(0) == pytest.approx(50, rel=0.1)


S = Routing(breaker_failures=3, breaker_error_rate=0.5, breaker_min_requests=6, breaker_window=30.0,
            breaker_cooldown=10.0, max_retry_after=60.0)


def test_breaker_opens_after_consecutive_failures_and_recovers_through_one_probe():
    b = Breaker()
    for t in (1.0, 2.0):
        b.on_failure(t, S)
        assert b.current(t) == CLOSED and b.admits(t)
    b.on_failure(3.0, S)
    assert b.current(3.0) == OPEN and not b.admits(12.9)
    assert b.available_at(3.0) == pytest.approx(13.0)
    assert b.current(13.0) == HALF_OPEN and b.admits(13.0)
    b.on_start(13.0)                                                # the probe goes out
    assert not b.admits(13.1) and b.usable(13.1)                    # one at a time
    b.on_success(14.0, S)
    assert b.current(14.0) == CLOSED and b.admits(14.0)


def test_breaker_failed_probe_reopens_with_a_doubled_cooldown_and_success_resets_it():
    b = Breaker()
    for t in (0.0, 0.1, 0.2):
        b.on_failure(t, S)
    assert b.current(10.2) == HALF_OPEN
    b.on_start(10.2)
    b.on_failure(10.3, S)
    assert b.current(10.3) == OPEN and b.reopen_at == pytest.approx(30.3)     # 2 x 10 s
    b.on_start(30.3)
    b.on_failure(30.4, S)
    assert b.reopen_at == pytest.approx(70.4)                                 # 4 x 10 s
    b.on_start(70.4)
    b.on_success(70.5, S)
    for t in (71.0, 71.1, 71.2):
        b.on_failure(t, S)
    assert b.reopen_at == pytest.approx(81.2)                                 # back to 1 x


def test_breaker_opens_on_error_rate_over_the_window():
    b = Breaker()
    for i in range(6):          # alternate: never 3 in a row, but 50% over 6 requests
        t = float(i)
        (b.on_failure(t, S) if i % 2 else b.on_success(t, S))
    assert b.current(5.0) == OPEN
    assert b.error_rate(5.0, S) == (0.5, 6)
    old = Breaker()
    for i in range(6):          # the same, spread beyond the window: the early ones are forgotten
        t = i * 10.0
        (old.on_failure(t, S) if i % 2 else old.on_success(t, S))
    assert old.current(50.0) == CLOSED


def test_cancel_releases_the_probe_slot_without_a_verdict():
    b = Breaker(state=OPEN, reopen_at=5.0)
    b.on_start(5.0)
    assert not b.admits(5.0)
    b.on_cancel(6.0)
    assert b.current(6.0) == HALF_OPEN and b.admits(6.0)


def test_retry_after_cools_without_counting_as_a_failure():
    b = Breaker()
    for t in range(5):
        b.on_failure(float(t), S, retry_after=2.0)
    assert b.current(4.0) == CLOSED and b.consecutive == 0
    assert not b.admits(5.9) and not b.usable(5.9)
    assert b.available_at(4.5) == pytest.approx(6.0)
    assert b.admits(6.0)
    b.on_failure(7.0, S, retry_after=3600.0)
    assert b.cool_until == pytest.approx(67.0)                       # capped by max_retry_after


def test_probes_open_and_close_the_breaker():
    b = Breaker()
    b.on_probe(False, 0.0, S)
    assert b.current(0.0) == OPEN
    b.on_probe(False, 9.0, S)                     # still down: stays open past the cooldown
    assert b.current(12.0) == OPEN
    b.on_probe(True, 12.0, S)                     # a probe opened it, a probe closes it
    assert b.current(12.0) == CLOSED
    r = Breaker()
    for t in (0.0, 0.1, 0.2):                     # opened by real requests
        r.on_failure(t, S)
    r.on_probe(True, 1.0, S)                      # /health answers: a real request decides
    assert r.current(1.0) == HALF_OPEN
