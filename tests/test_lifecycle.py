"""The daemon as a process: SIGHUP reloads, SIGTERM drains, exit codes."""

from __future__ import annotations

import os
import signal
import sqlite3

import httpx
import pytest
import trio

from hxgwd.config import load
from hxgwd.http import resolve_parser
from hxgwd.lifecycle import needs_restart
from tests.conftest import AUTH, HTTP_PARSER, gateway_config, start_gateway
from tests.daemon import DaemonProcess
from tests.fakeupstream import FakeUpstream, Reply, Stream

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def config(upstream: FakeUpstream, extra_model: str = "") -> str:
    return gateway_config(f"""
        [[backends]]
        name = "up"
        url = "{upstream.url}"
        [[models]]
        name = "m"
        backend = "up"
    """, extra_model)


@pytest.fixture
async def setup(nursery, tmp_path):
    up = FakeUpstream()
    await nursery.start(up.serve)
    path = tmp_path / "hxgwd.toml"
    path.write_text(config(up))
    daemon = DaemonProcess(str(path))
    await daemon.start(nursery)
    yield up, path, daemon
    daemon.kill()


async def test_sighup_reloads_and_bad_file_keeps_old(setup):
    up, path, daemon = setup
    async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH) as client:
        assert (await client.get("/healthz")).json()["generation"] == 1
        path.write_text(config(up, '[[models]]\nname = "m2"\nbackend = "up"\n'))
        mark = len(daemon.lines)
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for("config reloaded", after=mark)
        assert (await client.get("/healthz")).json()["generation"] == 2
        assert "m2" in [m["id"] for m in (await client.get("/v1/models")).json()["data"]]

        path.write_text(config(up).replace('name = "up"', 'name = "up"\nbogus = 1'))
        mark = len(daemon.lines)
        daemon.signal(signal.SIGHUP)
        rejected = await daemon.wait_for("reload rejected, still serving the previous config", after=mark)
        assert any("bogus" in p for p in rejected["problems"])
        assert (await client.get("/healthz")).json()["generation"] == 2
        assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "m2"})).status_code == 200


async def test_restart_only_settings_are_logged(setup):
    up, path, daemon = setup
    path.write_text(config(up).replace('listen = ["127.0.0.1:0"]', 'listen = ["127.0.0.1:1"]'))
    mark = len(daemon.lines)
    daemon.signal(signal.SIGHUP)
    line = await daemon.wait_for("changed setting takes effect only after a restart", after=mark)
    assert line["setting"] == "server.listen"
    path.write_text(config(up))          # back to what it listens on: nothing waits for a restart
    mark = len(daemon.lines)
    daemon.signal(signal.SIGHUP)
    await daemon.wait_for("config reloaded", after=mark)
    assert [line for line in daemon.lines[mark:] if line["level"] == "warning"] == []


async def test_stream_in_flight_survives_reload(setup):
    up, path, daemon = setup
    up.script(Stream(words=6, delay=0.2))
    async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH, timeout=30) as client:
        async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "model": "m", "stream": True}) as r:
            chunks = []
            async for chunk in r.aiter_raw():
                if not chunks:   # mid-stream: a reload that removes the model altogether
                    path.write_text(gateway_config('[[backends]]\nname = "e"\nkind = "echo"\n'
                                                   '[[models]]\nname = "other"\nbackend = "e"\n'))
                    daemon.signal(signal.SIGHUP)
                chunks.append(chunk)
        assert b"".join(chunks).endswith(b"data: [DONE]\n\n")
        await daemon.wait_for("config reloaded")
        assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "m"})).status_code == 404


async def test_sigterm_drains_in_flight_then_exits_0(setup):
    up, path, daemon = setup
    up.script(Reply(delay=1.0))
    async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH, timeout=30) as client:
        async with trio.open_nursery() as n:
            result = {}

            async def slow():
                result["r"] = await client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
            n.start_soon(slow)
            with trio.fail_after(5):
                while not up.in_flight:
                    await trio.sleep(0.01)
            daemon.signal(signal.SIGTERM)
            await daemon.wait_for("draining")
            with pytest.raises(httpx.ConnectError):      # listeners are closed at once
                await httpx.AsyncClient().get(daemon.url + "/healthz")
        assert result["r"].status_code == 200
    assert await daemon.wait() == 0


async def test_second_signal_forces_exit_3(setup):
    up, path, daemon = setup
    up.script(Reply(delay=60))
    async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH, timeout=30) as client:
        async with trio.open_nursery() as n:
            async def stuck():
                try:
                    await client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
                except httpx.HTTPError:
                    pass
            n.start_soon(stuck)
            with trio.fail_after(5):
                while not up.in_flight:
                    await trio.sleep(0.01)
            daemon.signal(signal.SIGINT)
            daemon.signal(signal.SIGINT)        # a Ctrl-C echo: ignored
            await daemon.wait_for("draining")
            await trio.sleep(0.8)
            assert daemon.proc.returncode is None
            daemon.signal(signal.SIGINT)        # an operator insisting
            assert await daemon.wait(10) == 3


async def test_bad_config_at_start_exits_78_and_busy_port_71(nursery, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nlisten = 5\n")
    daemon = DaemonProcess(str(bad))
    await daemon.start(nursery, wait_listening=False)
    assert await daemon.wait() == 78
    with trio.socket.socket() as holder:
        await holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        busy = tmp_path / "busy.toml"
        busy.write_text(gateway_config('[[backends]]\nname = "e"\nkind = "echo"\n').replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        daemon = DaemonProcess(str(busy))
        await daemon.start(nursery, wait_listening=False)
        assert await daemon.wait() == 71


async def test_spool_in_use_or_unusable_exits_73(nursery, tmp_path):
    (tmp_path / "file").write_text("")
    config = gateway_config('[[backends]]\nname = "e"\nkind = "echo"\n', database=f"sqlite:///{tmp_path}/hx.db")
    first_path, taken_path, broken_path = tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "c.toml"
    first_path.write_text(config.replace("key_refresh = 0.2", f'key_refresh = 0.2\nspool_dir = "{tmp_path}/spool"'))
    taken_path.write_text(first_path.read_text())
    broken_path.write_text(config.replace("key_refresh = 0.2", f'key_refresh = 0.2\nspool_dir = "{tmp_path}/file/spool"'))
    first = DaemonProcess(str(first_path))
    await first.start(nursery)
    for path, why in ((taken_path, "in use by another hxgwd"), (broken_path, "unusable")):
        daemon = DaemonProcess(str(path))
        await daemon.start(nursery, wait_listening=False)
        assert await daemon.wait() == 73
        (line,) = [line for line in daemon.lines if line["level"] == "error"]
        assert line["msg"] == "cannot start: usage spool" and why in line["error"]
    first.signal(signal.SIGTERM)
    assert await first.wait() == 0


async def test_sigterm_works_while_a_reload_is_stuck_reading_the_config(setup):
    up, path, daemon = setup
    path.unlink()
    os.mkfifo(path)                     # whoever opens it waits for a writer that never comes
    daemon.signal(signal.SIGHUP)
    await trio.sleep(0.5)
    async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH, timeout=10) as client:
        assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "m"})).status_code == 200
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(10) == 0


async def test_second_signal_cuts_a_stuck_usage_flush_and_exits_3(nursery, tmp_path):
    db = tmp_path / "hx.db"
    path = tmp_path / "hxgwd.toml"
    path.write_text(gateway_config('[[backends]]\nname = "e"\nkind = "echo"\n[[models]]\nname = "m"\nbackend = "e"\n',
                                   database=f"sqlite:///{db}"))
    daemon = DaemonProcess(str(path))
    await daemon.start(nursery)
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")     # the usage writer waits for it (busy timeout)
    try:
        async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH, timeout=10) as client:
            for _ in range(3):
                assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "m"})).status_code == 200
        daemon.signal(signal.SIGTERM)
        await daemon.wait_for("draining")
        await trio.sleep(1.0)           # past the Ctrl-C echo window, into the flush
        assert daemon.proc.returncode is None
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(3) == 3
        assert daemon.lines[-1]["msg"] == "stopped" and daemon.lines[-1]["forced"] is True
    finally:
        lock.close()


async def test_a_reload_gives_up_on_a_read_that_never_returns(tmp_path, autojump_clock):
    from hxgwd.lifecycle import RELOAD_TIMEOUT, Daemon
    from hxgwd.logs import Logger
    from hxgwd.runtime import RuntimeHolder, compile_config
    from hxgwd.config import load
    from tests.conftest import CapturedLog

    text = gateway_config('[[backends]]\nname = "e"\nkind = "echo"\n')
    fifo = tmp_path / "hxgwd.toml"
    os.mkfifo(fifo)
    log = CapturedLog()
    daemon = Daemon(RuntimeHolder(compile_config(load.loads(text), 1, environ={})), Logger(out=log),
                    config_path=str(fifo))
    began = trio.current_time()
    assert await daemon.reload() is False              # gave up, still on generation 1
    assert trio.current_time() - began >= RELOAD_TIMEOUT
    assert await daemon.reload() is False              # the first read still blocks: not another
    assert [line["msg"] for line in log.lines()] == [
        "reload rejected, still serving the previous config",
        "reload refused: an earlier one is still blocked reading the config"]
    writer = os.open(fifo, os.O_WRONLY)                 # the stuck read gets its file at last
    os.write(writer, text.encode())
    os.close(writer)
    with trio.fail_after(RELOAD_TIMEOUT * 2):
        while daemon.reloads.stuck:
            await trio.sleep(0.01)
    assert daemon.holder.current.generation == 1


def test_a_parser_change_waits_for_a_restart():
    # the upstream side reads with the same parser, and a connection keeps the one it began with
    backends = '[[backends]]\nname = "e"\nkind = "echo"\n[[models]]\nname = "m"\nbackend = "e"\n'
    old = load.loads(gateway_config(backends).replace('http_parser = "', 'http_parser = "h11" # "'))
    new = load.loads(gateway_config(backends).replace('http_parser = "', 'http_parser = "auto" # "'))
    assert needs_restart(old, new) == ["server.http_parser"]
    assert needs_restart(new, new) == []


async def test_the_gateway_reads_with_the_configured_parser(nursery):
    backends = '[[backends]]\nname = "e"\nkind = "echo"\n[[models]]\nname = "m"\nbackend = "e"\n'
    gw = await start_gateway(nursery, gateway_config(backends))
    assert (await gw.client.get("/healthz")).status_code == 200
    listening = next(line for line in gw.log.lines() if line["msg"] == "listening")
    assert listening["http_parser"] == resolve_parser(HTTP_PARSER)
    await gw.stop()
