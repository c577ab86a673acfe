"""`[server] workers = 2` as real processes: a supervisor and two workers on one listener.

Each test starts `python -m hxgwd` (tests/daemon.py), drives it over fresh connections (the
kernel hands each to whichever worker accepts first, so both serve), and reads the JSON log,
where every worker's line carries `"worker": N`. Usage goes to a SQLite file in tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import sqlite3
import subprocess
import sys
from collections import Counter
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import AUTH, DEV_SHA, HTTP_PARSER
from tests.daemon import DaemonProcess
from tests.fakeupstream import FakeUpstream

ADMIN_KEY = "sk-hx-admin-5678"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
LIMITED_KEY = "sk-hx-limited-9012"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def workers_config(tmp_path: Any, *, delay: float = 0.0, extra: str = "", key_refresh: float = 0.2) -> str:
    return f"""
[server]
listen = ["127.0.0.1:0"]
http_parser = "{HTTP_PARSER}"
workers = 2
shutdown_grace = 5
[database]
url = "sqlite:///{tmp_path}/usage.db"
key_refresh = {key_refresh}
[[keys]]
name = "dev"
sha256 = "{DEV_SHA}"
[[keys]]
name = "admin"
key_env = "TEST_ADMIN_KEY"
admin = true
[[keys]]
name = "limited"
key_env = "TEST_LIMITED_KEY"
rpm = 20
[[backends]]
name = "echo"
kind = "echo"
echo_delay = {delay}
[[models]]
name = "m"
backend = "echo"
""" + extra


class Workers(DaemonProcess):
    """The daemon with workers: listening once all of them serve."""

    async def start(self, nursery: trio.Nursery, *, wait_listening: bool = True) -> None:
        await super().start(nursery, wait_listening=False)
        line = await self.wait_for("all workers serving", timeout=30)
        self.address = line["addresses"][0]

    def worker_pids(self) -> dict[int, int]:
        """The latest pid of each worker, from the supervisor's "worker serving" lines."""
        return {line["worker"]: line["pid"] for line in self.lines if line.get("msg") == "worker serving"}

    def served_by(self, after: int = 0) -> Counter[int]:
        return Counter(line["worker"] for line in self.lines[after:] if line.get("msg") == "request")


@pytest.fixture
async def start(nursery, tmp_path):
    started: list[Workers] = []

    async def run(text: str) -> Workers:
        path = tmp_path / "hxgwd.toml"
        path.write_text(text)
        daemon = Workers(str(path), env={"TEST_ADMIN_KEY": ADMIN_KEY, "TEST_LIMITED_KEY": LIMITED_KEY})
        started.append(daemon)
        await daemon.start(nursery)
        return daemon

    yield run
    for daemon in started:
        daemon.kill()


def fresh(url: str, headers: dict[str, str] = AUTH) -> httpx.AsyncClient:
    """A client that opens a connection per request: the kernel spreads them over the workers."""
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=30,
                             limits=httpx.Limits(max_keepalive_connections=0))


async def burst(client: httpx.AsyncClient, n: int, concurrency: int = 16,
                body: dict[str, Any] = CHAT) -> list[int | str]:
    """`n` chat requests, `concurrency` at a time: each status, or the exception's name."""
    statuses: list[int | str] = []
    limiter = trio.CapacityLimiter(concurrency)

    async def one() -> None:
        async with limiter:
            try:
                statuses.append((await client.post("/v1/chat/completions", json=body)).status_code)
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return statuses


def usage_rows(tmp_path: Any) -> Counter[int]:
    with sqlite3.connect(tmp_path / "usage.db") as db:
        return Counter(status for (status,) in db.execute(
            "SELECT status FROM usage WHERE endpoint = '/v1/chat/completions'"))


async def stop(daemon: Workers) -> int:
    daemon.signal(signal.SIGTERM)
    return await daemon.wait(timeout=40)


async def test_both_workers_serve_and_the_host_answers_as_one(start, tmp_path):
    daemon = await start(workers_config(tmp_path))
    mark = len(daemon.lines)
    async with fresh(daemon.url) as client:
        statuses = await burst(client, 200)
    assert statuses == [200] * 200
    await trio.sleep(0.3)          # access lines are written at the loop's next quiet moment
    served = daemon.served_by(mark)
    assert sum(served.values()) == 200 and min(served[0], served[1]) >= 10, served

    async with fresh(daemon.url, ADMIN) as admin:
        stats = (await admin.get("/admin/stats")).json()
        assert [w["worker"] for w in stats["workers"]] == [0, 1]
        assert all(w["serving"] and w["generation"] == 1 for w in stats["workers"])
        assert stats["generation"] == 1
        routing = (await admin.get("/admin/routing")).json()
        (row,) = routing["targets"]["m"]["deployments"]
        assert row["requests"] == 200 and len(row["breakers"]) == 2
        text = (await admin.get("/metrics")).text
        assert 'hxgwd_requests_total{endpoint="chat.completions",model="m",deployment="m@echo",status_class="2xx"} 200' in text
        assert 'hxgwd_workers{state="serving"} 2' in text
        assert 'hxgwd_worker_restarts_total{worker="1"} 0' in text
        assert 'hxgwd_worker_connections{worker="0"}' in text and 'hxgwd_worker_connections{worker="1"}' in text
        if shutil.which("promtool"):      # the merged scrape is as clean as one process's
            done = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True)
            assert done.returncode == 0, done.stdout + done.stderr
        health = (await admin.get("/healthz")).json()
        assert health["generation"] == 1 and health["worker"] in (0, 1)
    assert await stop(daemon) == 0
    assert usage_rows(tmp_path) == {200: 200}
    assert not [line for line in daemon.lines if line.get("level") == "error"]


async def test_sighup_under_load_fails_nothing_and_a_bad_file_changes_no_worker(start, tmp_path):
    text = workers_config(tmp_path, delay=0.02)
    daemon = await start(text)
    path = tmp_path / "hxgwd.toml"
    statuses: list[int | str] = []
    async with fresh(daemon.url) as client:
        async with trio.open_nursery() as nursery:
            async def load() -> None:
                for _ in range(6):
                    statuses.extend(await burst(client, 40, concurrency=8))
            nursery.start_soon(load)
            await trio.sleep(0.3)
            path.write_text(text + '[[models]]\nname = "m2"\nbackend = "echo"\n')
            mark = len(daemon.lines)
            daemon.signal(signal.SIGHUP)
            await daemon.wait_for("config reloaded", after=mark)
            await trio.sleep(0.3)
            path.write_text(text.replace('kind = "echo"', 'kind = "echo"\nbogus = 1'))
            bad = len(daemon.lines)
            daemon.signal(signal.SIGHUP)
            await daemon.wait_for("reload rejected, every worker still serves the previous config", after=bad)
        reloads = [line for line in daemon.lines[mark:] if line.get("event") == "reload"]
        # one line for each, from the supervisor; each worker logs the generation it switched to
        assert [(line["result"], line.get("worker")) for line in reloads] == [("ok", None), ("rejected", None)]
        assert sorted(reloads[0]["workers"]) == [0, 1]
        assert sorted((line["worker"], line["generation"]) for line in daemon.lines[mark:]
                      if line.get("msg") == "worker on a new generation") == [(0, 2), (1, 2)]
        assert statuses == [200] * 240
        # every worker serves generation 2, and m2
        assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "m2"})).status_code == 200
    async with fresh(daemon.url, ADMIN) as admin:
        stats = (await admin.get("/admin/stats")).json()
        assert [w["generation"] for w in stats["workers"]] == [2, 2]
        seen = {(await admin.get("/healthz")).json()["generation"] for _ in range(20)}
        assert seen == {2}
    assert await stop(daemon) == 0
    assert usage_rows(tmp_path) == {200: 241}


async def test_sigterm_drains_every_worker(start, tmp_path):
    daemon = await start(workers_config(tmp_path, delay=1.0))
    statuses: list[int | str] = []
    async with fresh(daemon.url) as client:
        async with trio.open_nursery() as nursery:
            async def load() -> None:
                statuses.extend(await burst(client, 12, concurrency=12))
            nursery.start_soon(load)
            await trio.sleep(0.4)
            daemon.signal(signal.SIGTERM)
            with trio.fail_after(20):
                status = await daemon.proc.wait()
    assert status == 0
    assert statuses == [200] * 12
    assert usage_rows(tmp_path) == {200: 12}
    assert [line["worker"] for line in daemon.lines if line.get("msg") == "worker stopped"] != []
    with pytest.raises(httpx.ConnectError):
        async with fresh(daemon.url) as client:
            await client.get("/healthz")


async def test_kill_9_of_a_worker_fails_only_its_requests_and_it_comes_back(start, tmp_path):
    daemon = await start(workers_config(tmp_path, delay=1.0))
    victim = daemon.worker_pids()[0]
    statuses: list[int | str] = []
    async with fresh(daemon.url) as client:
        async with trio.open_nursery() as nursery:
            async def load() -> None:
                statuses.extend(await burst(client, 48, concurrency=48))
            nursery.start_soon(load)
            await trio.sleep(0.5)       # every request waits in the echo's delay: none is mid-answer
            mark = len(daemon.lines)
            os.kill(victim, signal.SIGKILL)
        died = await daemon.wait_for("worker died: restarting", after=mark)
        assert died["worker"] == 0 and died["exit"] == "killed by SIGKILL"
        back = await daemon.wait_for("worker serving", after=mark, timeout=20)
        assert back["worker"] == 0 and back["pid"] != victim
        failed = [s for s in statuses if s != 200]
        assert 0 < len(failed) < 48, statuses     # the victim's requests, and only those
        assert statuses.count(200) + len(failed) == 48
        after = len(daemon.lines)
        assert await burst(client, 60) == [200] * 60
        await trio.sleep(0.3)
        assert daemon.served_by(after)[0] > 0        # the new worker 0 serves
    async with fresh(daemon.url, ADMIN) as admin:
        stats = (await admin.get("/admin/stats")).json()
        assert [w["restarts"] for w in stats["workers"]] == [1, 0]
        assert stats["workers"][0]["last_exit"] == "killed by SIGKILL"
        assert 'hxgwd_worker_restarts_total{worker="0"} 1' in (await admin.get("/metrics")).text
    assert await stop(daemon) == 0
    assert usage_rows(tmp_path) == {200: statuses.count(200) + 60}


async def test_rpm_holds_across_workers(start, tmp_path):
    daemon = await start(workers_config(tmp_path))
    mark = len(daemon.lines)
    async with fresh(daemon.url, {"Authorization": f"Bearer {LIMITED_KEY}"}) as client:
        statuses = []
        for _ in range(5):      # in waves: a worker may take a whole burst of connections at once
            statuses += await burst(client, 10, concurrency=10)
        statuses += await burst(client, 50, concurrency=50)
    assert Counter(statuses) == {200: 20, 429: 80}
    await trio.sleep(0.3)
    served = daemon.served_by(mark)
    assert served[0] > 0 and served[1] > 0, served      # both workers admitted or refused some
    async with fresh(daemon.url, ADMIN) as admin:
        limits = (await admin.get("/admin/stats")).json()["limits"]
        assert limits["backend"] == "local" and limits["admitted"] == 20
        assert limits["refused"]["rate_limit_rpm"] == 80
    assert await stop(daemon) == 0


async def test_a_revoked_store_key_is_refused_by_every_worker_at_once(start, tmp_path):
    daemon = await start(workers_config(tmp_path, key_refresh=600))    # only the broadcast can explain it
    async with fresh(daemon.url, ADMIN) as admin:
        made = await admin.post("/admin/keys", json={"name": "temp"})
        assert made.status_code == 201
        key = made.json()["key"]
        async with fresh(daemon.url, {"Authorization": f"Bearer {key}"}) as client:
            assert await burst(client, 30) == [200] * 30         # known to both workers at once
            assert (await admin.delete("/admin/keys/temp")).status_code == 200
            assert await burst(client, 30) == [401] * 30
    assert await stop(daemon) == 0


async def test_a_stored_response_is_found_whichever_worker_is_asked(start, tmp_path, nursery):
    up = FakeUpstream()          # keeps the responses it made (the echo backend is one per worker)
    await nursery.start(up.serve)
    daemon = await start(workers_config(tmp_path, extra=f"""
[[backends]]
name = "up"
url = "{up.url}"
[[models]]
name = "r"
backend = "up"
"""))
    async with fresh(daemon.url) as client:
        made = await client.post("/v1/responses", json={"model": "r", "input": "hi"})
        assert made.status_code == 200
        rid = made.json()["id"]
        mark = len(daemon.lines)
        limiter = trio.CapacityLimiter(16)        # connections at once: the workers share them out

        async def fetch() -> None:
            async with limiter:
                got = await client.get(f"/v1/responses/{rid}")
                assert got.status_code == 200 and got.json()["id"] == rid

        async with trio.open_nursery() as nursery:
            for _ in range(48):
                nursery.start_soon(fetch)
        await trio.sleep(0.3)
        assert len(daemon.served_by(mark)) == 2          # both workers answered it
    assert await stop(daemon) == 0


async def test_with_redis_the_workers_share_its_counters(start, tmp_path, redis_server):
    daemon = await start(workers_config(tmp_path, extra=f'[redis]\nurl = "{redis_server.url}"\n'))
    async with fresh(daemon.url, {"Authorization": f"Bearer {LIMITED_KEY}"}) as client:
        statuses = []
        for _ in range(5):
            statuses += await burst(client, 10, concurrency=10)
    assert Counter(statuses) == {200: 20, 429: 30}
    async with fresh(daemon.url, ADMIN) as admin:
        assert (await admin.get("/admin/stats")).json()["limits"]["backend"] == "redis"
    assert await stop(daemon) == 0


async def test_budgets_spent_before_a_restart_still_count_across_workers(start, tmp_path):
    text = workers_config(tmp_path).replace('[[backends]]\nname = "echo"', '[[keys]]\nname = "spender"\n'
                                             'key_env = "TEST_SPENDER_KEY"\nbudget_usd = 0.01\n'
                                             'budget_period = "day"\n[[backends]]\nname = "echo"', 1)
    text = text.replace('backend = "echo"\n', 'backend = "echo"\ninput_cost_per_1k = 0.5\n', 1)
    os.environ["TEST_SPENDER_KEY"] = spender = "sk-hx-spender-3456"
    try:
        daemon = await start(text)
        body = {**CHAT, "max_tokens": 1}
        async with fresh(daemon.url, {"Authorization": f"Bearer {spender}"}) as client:
            first = await burst(client, 20, concurrency=1, body=body)
        assert await stop(daemon) == 0
        # A 429 may come before the last 200: a request's settle travels to the supervisor beside
        # the next request's admission, which may see the previous reservation (its estimate)
        # instead of the real cost. Never the other way: the budget is never overrun.
        assert 0 < first.count(200) == usage_rows(tmp_path)[200] and set(first[-5:]) == {429}, first
        with sqlite3.connect(tmp_path / "usage.db") as db:
            (spent_usd,) = db.execute("SELECT sum(cost_usd) FROM usage WHERE key = 'spender'").fetchone()
        assert 0 < spent_usd <= 0.01
        daemon = await start(text)                          # the supervisor seeds the host's counters
        async with fresh(daemon.url, {"Authorization": f"Bearer {spender}"}) as client:
            assert set(await burst(client, 6, concurrency=3, body=body)) == {429}
        assert await stop(daemon) == 0
    finally:
        del os.environ["TEST_SPENDER_KEY"]


async def test_workers_stop_when_the_supervisor_is_killed(start, tmp_path):
    daemon = await start(workers_config(tmp_path))
    pids = list(daemon.worker_pids().values())
    daemon.kill()                                       # SIGKILL: it cannot drain them
    with trio.fail_after(15):
        while any(alive(pid) for pid in pids):
            await trio.sleep(0.05)
    assert any(line.get("msg") == "the supervisor is gone: draining" for line in daemon.lines)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:          # a zombie is dead
        return f.read().split(") ", 1)[1][0] != "Z"


async def test_sigterm_to_one_worker_recycles_it(start, tmp_path):
    daemon = await start(workers_config(tmp_path))
    old = daemon.worker_pids()[1]
    mark = len(daemon.lines)
    os.kill(old, signal.SIGTERM)
    line = await daemon.wait_for("worker stopped on its own: starting a new one", after=mark)
    assert line["worker"] == 1 and line["level"] == "info"
    back = await daemon.wait_for("worker serving", after=mark)
    assert back["worker"] == 1 and back["pid"] != old
    async with fresh(daemon.url) as client:
        assert await burst(client, 20) == [200] * 20
    assert await stop(daemon) == 0
    assert not [line for line in daemon.lines if line.get("level") == "error"]


async def test_a_replaced_program_file_restarts_the_daemon_whole(nursery, tmp_path):
    """An upgrade replaces the binary under a running supervisor: a worker it would start now runs
    the new file. It drains and exits 75 instead, for systemd to start the new version whole."""
    program = tmp_path / "python3"
    shutil.copy(os.path.realpath(sys.executable), program)
    path = tmp_path / "hxgwd.toml"
    path.write_text(workers_config(tmp_path))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = os.pathsep.join([repo, *site.getsitepackages()])
    daemon = Workers(str(path), env={"TEST_ADMIN_KEY": ADMIN_KEY, "TEST_LIMITED_KEY": LIMITED_KEY,
                                     "PYTHONPATH": pythonpath}, program=str(program))
    try:
        await daemon.start(nursery)
        replacement = tmp_path / "python3.new"
        shutil.copy(program, replacement)
        os.replace(replacement, program)          # as dpkg unpacks: a new file renamed over the old
        mark = len(daemon.lines)
        os.kill(daemon.worker_pids()[0], signal.SIGKILL)
        await daemon.wait_for("the program file changed (an upgrade?): stopping to be restarted whole", after=mark)
        assert await daemon.wait(timeout=40) == 75
    finally:
        daemon.kill()


async def test_connections_opened_at_once_are_spread_over_the_workers(start, tmp_path):
    """Both workers wake for a new connection and the first to run used to take what was queued:
    64 keep-alive connections ended 64/0 in a benchmark round. A worker ahead of the others now
    lets them accept first (workers/balance.py)."""
    daemon = await start(workers_config(tmp_path))
    host, port = daemon.address.rsplit(":", 1)
    for _ in range(3):
        held: list[trio.SocketStream] = []
        by_worker: Counter[int] = Counter()

        async def one() -> None:
            stream = await trio.open_tcp_stream(host, int(port))
            held.append(stream)
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(b"}"):
                data += await stream.receive_some(4096)
            by_worker[json.loads(data.split(b"\r\n\r\n", 1)[1])["worker"]] += 1

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(64):
                    nursery.start_soon(one)
        assert min(by_worker[0], by_worker[1]) >= 24, by_worker
        async with fresh(daemon.url, ADMIN) as admin:
            workers = (await admin.get("/admin/stats")).json()["workers"]
        assert sum(w["connections"] for w in workers) >= 64       # the admin's own may be one more
        for stream in held:
            await stream.aclose()
        await trio.sleep(0.2)
    assert await stop(daemon) == 0


async def test_a_stuck_worker_is_killed_and_restarted(start, tmp_path):
    daemon = await start(workers_config(tmp_path))
    stuck = daemon.worker_pids()[1]
    mark = len(daemon.lines)
    os.kill(stuck, signal.SIGSTOP)            # its loop runs no more: no accept, no answer, no ping
    line = await daemon.wait_for("worker stuck: no answer to pings, killing it", after=mark, timeout=20)
    assert line["worker"] == 1 and line["pid"] == stuck
    died = await daemon.wait_for("worker died: restarting", after=mark)
    assert died["exit"] == "killed by SIGKILL"
    back = await daemon.wait_for("worker serving", after=mark, timeout=20)
    assert back["worker"] == 1 and back["pid"] != stuck
    async with fresh(daemon.url) as client:
        assert await burst(client, 20) == [200] * 20
    assert await stop(daemon) == 0


async def test_every_worker_serves_tls_and_a_reload_rotates_the_certificate(start, tmp_path):
    from tests.test_tls_server import client_context, make_cert

    first, key = make_cert(tmp_path, "first", days=30)
    text = workers_config(tmp_path).replace("[server]\n", f'[server]\ntls_cert = "{first}"\ntls_key = "{key}"\n', 1)
    daemon = await start(text)
    url = daemon.url.replace("http:", "https:")
    mark = len(daemon.lines)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, verify=client_context(first), timeout=30,
                                 limits=httpx.Limits(max_keepalive_connections=0)) as client:
        assert await burst(client, 40) == [200] * 40
    await trio.sleep(0.3)
    assert len(daemon.served_by(mark)) == 2              # both workers did the handshake
    second, second_key = make_cert(tmp_path, "second", days=30)
    (tmp_path / "hxgwd.toml").write_text(text.replace(first, second).replace(key, second_key))
    mark = len(daemon.lines)
    daemon.signal(signal.SIGHUP)
    await daemon.wait_for("config reloaded", after=mark)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, verify=client_context(second), timeout=30,
                                 limits=httpx.Limits(max_keepalive_connections=0)) as client:
        assert await burst(client, 40) == [200] * 40     # new connections, whichever worker: the new one
    assert await stop(daemon) == 0
