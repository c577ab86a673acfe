"""Stage 4, limit: the in-memory policy, as plain tables with the clock passed in."""

from __future__ import annotations

import bisect
import datetime as dt
import json
import random

import pytest

from hxgwd.config.model import Backend, Model, Timeouts
from hxgwd.errors import RateLimited
from hxgwd.limits import estimate, reservation
from hxgwd.limits.estimate import Estimate
from hxgwd.limits.local import LocalLimiter
from hxgwd.limits.periods import Calendar
from hxgwd.runtime import BackendRuntime, Deployment, Principal

T0 = 1_800_000_000.0        # 2027-01-15T08:00:00Z, a whole second


def key(name: str = "k", **limits) -> Principal:
    return Principal(key_name=name, allowed=None, **limits)


def utc(*args: int) -> float:
    return dt.datetime(*args, tzinfo=dt.timezone.utc).timestamp()


def refused(lim: LocalLimiter, principal: Principal, est: Estimate, now: float) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        lim.admit(principal, est, now)
    return info.value


ONE = Estimate(tokens=10, cost_usd=0.0)


def test_a_key_without_limits_reserves_nothing():
    lim = LocalLimiter()
    assert lim.admit(key(), Estimate(10**9, 10**6), T0) is None
    lim.settle(None, 5, 1.0, T0)
    assert lim.keys == {}


# --- rpm ----------------------------------------------------------------------------------------

def test_rpm_counts_a_sliding_minute_of_whole_seconds():
    lim, p = LocalLimiter(), key(rpm=3)
    lim.admit(p, ONE, T0 + 0.2)
    lim.admit(p, ONE, T0 + 0.9)
    lim.admit(p, ONE, T0 + 10)
    err = refused(lim, p, ONE, T0 + 20)
    assert (err.status, err.code, err.type) == (429, "rate_limit_rpm", "rate_limit_error")
    assert err.retry_after == pytest.approx(40)          # the first two leave at T0 + 60
    assert err.headers() == [(b"retry-after", b"40")]
    assert "requests per minute (RPM): limit 3, used 3" in err.message
    assert refused(lim, p, ONE, T0 + 59.99).retry_after == pytest.approx(0.01)
    lim.admit(p, ONE, T0 + 60)                            # both from second T0 are gone: two free
    lim.admit(p, ONE, T0 + 60.5)
    assert refused(lim, p, ONE, T0 + 61).retry_after == pytest.approx(9)   # T0 + 10 leaves at T0 + 70
    assert lim.statistics()["refused"]["rate_limit_rpm"] == 3


def test_rpm_never_more_than_the_limit_in_any_window_and_never_refuses_below_it():
    rng = random.Random(7)
    lim, p, rpm = LocalLimiter(), key(rpm=20), 20
    now, admitted = T0, []                               # whole seconds of admissions, ascending

    def in_window(t: float) -> int:
        return len(admitted) - bisect.bisect_right(admitted, int(t) - 60)

    for _ in range(3000):
        now += rng.expovariate(1 / 2.0)                  # ~30 requests a minute, bursty
        try:
            lim.admit(p, ONE, now)
        except RateLimited as err:
            assert in_window(now) == rpm
            assert in_window(now + err.retry_after) < rpm   # retrying when told to succeeds
        else:
            assert in_window(now) < rpm
            admitted.append(int(now))
    assert len(admitted) > 1000


# --- tpm ----------------------------------------------------------------------------------------

def test_tpm_reserves_the_estimate_and_settle_corrects_it():
    lim, p = LocalLimiter(), key(tpm=1000)
    first = lim.admit(p, Estimate(600, 0.0), T0)
    assert first.tokens == 600 and first.nano_usd is None
    err = refused(lim, p, Estimate(600, 0.0), T0 + 5)
    assert err.code == "rate_limit_tpm" and err.retry_after == pytest.approx(55)
    assert "limit 1000, used 600, requested 600" in err.message
    lim.settle(first, 100, None, T0 + 6)                  # it used far less than reserved
    second = lim.admit(p, Estimate(600, 0.0), T0 + 6)
    assert lim.usage("k", T0 + 6)["tpm"] == 700
    lim.settle(second, 850, None, T0 + 7)                 # more than reserved counts in full
    assert lim.usage("k", T0 + 7)["tpm"] == 950
    assert refused(lim, p, Estimate(51, 0.0), T0 + 8).retry_after == pytest.approx(52)  # T0's 100 leave at T0+60
    lim.admit(p, Estimate(51, 0.0), T0 + 60)


def test_tpm_unknown_usage_keeps_the_reservation_and_late_excess_counts_now():
    lim, p = LocalLimiter(), key(tpm=1000)
    res = lim.admit(p, Estimate(300, 0.0), T0)
    lim.settle(res, None, None, T0 + 1)
    assert lim.usage("k", T0 + 1)["tpm"] == 300
    long = lim.admit(p, Estimate(300, 0.0), T0 + 2)
    lim.settle(long, 900, None, T0 + 200)                 # a stream that ran past its window
    assert lim.usage("k", T0 + 200)["tpm"] == 600         # the 600 tokens beyond the estimate
    lim.settle(lim.admit(p, Estimate(10, 0.0), T0 + 300), 0, None, T0 + 500)   # less, late: nothing
    assert lim.usage("k", T0 + 500)["tpm"] == 0


def test_tpm_a_request_larger_than_the_allowance_runs_alone():
    lim, p = LocalLimiter(), key(tpm=1000)
    lim.admit(p, Estimate(5000, 0.0), T0)
    assert refused(lim, p, Estimate(1, 0.0), T0 + 1).code == "rate_limit_tpm"
    lim.admit(p, Estimate(5000, 0.0), T0 + 60)


# --- budgets ------------------------------------------------------------------------------------

def test_daily_budget_is_calendar_aligned_in_the_configured_timezone():
    lim, p = LocalLimiter("Europe/Berlin"), key(budget_usd=1.0, budget_period="day")
    now = utc(2026, 11, 28, 22, 30)                       # 23:30 in Berlin (CET, +01:00)
    a = lim.admit(p, Estimate(10, 0.4), now)
    assert (a.period, a.nano_usd, a.period_end) == ("2026-11-28", 400_000_000, utc(2026, 11, 28, 23))
    lim.admit(p, Estimate(10, 0.4), now)
    err = refused(lim, p, Estimate(10, 0.4), now + 1)
    assert (err.status, err.code) == (429, "budget_exceeded")
    assert err.retry_after == pytest.approx(30 * 60 - 1)   # Berlin midnight
    assert "daily budget is $1.00, $0.8000 is spent or reserved" in err.message
    lim.settle(a, 10, 0.1, now + 2)                       # settles to less: room again today
    lim.admit(p, Estimate(10, 0.4), now + 3)
    b = lim.admit(p, Estimate(10, 0.9), utc(2026, 11, 28, 23))   # a new day in Berlin
    assert b.period == "2026-11-29"
    lim.settle(a, 10, 0.0, utc(2026, 11, 28, 23, 1))     # a settle from yesterday changes nothing today
    assert lim.usage("k", utc(2026, 11, 28, 23, 1))["spent_usd"] == pytest.approx(0.9)


def test_monthly_budget_resets_on_the_first_across_a_dst_change():
    # New York leaves DST on 2026-11-01 at 02:00; the month still starts at local midnight (EDT).
    lim, p = LocalLimiter("America/New_York"), key(budget_usd=5.0)
    now = utc(2026, 10, 31, 12)
    res = lim.admit(p, Estimate(1, 4.0), now)
    assert res.period == "2026-10"
    err = refused(lim, p, Estimate(1, 2.0), now)
    assert err.retry_after == pytest.approx(utc(2026, 11, 1, 4) - now)
    assert "monthly budget" in err.message and err.headers() == [(b"retry-after", b"57600")]
    assert refused(lim, p, Estimate(1, 2.0), utc(2026, 11, 1, 3, 59, 59)).code == "budget_exceeded"
    assert lim.admit(p, Estimate(1, 2.0), utc(2026, 11, 1, 4)).period == "2026-11"


def test_a_request_costing_more_than_the_whole_budget_is_refused():
    lim, p = LocalLimiter(), key(budget_usd=0.5, budget_period="day")
    err = refused(lim, p, Estimate(1, 0.75), utc(2026, 11, 28, 12))
    assert err.code == "budget_exceeded" and err.retry_after == pytest.approx(12 * 3600)
    assert lim.admit(key(budget_usd=0.0), Estimate(1, 0.0), T0) is not None   # free models pass


def test_reservations_count_at_once_so_concurrent_admissions_cannot_overrun():
    lim, p = LocalLimiter(), key(budget_usd=1.0)
    held = []
    for _ in range(50):                                   # 50 in flight, none settled yet
        try:
            held.append(lim.admit(p, Estimate(100, 0.07), T0))
        except RateLimited:
            pass
    assert len(held) == 14                                # 14 * 0.07 = 0.98
    for r in held:
        lim.settle(r, 100, 0.07, T0 + 1)
    assert lim.usage("k", T0 + 1)["spent_usd"] == pytest.approx(0.98)


def test_cents_add_up_exactly():
    lim, p = LocalLimiter(), key(budget_usd=0.1, budget_period="day")
    for _ in range(10):
        lim.settle(lim.admit(p, Estimate(1, 0.01), T0), 1, 0.01, T0)
    assert refused(lim, p, Estimate(1, 0.01), T0).code == "budget_exceeded"


@pytest.mark.parametrize("tz, day, hours", [
    ("America/Santiago", "2026-09-06", 23),   # DST starts at midnight: 00:00 does not exist
    ("America/Santiago", "2026-04-04", 25),   # DST ends at midnight: 23:00-24:00 twice
    ("Asia/Beirut", "2026-03-29", 23),
    ("Europe/Berlin", "2026-10-25", 25),
    ("Asia/Kolkata", "2026-11-28", 24),
])
def test_day_periods_around_dst_changes(tz, day, hours):
    cal = Calendar(tz)
    d = dt.date.fromisoformat(day)
    noon = dt.datetime(d.year, d.month, d.day, 12, tzinfo=cal.tz).timestamp()
    p = cal.period("day", noon)
    assert p.key == day and (p.end - p.start) == hours * 3600
    assert cal.period("day", p.start).key == day
    assert cal.period("day", p.start - 0.001).key == (d - dt.timedelta(days=1)).isoformat()
    assert cal.period("day", p.end - 0.001).key == day
    assert cal.period("day", p.end).key == (d + dt.timedelta(days=1)).isoformat()
    # every instant of the sweep lies in its period, and periods tile time
    t = p.start - 86400 * 2
    while t < p.end + 86400 * 2:
        q = cal.period("day", t)
        assert q.start <= t < q.end
        assert q.key == dt.datetime.fromtimestamp(t, cal.tz).date().isoformat()
        assert cal.compute("day", q.end - 0.5).end == cal.compute("day", q.end).start
        t += 900


def test_month_periods_and_neighbours():
    cal = Calendar("Pacific/Kiritimati")                 # +14:00: the month starts a day early in UTC
    prev, cur, nxt = cal.around("month", utc(2026, 11, 30, 10))
    assert (prev.key, cur.key, nxt.key) == ("2026-11", "2026-12", "2027-01")
    assert cur.start == utc(2026, 11, 30, 10) and prev.end == cur.start and cur.end == nxt.start
    assert cal.around("month", utc(2026, 12, 15)) is cal.around("month", utc(2026, 12, 16))   # cached


def test_the_longest_wait_names_the_limit():
    lim, p = LocalLimiter(), key(rpm=1, tpm=100, budget_usd=1.0, budget_period="day")
    res = lim.admit(p, Estimate(100, 1.0), utc(2026, 11, 28, 12))
    assert (res.tokens, res.nano_usd, res.period) == (100, 10**9, "2026-11-28")
    err = refused(lim, p, Estimate(1, 0.01), utc(2026, 11, 28, 12, 0, 1))
    assert err.code == "budget_exceeded"
    lim.settle(res, 100, 0.0, utc(2026, 11, 28, 12, 0, 2))
    assert refused(lim, p, Estimate(1, 0.01), utc(2026, 11, 28, 12, 0, 3)).code in ("rate_limit_rpm",
                                                                                    "rate_limit_tpm")
    body = json.loads(err.body())["error"]
    assert body["type"] == "rate_limit_error" and body["code"] == "budget_exceeded" and body["param"] is None


def test_a_zero_limit_refuses_everything():
    lim = LocalLimiter()
    assert refused(lim, key(rpm=0), ONE, T0).retry_after == 60
    assert refused(lim, key(name="t", tpm=0), ONE, T0).code == "rate_limit_tpm"


def test_a_clock_stepping_back_does_not_break_the_windows():
    lim, p = LocalLimiter(), key(rpm=2)
    lim.admit(p, ONE, T0 + 30)
    lim.admit(p, ONE, T0 + 10)                            # counted in second T0 + 30
    err = refused(lim, p, ONE, T0 + 11)
    assert 0 < err.retry_after <= 80
    lim.admit(p, ONE, T0 + 90)


def test_seed_spend_raises_the_local_count():
    lim, p = LocalLimiter(), key(budget_usd=1.0, budget_period="day")
    lim.seed_spend("k", "2026-11-28", 900_000_000)
    assert refused(lim, p, Estimate(1, 0.2), utc(2026, 11, 28, 12)).code == "budget_exceeded"
    lim.seed_spend("k", "2026-11-28", 100)               # never lowers it
    assert lim.usage("k", utc(2026, 11, 28, 12))["spent_usd"] == pytest.approx(0.9)
    lim.seed_spend("k", "2026-11-27", 10**9)             # nor goes back to an older period
    assert lim.usage("k", utc(2026, 11, 28, 12))["spent_usd"] == pytest.approx(0.9)


# --- estimates ----------------------------------------------------------------------------------

def _dep(name: str, inp: float, out: float, kind: str = "chat") -> Deployment:
    backend = BackendRuntime("b", Backend(name="b", kind="echo"), None, "", Timeouts())
    cfg = Model(name=name, backend="b", kind=kind, input_cost_per_1k=inp, output_cost_per_1k=out)
    return Deployment(f"{name}@b", name, backend, name, kind, 1.0, cfg)


def test_estimate_is_prompt_bytes_over_four_plus_max_tokens_at_the_dearest_deployment():
    deps = [_dep("cheap", 0.001, 0.002), _dep("dear", 0.01, 0.03), _dep("in-heavy", 0.05, 0.0)]
    est = estimate.estimate("chat", 4001, 500, deps)
    assert est.tokens == 1001 + 500
    assert est.cost_usd == pytest.approx(max(1001 * 0.01 + 500 * 0.03, 1001 * 0.05) / 1000)
    assert estimate.estimate("chat", 400, 0, deps).tokens == 100 + estimate.DEFAULT_MAX_TOKENS["chat"]
    assert estimate.estimate("chat", 400, None, []).cost_usd == 0.0
    emb = estimate.estimate("embedding", 400, 99, [_dep("e", 0.0001, 0.0, "embedding")])
    assert emb.tokens == 100 and emb.cost_usd == pytest.approx(0.00001)
    assert estimate.usage_cost(deps[1].config, 1000, 2000) == pytest.approx(0.07)
    assert reservation.to_nano(0.07, up=True) == 70_000_000 and reservation.to_nano(1e-10, up=True) == 1


def test_a_request_is_estimated_for_every_choice_it_may_be_billed_for():
    deps = [_dep("m", 0.0, 1.0)]                          # $0.001 per completion token
    chat = {"messages": [], "max_tokens": 41}
    one = estimate.estimate_request("chat", chat, 40, deps)
    assert (one.tokens, one.cost_usd) == (10 + 41, pytest.approx(0.041))
    ten = estimate.estimate_request("chat", {**chat, "n": 10}, 40, deps)
    assert (ten.tokens, ten.cost_usd) == (10 + 410, pytest.approx(0.41))
    assert estimate.estimate_request("chat", {**chat, "n": 2, "best_of": 5}, 40, deps).tokens == 10 + 205
    for junk in (True, 0, -3, 2.5, "10", None, [10]):    # ignored: the upstream refuses or takes 1
        assert estimate.estimate_request("chat", {**chat, "n": junk, "best_of": junk}, 40, deps).tokens == 51
    huge = estimate.estimate_request("chat", {**chat, "max_tokens": 10**30, "n": 10**9}, 40, deps)
    assert huge.tokens == 10 + estimate.MAX_TOKENS_ESTIMATED * estimate.MAX_CHOICES
    assert reservation.to_nano(huge.cost_usd * 10**9, up=True) == reservation.MAX_NANO   # still an int64 for Redis
    no_max = estimate.estimate_request("chat", {"n": 3}, 40, deps)
    assert no_max.tokens == 10 + 3 * estimate.DEFAULT_MAX_TOKENS["chat"]
    # completions: n choices for each prompt of a list
    prompts = {"prompt": ["a", "b", "c"], "max_tokens": 10, "n": 2}
    assert estimate.estimate_request("chat", prompts, 40, deps).tokens == 10 + 60
    assert estimate.estimate_request("chat", {"prompt": [1] * 50, "max_tokens": 10}, 104, deps).tokens == 50 + 10


def test_embeddings_are_estimated_per_item():
    deps = [_dep("e", 1.0, 0.0, "embedding")]             # $0.001 per prompt token
    arrays = {"input": [[1] * 50] * 100}                  # 5,000 tokens in 10,412 bytes of "1,"
    size = len(json.dumps(arrays, separators=(",", ":")))
    est = estimate.estimate_request("embedding", arrays, size, deps)
    assert est.tokens == 5000 and est.cost_usd == pytest.approx(5.0)
    empties = {"input": [""] * 1000}                      # one token each, at least
    assert estimate.estimate_request("embedding", empties, 3000, deps).tokens == 1000
    assert estimate.estimate_request("embedding", {"prompt": [7] * 30}, 60, deps).tokens == 30
    assert estimate.estimate_request("embedding", {"input": "x", "n": 5, "max_tokens": 9}, 4, deps).tokens == 1


def test_a_seeded_period_starts_each_key_from_what_the_store_recorded():
    lim, p = LocalLimiter(), key(budget_usd=1.0, budget_period="day")
    monthly = key(name="m", budget_usd=1.0)
    now = utc(2026, 11, 28, 12)
    lim.seed_period("2026-11-28", {"k": 900_000_000})
    lim.seed_period("2026-11", {"m": 950_000_000})
    assert refused(lim, p, Estimate(1, 0.2), now).code == "budget_exceeded"
    assert refused(lim, monthly, Estimate(1, 0.1), now).code == "budget_exceeded"
    lim.admit(p, Estimate(1, 0.05), now)
    lim.seed_period("2026-11-28", {"k": 920_000_000})    # again, later: the store holds what we counted
    assert lim.usage("k", now)["spent_usd"] == pytest.approx(0.95)
    assert lim.admit(p, Estimate(1, 0.9), utc(2026, 11, 29)).period == "2026-11-29"   # a new day: 0
    lim.seed_period("2026-11-29", {})                    # replaces the 28th: tables do not pile up
    assert sorted(lim.seeded) == ["2026-11", "2026-11-29"]
