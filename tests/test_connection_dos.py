"""Clients that hold connections to starve others, through the whole gateway on real loopback
sockets with a small connection cap and short timeouts, so that each attack runs in seconds."""

from __future__ import annotations

import json

import trio

from tests.conftest import gateway_config, start_gateway

CAP = 8


def config(**server: float) -> str:
    settings = "".join(f"\n{name} = {value}" for name, value in {"max_connections": CAP, **server}.items())
    return gateway_config("""
        [[backends]]
        name = "e"
        kind = "echo"
        [[models]]
        name = "chat"
        backend = "e"
    """).replace('listen = ["127.0.0.1:0"]', 'listen = ["127.0.0.1:0"]' + settings)


def port_of(gw) -> int:
    return int(gw.url.rsplit(":", 1)[1])


async def test_keyless_clients_trickling_bodies_cannot_hold_the_connections(nursery):
    # Each declares a body small enough to be read and dropped after its 401, then sends a byte
    # now and then, within body_timeout: that held every slot for as long as the clients liked.
    gw = await start_gateway(nursery, config(header_timeout=2, body_timeout=1.5))
    port = port_of(gw)
    answers: list[bytes] = []
    cut_off = 0

    async def attacker() -> None:
        nonlocal cut_off
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 60000\r\n\r\n{")
        out = b""
        with trio.move_on_after(20):          # the test's own bound; the gateway must end it well before
            while True:
                try:
                    await stream.send_all(b" ")
                except trio.BrokenResourceError:
                    cut_off += 1
                    break
                with trio.move_on_after(0.5):
                    while chunk := await stream.receive_some(4096):
                        out += chunk
        answers.append(out)
        await stream.aclose()

    async with trio.open_nursery() as attack:
        for _ in range(2 * CAP):
            attack.start_soon(attacker)
        await trio.sleep(0.5)                 # every slot taken, the rest waiting in the backlog
        started = trio.current_time()
        health = await trio.open_tcp_stream("127.0.0.1", port)
        await health.send_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        with trio.fail_after(8):
            answer = await health.receive_some(4096)
        healthz_wait = trio.current_time() - started
        assert answer.startswith(b"HTTP/1.1 200")
        await health.aclose()
    print(f"healthz answered after {healthz_wait:.2f} s")
    assert cut_off == 2 * CAP                 # every attacker's connection was closed under it
    for out in answers:
        assert out.startswith(b"HTTP/1.1 401") and b"connection: close" in out.lower()
        assert set(json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]) == {"message", "type", "param", "code"}
    await gw.stop()


async def test_idle_connections_filling_the_cap_do_not_lock_out_a_new_client(nursery):
    # as many keep-alive connections as the cap allows, each idle after one request: a new client
    # is served at once, not after their keep-alive timeout
    gw = await start_gateway(nursery, config(keepalive_timeout=3600, header_timeout=3600))
    port = port_of(gw)
    held = []
    for _ in range(CAP):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        with trio.fail_after(5):
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")
        held.append(stream)
    for _ in range(CAP):
        started = trio.current_time()
        with trio.fail_after(2):
            r = await gw.client.get("/healthz")
        assert r.status_code == 200
    print(f"last new client served after {trio.current_time() - started:.3f} s")
    assert len(gw.life.idle_scopes) <= CAP
    for stream in held:
        await stream.aclose()
    await gw.stop()
