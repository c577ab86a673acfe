"""A real daemon killed with SIGKILL under load keeps every finished request's usage record
(issue 14.7), and the start: two instances in one folder, a refused start that makes nothing
(issue 14.11)."""

from __future__ import annotations

import os
import sqlite3
import time

import httpx
import trio

from tests.conftest import AUTH, gateway_config
from tests.daemon import DaemonProcess
from tests.fakeupstream import FakeUpstream
from tests.test_store_gateway import CHAT, backends

CONNECTIONS = 16
LOAD_SECONDS = 3.0


def sqlite_config(up: FakeUpstream, db, extra: str = "") -> str:
    return gateway_config(backends(up), database=f"sqlite:///{db}") + extra


async def test_kill_9_under_load_loses_only_requests_in_flight(nursery, tmp_path):
    up = FakeUpstream()
    await nursery.start(up.serve)
    db = tmp_path / "hx.db"
    config = tmp_path / "hx.toml"
    config.write_text(sqlite_config(up, db))
    daemon = DaemonProcess(str(config))
    await daemon.start(nursery)
    answered = 0
    stop_at = time.monotonic() + LOAD_SECONDS

    async def client() -> None:
        nonlocal answered
        async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH, timeout=10) as http:
            while time.monotonic() < stop_at:
                try:
                    reply = await http.post("/v1/chat/completions", json={**CHAT, "model": "m"})
                except httpx.HTTPError:
                    return          # the daemon is gone
                if reply.status_code == 200:
                    answered += 1

    try:
        with trio.fail_after(LOAD_SECONDS + 20):
            async with trio.open_nursery() as clients:
                for _ in range(CONNECTIONS):
                    clients.start_soon(client)
                await trio.sleep(LOAD_SECONDS - 0.5)    # mid-load: requests in flight
                daemon.kill()
        assert await daemon.wait(10) == -9
    finally:
        daemon.kill()
    assert answered > 200, answered          # enough load for the memory window to matter

    second = DaemonProcess(str(config))
    await second.start(nursery)             # replays what the first one journaled
    try:
        with trio.fail_after(20):
            while True:
                with sqlite3.connect(db) as conn:
                    stored = conn.execute("SELECT count(*) FROM usage WHERE status = 200").fetchone()[0]
                if stored >= answered:
                    break
                await trio.sleep(0.1)
    except trio.TooSlowError:
        pass
    finally:
        second.kill()
    assert stored >= answered - CONNECTIONS, (stored, answered)


async def test_two_daemons_with_databases_side_by_side_both_start(nursery, tmp_path):
    up = FakeUpstream()
    await nursery.start(up.serve)
    daemons = []
    try:
        for name in ("a", "b"):
            config = tmp_path / f"{name}.toml"
            config.write_text(sqlite_config(up, tmp_path / f"{name}.db"))
            daemon = DaemonProcess(str(config))
            await daemon.start(nursery)
            daemons.append(daemon)
        for daemon in daemons:
            async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH) as http:
                assert (await http.post("/v1/chat/completions", json={**CHAT, "model": "m"})).status_code == 200
    finally:
        for daemon in daemons:
            daemon.kill()


async def test_a_start_refused_for_a_spool_in_use_creates_no_database(nursery, tmp_path):
    up = FakeUpstream()
    await nursery.start(up.serve)
    first_cfg, second_cfg = tmp_path / "a.toml", tmp_path / "b.toml"
    first_cfg.write_text(_with_spool(sqlite_config(up, tmp_path / "a.db"), tmp_path / "spool"))
    second_cfg.write_text(_with_spool(sqlite_config(up, tmp_path / "b.db"), tmp_path / "spool"))
    first = DaemonProcess(str(first_cfg))
    await first.start(nursery)
    try:
        before = sorted(os.listdir(tmp_path))
        second = DaemonProcess(str(second_cfg))
        await second.start(nursery, wait_listening=False)
        assert await second.wait() == 73
        assert sorted(os.listdir(tmp_path)) == before      # no b.db, no -wal, nothing
    finally:
        first.kill()


def _with_spool(config: str, spool) -> str:
    return config.replace("[database]\n", f'[database]\nspool_dir = "{spool}"\n', 1)
