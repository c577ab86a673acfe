"""The workers' parts without processes: the channel over a real socket pair, the host limiter
through it, the merges, shares, backoff and the setting."""

from __future__ import annotations

import os
import socket
from collections import Counter

import pytest
import trio

from hxgwd.config import load
from hxgwd.config.load import ConfigError
from hxgwd.config.model import Database, Limits
from hxgwd.errors import RateLimited
from hxgwd.limits.estimate import Estimate
from hxgwd.limits.limiter import HostLimiter
from hxgwd.limits.redis import LimitsUnavailable
from hxgwd.metrics.registry import Counter as MetricCounter, Gauge, Histogram
from hxgwd.runtime import Principal
from hxgwd.store import adopted_spool_dirs
from hxgwd.workers import limits, worker_count
from hxgwd.workers.balance import GONE, ConnectionCounts
from hxgwd.workers.channel import MAX_FRAME, FrameError, Frames, Peer, PeerGone, RemoteError, encode
from hxgwd.workers.merge import family_doc, merge_docs, merge_families
from hxgwd.workers.slot import CRASH_LOOP, RESTART_MAX, RESTART_MIN, STABLE_AFTER, Slot
from hxgwd.workers.worker import worker_share


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


# --- the channel ------------------------------------------------------------------------------------

def test_frames_come_out_whole_whatever_the_pieces():
    data = encode({"id": 1, "call": "x", "args": [1, "é"]}) + encode({"call": "y"})
    frames = Frames()
    got = []
    for i in range(len(data)):
        got += frames.feed(data[i:i + 1])
    assert got == [{"id": 1, "call": "x", "args": [1, "é"]}, {"call": "y"}]


def test_a_frame_over_the_bound_is_refused_both_ways():
    with pytest.raises(FrameError):
        Frames().feed((MAX_FRAME + 1).to_bytes(4, "big") + b"{")
    with pytest.raises(FrameError):
        encode("x" * MAX_FRAME)


async def test_calls_both_ways_errors_timeouts_and_a_closed_peer(nursery):
    left_stream, right_stream = pair()
    stall = trio.Event()

    async def slow(args):
        await stall.wait()

    def broken(args):
        raise ValueError("no")

    left = Peer(left_stream, {"double": lambda args: args * 2})
    right = Peer(right_stream, {"add": lambda args: sum(args), "slow": slow, "broken": broken})
    await nursery.start(left.run)
    await nursery.start(right.run)
    assert await left.call("add", [1, 2, 3]) == 6
    assert await right.call("double", 21) == 42
    with pytest.raises(RemoteError, match="ValueError: no"):
        await left.call("broken")
    with pytest.raises(RemoteError, match="no such call"):
        await left.call("nothing")
    with pytest.raises(trio.TooSlowError):
        await left.call("slow", timeout=0.05)
    stall.set()
    await trio.sleep(0.01)
    assert left.late == 1                  # its answer came after the call gave up: dropped
    # many calls at once share the writer's sends and all get their own answer
    results = {}

    async def one(i):
        results[i] = await left.call("add", [i, i])

    async with trio.open_nursery() as calls:
        for i in range(200):
            calls.start_soon(one, i)
    assert results == {i: 2 * i for i in range(200)}
    trio.lowlevel.notify_closing(right_stream)
    right_stream.close()
    with trio.fail_after(2):
        await left.closed.wait()
    with pytest.raises(PeerGone):
        await left.call("add", [1])
    assert not left.notify_nowait("x")


# --- the host limiter over the channel -------------------------------------------------------------

async def host_and_worker(nursery):
    """The supervisor's counters behind a real socket pair; -> them, the worker's limiter, and the
    supervisor's end of the pair."""
    supervisor_side, worker_side = pair()
    host = HostLimiter(Limits())
    await nursery.start(Peer(supervisor_side, limits.handlers(host)).run)
    peer = Peer(worker_side, {})
    await nursery.start(peer.run)
    return host, limits.WorkerLimiter(peer, Limits()), supervisor_side


async def test_fifty_concurrent_admits_through_the_supervisor_never_overrun(nursery):
    host, worker, _ = await host_and_worker(nursery)
    key = Principal("k", None, rpm=20)
    outcomes: list[str] = []

    async def one():
        try:
            await worker.admit(key, Estimate(10, 0.0))
            outcomes.append("ok")
        except RateLimited as exc:
            assert exc.code == "rate_limit_rpm" and exc.retry_after
            outcomes.append("429")

    async with trio.open_nursery() as requests:
        for _ in range(50):
            requests.start_soon(one)
    assert Counter(outcomes) == {"ok": 20, "429": 30}
    assert host.local.admitted == 20


async def test_settle_corrects_the_hosts_tokens_and_a_key_without_limits_stays_home(nursery):
    host, worker, _ = await host_and_worker(nursery)
    key = Principal("k", None, tpm=1000, budget_usd=1.0, budget_period="day")
    res = await worker.admit(key, Estimate(600, 0.5))
    assert res is not None and res.tokens == 600
    await worker.settle(res, 100, 0.01)
    await trio.sleep(0.05)
    used = host.local.usage("k", host.clock())
    assert used["tpm"] == 100 and used["spent_usd"] == pytest.approx(0.01)
    assert await worker.admit(Principal("free", None), Estimate(10**6, 100.0)) is None
    assert worker.calls == 1


async def test_no_supervisor_means_503_not_a_free_pass(nursery):
    _host, worker, supervisor_end = await host_and_worker(nursery)
    trio.lowlevel.notify_closing(supervisor_end)      # the supervisor goes away
    supervisor_end.close()
    with trio.fail_after(2):
        await worker.peer.closed.wait()
    with pytest.raises(LimitsUnavailable):
        await worker.admit(Principal("k", None, rpm=5), Estimate(1, 0.0))


# --- merging the workers' answers -----------------------------------------------------------------

def test_docs_merge_counts_average_rates_and_show_the_worst_breaker():
    a = {"generation": 2, "store_ok": True, "usage": {"written": 3, "queued": 1},
         "targets": {"m": {"strategy": "scored", "deployments": [
             {"deployment": "m@a", "requests": 10, "in_flight": 1, "breaker": "closed", "predicted_s": 0.2,
              "reopens_in_s": None}]}}}
    b = {"generation": 2, "store_ok": False, "usage": {"written": 4, "queued": 0},
         "targets": {"m": {"strategy": "scored", "deployments": [
             {"deployment": "m@a", "requests": 5, "in_flight": 0, "breaker": "open", "predicted_s": 0.4,
              "reopens_in_s": 3.0}]}}}
    merged = merge_docs([a, b])
    assert merged["generation"] == 2 and merged["store_ok"] is False
    assert merged["usage"] == {"written": 7, "queued": 1}
    (row,) = merged["targets"]["m"]["deployments"]
    assert (row["requests"], row["in_flight"], row["breaker"], row["breakers"]) == (15, 1, "open", ["closed", "open"])
    assert row["predicted_s"] == pytest.approx(0.3) and row["reopens_in_s"] == 3.0
    assert merge_docs([{"generation": 1}, {"generation": 2}])["generation"] == [1, 2]   # a disagreement shows


def test_metric_families_add_up_but_generation_and_up_do_not():
    def worker(requests, generation, up, observed):
        c = MetricCounter("hxgwd_requests", "r", ("status",))
        c.inc(("2xx",), requests)
        h = Histogram("hxgwd_overhead_seconds", "o", (), (0.001, 0.01))
        h.observe((), observed)
        return [family_doc(f) for f in (c, h, Gauge("hxgwd_config_generation", "g", values=[((), generation)]),
                                        Gauge("hxgwd_deployment_up", "u", ("deployment",), [(("d",), up)]))]

    fams = {f.name: f for f in merge_families([worker(3, 2, 1.0, 0.0005), worker(4, 2, 0.0, 0.005)])}
    assert fams["hxgwd_requests"].values == {("2xx",): 7}
    assert fams["hxgwd_overhead_seconds"].series[()] == [1.0, 1.0, 0.0, pytest.approx(0.0055)]
    assert fams["hxgwd_config_generation"].values == {(): 2}
    assert fams["hxgwd_deployment_up"].values == {("d",): 0.0}


# --- shares, backoff, the setting, spools ---------------------------------------------------------

@pytest.mark.parametrize("amount,count", [(10, 2), (7, 3), (64, 16), (1, 1), (100, 7)])
def test_worker_shares_add_up_to_the_cap(amount, count):
    assert sum(worker_share(amount, i, count) for i in range(count)) == amount


def test_a_cap_below_the_worker_count_gives_each_one_and_no_cap_stays_none():
    assert [worker_share(1, i, 3) for i in range(3)] == [1, 1, 1]
    assert worker_share(0, 1, 2) == 0


def test_backoff_doubles_resets_after_a_stable_run_and_a_crash_loop_is_named():
    slot = Slot(0)
    waits = [slot.died("exit status 1", t) for t in (0.0, 1.0, 2.0, 3.0)]
    assert waits == [RESTART_MIN, RESTART_MIN * 2, RESTART_MIN * 4, RESTART_MIN * 8] and not slot.looping
    slot.died("exit status 1", 4.0)
    assert slot.looping and slot.restarts == CRASH_LOOP
    for t in range(5, 20):
        slot.died("exit status 1", float(t))
    assert slot.backoff == RESTART_MAX
    slot.serving_since = 100.0
    assert slot.died("killed by SIGKILL", 100.0 + STABLE_AFTER) == RESTART_MIN


def test_workers_setting_takes_auto_or_a_count():
    base = '[[backends]]\nname = "e"\nkind = "echo"\n[[models]]\nname = "m"\nbackend = "e"\n[database]\nurl = ""\n'
    assert load.loads('[server]\nworkers = "auto"\n' + base).server.workers == "auto"
    assert load.loads("[server]\nworkers = 3\n" + base).server.workers == 3
    assert load.loads(base).server.workers == 1
    for bad, said in (("0", "server.workers: must be"), ('"many"', "must be one of 'auto'"),
                      ("true", "expected an integer or 'auto'"), ("1.5", "expected an integer or 'auto'")):
        with pytest.raises(ConfigError) as raised:
            load.loads(f"[server]\nworkers = {bad}\n" + base)
        assert any(said in p for p in raised.value.problems), raised.value.problems
    assert worker_count("auto") == len(os.sched_getaffinity(0)) and worker_count(2) == 2


def test_spools_of_workers_that_are_gone_are_taken_over(tmp_path):
    db = Database(url=f"sqlite:///{tmp_path}/u.db")
    base = f"{tmp_path}/u.db-spool"
    for n in range(5):
        os.makedirs(f"{base}/worker-{n}")
    assert adopted_spool_dirs(db, 0, 2) == (base, f"{base}/worker-2", f"{base}/worker-4")
    assert adopted_spool_dirs(db, 1, 2) == (f"{base}/worker-3",)
    single = adopted_spool_dirs(db)
    assert [d for d in single if "worker-" in d] == [f"{base}/worker-{n}" for n in range(5)]


def test_a_worker_ahead_of_the_others_lets_them_accept_first():
    counts, fd = ConnectionCounts.create(3)
    try:
        w0, w1 = counts.of(0), counts.of(1)        # worker 2 is not serving: GONE, never deferred to
        assert not w0.ahead() and not w1.ahead()
        for _ in range(2):
            w0.opened()
        assert w0.ahead() and not w1.ahead()       # 2 against 0
        for _ in range(16):
            w1.opened()
        for _ in range(16):
            w0.opened()
        assert not w0.ahead()                      # 18 against 16: within 1/8
        w0.opened()
        w0.opened()
        w0.opened()
        assert w0.ahead()                          # 21 against 16
        w0.closed()
        w0.closed()
        w0.closed()
        assert (counts.get(0), counts.get(1), counts.get(2)) == (18, 16, GONE)
        assert not counts.of(0).ahead() and counts.get(0) == 0     # a new worker in the slot starts at 0
    finally:
        os.close(fd)


def test_more_workers_than_cpus_is_a_warning(tmp_path):
    from hxgwd.config.check import warnings
    base = '[[backends]]\nname = "e"\nkind = "echo"\n[[models]]\nname = "m"\nbackend = "e"\n[database]\nurl = ""\n'
    cpus = len(os.sched_getaffinity(0))
    many = load.loads(f"[server]\nworkers = {cpus + 1}\n" + base)
    assert any(f"more than the {cpus} CPUs" in w for w in warnings(str(tmp_path / "none.toml"), many))
    assert not any("CPUs" in w for w in warnings(str(tmp_path / "none.toml"), load.loads('[server]\nworkers = "auto"\n' + base)))


def test_the_fullest_workers_spool_is_the_hosts():
    def worker(spooled):
        return [family_doc(Gauge("hxgwd_usage_spool_bytes", "b", values=[((), spooled)])),
                family_doc(Gauge("hxgwd_usage_spool_max_bytes", "m", values=[((), 100.0)]))]

    fams = {f.name: f for f in merge_families([worker(90.0), worker(0.0)])}
    assert fams["hxgwd_usage_spool_bytes"].values[()] / fams["hxgwd_usage_spool_max_bytes"].values[()] == 0.9
