"""GET /status with `[server] workers`: the page answers for the whole host. Two workers' status
documents merged without processes (what adds up, what is averaged, what is the supervisor's),
then a real daemon with two workers, both serving, whose page counts every request of the host."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import textwrap
import time

import httpx
import pytest
import trio

from hxgwd.config import load
from hxgwd.idle import IdleWork
from hxgwd.limits.limiter import HostLimiter
from hxgwd.logs import Logger
from hxgwd.pipeline.context import GatewayContext
from hxgwd.pipeline.record import RequestRecord
from hxgwd.pipeline.route import BreakerChange, Router
from hxgwd.runtime import RuntimeHolder, compile_config
from hxgwd.services import Services
from hxgwd.status_document import FAILURES_KEPT, merge_status, status_document
from hxgwd.status_page import render
from hxgwd.upstream.gates import Gates
from hxgwd.upstream.transports import Transports
from hxgwd.workers.worker import shares
from hxgwd.workers import views
from hxgwd.workers.supervisor import Supervisor
from tests.daemon import DaemonProcess

CONFIG = """
    [server]
    listen = ["127.0.0.1:0"]
    [[backends]]
    name = "a"
    url = "http://127.0.0.1:9"
    [[backends]]
    name = "b"
    url = "http://127.0.0.1:9"
    [[models]]
    name = "m-a"
    backend = "a"
    max_concurrency = 8
    [[models]]
    name = "m-b"
    backend = "b"
    [groups.g]
    models = ["m-a", "m-b"]
    strategy = "priority"
"""


def context(index: int = 0, count: int = 1) -> GatewayContext:
    """Worker `index` of `count`'s, compiled with its share of the caps, as a worker does."""
    rt = compile_config(shares(index, count)(load.loads(textwrap.dedent(CONFIG))), 1, environ={})
    return GatewayContext(RuntimeHolder(rt), Router(), Transports(), Gates(), Services(HostLimiter(rt.config.limits)),
                          Logger(out=io.BytesIO()), IdleWork(lambda where, exc: None))


def failure(ts: float, rid: str) -> RequestRecord:
    return RequestRecord(ts=ts, request_id=rid, key=None, endpoint="/v1/chat/completions", model="m-a", group=None,
                         deployment="m-a@a", backend="a", status=502, error_type="upstream_error",
                         cause="m-a@a: connect refused")


def row(doc: dict, target: str, deployment: str) -> dict:
    return next(r for r in doc["targets"][target]["deployments"] if r["deployment"] == deployment)


def two_workers() -> list[dict]:
    """Two workers' documents, as they come over the control channel (JSON)."""
    docs = []
    for index in range(2):
        ctx = context(index, 2)
        for n in range(40):                           # 80 failures in all: more than one page keeps
            ctx.failures.add(failure(1000.0 + 2 * n + index, f"w{index}-{n}"))
        if index == 1:                                # worker 1's breaker of m-a@a opened; worker 0's closed again
            ctx.router.last_change["m-a@a"] = BreakerChange("m-a@a", "a", "closed", "open", "2 consecutive failures",
                                                            "connect refused")
        else:
            ctx.router.last_change["m-a@a"] = BreakerChange("m-a@a", "a", "half-open", "closed", "probe ok", None)
        doc = json.loads(json.dumps(status_document(ctx, ctx.holder.current, 0.0, 2000.0 + index)))
        for target in ("m-a", "g"):
            r = row(doc, target, "m-a@a")
            r.update(requests=10 * (index + 1), in_flight=index + 1, error_rate=0.1 * (index + 1),
                     breaker="open" if index else "closed", observations=5)
            r["latency"]["intercept_s"] = 0.2 * (index + 1)
        doc["stats"]["limits"] = {"backend": "host", "calls": 7, "failures": 0, "settles_dropped": 0}
        doc["gates"] = {"m-a@a": {"limit": 4, "in_use": index, "waiting": 0, "rejected": 0}}
        doc["started_at"] = 1500.0 + index
        docs.append(doc)
    return docs


HOST = {"started_at": 100.0, "limits": {"backend": "local", "keys": 2, "admitted": 9, "settled": 9, "refused": {}},
        "last_reload": {"result": "ok", "at": 1900.0, "generation": 2, "problems": []},
        "config": {"generation": 2, "source": "/etc/hxgwd/hxgwd.toml", "loaded_at": 1900.0, "models": 2,
                   "deployments": 2, "backends": [["a", "http://127.0.0.1:9"], ["b", "http://127.0.0.1:9"]],
                   "database_url": None, "redis_url": None}}
WORKERS = [{"worker": i, "pid": 4000 + i, "serving": True, "generation": 1, "restarts": i, "last_exit": None,
            "crash_loop": False} for i in range(2)]


def test_two_workers_documents_merge_into_the_hosts():
    merged = merge_status(two_workers(), HOST, WORKERS)
    for target in ("m-a", "g"):
        r = row(merged, target, "m-a@a")
        assert r["requests"] == 30 and r["in_flight"] == 3                 # counts add up
        assert r["error_rate"] == pytest.approx(0.15)                       # rates are averaged...
        assert r["latency"]["intercept_s"] == pytest.approx(0.3)           # ...and so is the learned latency
        assert r["max_concurrency"] == 8           # each worker's share (4) adds up to the host's cap
        assert r["breaker"] == "open" and r["breakers"] == ["closed", "open"]
    assert merged["gates"]["m-a@a"] == {"limit": 8, "in_use": 1, "waiting": 0, "rejected": 0}   # shares add up
    # the failures: every worker's, newest first, as many as one process keeps
    failures = merged["failures"]
    assert len(failures) == FAILURES_KEPT and merged["failures_total"] == 80
    assert [f["request_id"] for f in failures[:3]] == ["w1-39", "w0-39", "w1-38"]
    assert [f["ts"] for f in failures] == sorted((f["ts"] for f in failures), reverse=True)
    # the open breaker's why, not the closed one's
    assert merged["breaker_changes"]["m-a@a"]["new"] == "open"
    # the supervisor's: uptime, last reload, config, the limiter's counters
    assert merged["started_at"] == 100.0 and merged["last_reload"]["generation"] == 2
    assert merged["config"]["source"] == "/etc/hxgwd/hxgwd.toml"
    assert merged["stats"]["limits"]["admitted"] == 9 and merged["stats"]["limits"]["workers"]["calls"] == 14
    assert [(w["worker"], w["answered"], w["started_at"]) for w in merged["workers"]] == [(0, True, 1500.0),
                                                                                         (1, True, 1501.0)]


def test_the_merged_page_shows_the_workers_and_the_host_wide_numbers():
    page = render(merge_status(two_workers(), HOST, WORKERS), 5, 2000.0)
    now = page.split('id="now"')[1].split("</section>")[0]
    assert '<span class="badge ok">serving, 2 of 2 workers</span>' in now
    assert "80 since start" in now and "(last 50)" in now and "<dd>32 min</dd>" in now     # the supervisor's uptime
    workers = page.split('id="workers"')[1].split("</section>")[0]
    assert workers.count("<tr>") == 3 and "<td>4000</td>" in workers and "<td>4001</td>" in workers
    deployments = page.split('id="deployments"')[1].split("</section>")[0]
    row_a = deployments.split("<tr>")[2]
    assert "m-a@a" in row_a and "<td>30</td>" in row_a and "<td>3 / 8</td>" in row_a
    assert "closed → open: 2 consecutive failures (connect refused)" in row_a
    limits = page.split('id="limits"')[1].split("</section>")[0]
    assert "kept by the supervisor for every worker" in limits


def test_a_worker_that_did_not_answer_is_shown_and_its_numbers_are_not_counted():
    docs = two_workers()
    workers = [dict(WORKERS[0]), {**WORKERS[1], "serving": False, "last_exit": "killed by SIGKILL"}]
    merged = merge_status([docs[0], None], HOST, workers)
    assert row(merged, "m-a", "m-a@a")["requests"] == 10
    assert [w["answered"] for w in merged["workers"]] == [True, False]
    page = render(merged, 5, 2000.0)
    assert '<span class="badge warn">serving, 1 of 2 workers</span>' in page
    workers_section = page.split('id="workers"')[1].split("</section>")[0]
    assert "killed by SIGKILL" in workers_section and "no answer" in workers_section
    with pytest.raises(LookupError):
        merge_status([None, None], HOST, workers)


def test_workers_that_disagree_on_a_setting_show_both_values():
    docs = two_workers()
    docs[1]["generation"] = 2
    row(docs[1], "m-a", "m-a@a")["strategy"] = "scored"
    page = render(merge_status(docs, HOST, WORKERS), 5, 2000.0)
    assert "generation 1 or 2 (the workers differ)" in page


async def test_the_status_view_through_the_supervisor_and_back():
    """views.host_view and merge_view, as supervisor._gather and WorkerHost.view call them."""
    ctx = context()
    supervisor = Supervisor(ctx.holder.current, Logger(out=io.BytesIO()), "hxgwd.toml", 2)   # not started
    supervisor.holder, supervisor.started_at = ctx.holder, 50.0
    for slot in supervisor.slots:
        slot.serving, slot.pid, slot.generation = True, 4000 + slot.index, 1
    ctx.holder.reloaded("rejected", ["server.listen: bad"])
    docs = [views.local_view("status", ctx, ctx.holder.current), None]
    gathered = {"workers": [{**w, "doc": d} for w, d in zip(supervisor.summaries(), docs)],
                "host": views.host_view("status", supervisor)}
    merged = views.merge_view("status", json.loads(json.dumps(gathered)))
    assert merged["last_reload"]["result"] == "rejected" and merged["last_reload"]["problems"] == ["server.listen: bad"]
    assert merged["started_at"] == 50.0 and merged["config"]["deployments"] == 2
    assert merged["stats"]["limits"]["backend"] == "local"
    assert "workers" in render(merged, 0, 100.0)


def test_a_worker_that_crash_looped_then_served_a_minute_is_no_longer_shown_as_crash_looping():
    from hxgwd.workers.slot import STABLE_AFTER, Slot

    slot = Slot(0, serving=True, serving_since=time.monotonic() - 1, looping=True)
    assert slot.summary()["crash_loop"]
    slot.serving_since = time.monotonic() - STABLE_AFTER - 1
    assert not slot.summary()["crash_loop"]
    slot.serving = False               # died again: what the next death works out holds until then
    assert slot.summary()["crash_loop"]


# --- a real daemon with two workers ---------------------------------------------------------------

ADMIN_KEY = "sk-hx-admin-workers-0123456789abcdef"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def test_status_of_a_daemon_with_two_workers_counts_the_whole_host(nursery, tmp_path):
    path = tmp_path / "hxgwd.toml"
    path.write_text(textwrap.dedent(f"""
        [server]
        listen = ["127.0.0.1:0"]
        workers = 2
        [database]
        url = "sqlite:///{tmp_path}/u.db"
        [[keys]]
        name = "ops"
        admin = true
        key_env = "HX_STATUS_ADMIN"
        [[backends]]
        name = "echo"
        kind = "echo"
        [[models]]
        name = "m"
        backend = "echo"
        """))
    os.chmod(path, 0o600)
    daemon = DaemonProcess(str(path), env={"HX_STATUS_ADMIN": ADMIN_KEY})
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        await daemon.start(nursery, wait_listening=False)
        ready = await daemon.wait_for("all workers serving", timeout=30)
        daemon.address = ready["addresses"][0]
        async with httpx.AsyncClient(base_url=daemon.url, timeout=10) as client:
            assert (await client.get("/healthz")).status_code == 200
        # the kernel hands each new connection to one of the workers: new ones until both served
        sent = 0
        with trio.fail_after(30):
            while {line.get("worker") for line in daemon.lines if line.get("msg") == "request"} != {0, 1} \
                    or sent < 6:
                async with httpx.AsyncClient(base_url=daemon.url, timeout=10, headers=auth) as client:
                    r = await client.post("/v1/chat/completions", json=CHAT)
                assert r.status_code == 200, r.text
                sent += 1
                await trio.sleep(0.01)
        served = [line["worker"] for line in daemon.lines if line.get("msg") == "request"]
        assert served.count(0) < sent and served.count(1) < sent        # each worker served only its part
        async with httpx.AsyncClient(base_url=daemon.url, timeout=10, headers=auth) as client:
            r = await client.get("/status?refresh=0")
        assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
        page = r.text
        assert '<span class="badge ok">serving, 2 of 2 workers</span>' in page
        workers = page.split('id="workers"')[1].split("</section>")[0]
        assert workers.count("<tr>") == 3 and workers.count('<span class="badge ok">serving</span>') == 2
        pids = {line["pid"] for line in daemon.lines if line.get("msg") == "worker serving"}
        assert len(pids) == 2 and all(f"<td>{pid}</td>" in workers for pid in pids)
        deployments = page.split('id="deployments"')[1].split("</section>")[0]
        cells = re.findall(r"<td>(.*?)</td>", deployments.split("<tr>")[2])
        assert "m@echo" in cells[0] and cells[4] == str(sent)      # requests: every worker's
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=30) == 0
    finally:
        daemon.kill()
