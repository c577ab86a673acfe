"""The daemon as a process: SIGHUP reloads, SIGTERM drains, exit codes."""

from __future__ import annotations

import signal

import httpx
import pytest
import trio

from tests.conftest import AUTH, gateway_config
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
