"""The HTTP/1.1 layer over real loopback sockets, with a handler that knows nothing of OpenAI; every
test runs with each parser."""

from __future__ import annotations

import socket

import attrs
import pytest
import trio

from hxgwd.config.model import Server
from hxgwd.http.connection import LINGER_SECONDS, HttpConnection, Request, Response
from hxgwd.lifecycle import connection_settings
from hxgwd.http.listen import IdleConnections, accept_loop, open_listeners

PARSER = "h11"      # set for each test by the `parser` fixture


@pytest.fixture(autouse=True, params=["httptools", "h11"])
def parser(request, monkeypatch):
    monkeypatch.setitem(globals(), "PARSER", request.param)
    return request.param


@attrs.define
class Life:
    draining: bool = False
    idle_scopes: IdleConnections = attrs.field(factory=IdleConnections)
    errors: list = attrs.field(factory=list)
    refused: list = attrs.field(factory=list)

    def log_exception(self, where, exc):
        self.errors.append(exc)

    def log_refused(self, peer, status, code):
        self.refused.append((status, code))


async def echo_handler(request: Request, response: Response) -> None:
    if request.head.path == "/boom":
        raise RuntimeError("secret internals")
    if request.head.path == "/refuse":       # answers without reading the body, as a 401 does
        await response.send_full(401, [], b"no")
        return
    body = await request.read_body()
    await response.send_full(200, [(b"content-type", b"text/plain")], b"got:" + body)


async def start(nursery, handler=echo_handler, **settings) -> tuple[int, Life]:
    server = Server(listen=("127.0.0.1:0",), **settings)
    life = Life()
    (listener,) = await open_listeners(server.listen, 16)
    slots = trio.Semaphore(server.max_connections)

    conn_settings = connection_settings(server)

    async def serve(stream):
        await HttpConnection(stream, lambda: conn_settings, handler, life, parser=PARSER).run()

    nursery.start_soon(accept_loop, listener, slots, life.idle_scopes, nursery, serve, lambda exc: None)
    return listener.socket.getsockname()[1], life


async def talk(port: int, data: bytes, *, read_until_close: bool = True) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    out = b""
    with trio.move_on_after(120):
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            out += chunk
            if not read_until_close and out.count(b"\r\n\r\n") and b"got:" in out:
                break
    await stream.aclose()
    return out


POST = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"


async def test_keep_alive_two_requests_on_one_connection(nursery):
    port, _ = await start(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    for _ in range(2):
        await stream.send_all(POST)
        data = await stream.receive_some(4096)
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"got:abc")
    await stream.aclose()


async def test_body_too_large_413_by_length_and_chunked(nursery):
    port, _ = await start(nursery, max_body_bytes=10)
    out = await talk(port, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n" + b"a" * 11)
    assert out.startswith(b"HTTP/1.1 413")
    chunked = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + b"8\r\naaaaaaaa\r\n" * 3 + b"0\r\n\r\n"
    out = await talk(port, chunked)
    assert out.startswith(b"HTTP/1.1 413")


async def test_headers_too_large_431(nursery):
    port, _ = await start(nursery, max_header_bytes=1024)
    out = await talk(port, b"GET / HTTP/1.1\r\nHost: a\r\nX-A: " + b"a" * 4000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431")


async def test_malformed_400_and_close(nursery):
    port, life = await start(nursery)
    out = await talk(port, b"NOT HTTP AT ALL\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"connection: close" in out.lower()
    assert [status for status, _code in life.refused] == [400]     # logged: no access line comes for it


async def test_slow_headers_408(nursery, autojump_clock):
    port, _ = await start(nursery, header_timeout=5)
    out = await talk(port, b"GET / HTTP/1.1\r\nHost: a\r\n")     # never finishes its headers
    assert out.startswith(b"HTTP/1.1 408")


async def test_pipelined_partial_head_gets_the_header_timeout_not_the_keepalive(nursery, autojump_clock):
    # the start of a second request came with the first: the client owes us a head, and 408 says so
    port, _ = await start(nursery, header_timeout=5, keepalive_timeout=3600)
    with trio.fail_after(60):
        out = await talk(port, POST + b"GET / HTTP/1.1\r\nHost: a\r\n")
    first, second = out.split(b"got:abc", 1)
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 408")


async def test_a_long_pipeline_is_answered_in_order(nursery):
    port, _ = await start(nursery)
    requests = b"".join(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%d" % (len(str(i)), i)
                        for i in range(300))
    out = await talk(port, requests + b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in out.split(b"HTTP/1.1 ")[1:]]
    assert bodies == [b"got:%d" % i for i in range(300)] + [b"got:"]


async def test_connection_close_is_closed_once_answered(nursery, autojump_clock):
    # not after the body timeout: the client may read until the close, and the slot is freed
    port, _ = await start(nursery, body_timeout=30)
    for request, answer in ((b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", b"got:"),
                            (b"POST /x HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc", b"got:abc")):
        with trio.fail_after(1):
            out = await talk(port, request)
        assert out.startswith(b"HTTP/1.1 200") and out.endswith(answer)


async def test_content_length_and_chunked_together_is_refused_and_closed(nursery):
    # whatever sent both may frame the body otherwise: llhttp refuses it, and so do we with h11
    port, _ = await start(nursery)
    out = await talk(port, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n"
                           b"\r\n3\r\nabc\r\n0\r\n\r\n" + b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and out.count(b"HTTP/1.1") == 1
    assert b"connection: close" in out.lower()


@pytest.mark.parametrize("path, status", [("/refuse", b"401"), ("/x", b"413")])
async def test_a_large_body_left_unread_still_lets_the_client_read_the_answer(nursery, path, status):
    # closed under a client still sending, the kernel would reset the connection, answer and all
    port, _ = await start(nursery, max_body_bytes=1 << 20)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    body = b"a" * (8 << 20)           # more than the socket buffers hold
    with trio.fail_after(10):
        await stream.send_all(b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(body)))
        try:
            await stream.send_all(body)
        except trio.BrokenResourceError:
            pass                      # the gateway stopped reading: fine, once the answer is readable
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 " + status) and b"connection: close" in out.lower()


async def test_an_answer_before_the_body_closes_instead_of_waiting_for_it(nursery, autojump_clock):
    # read and dropped to keep the connection, a trickled body held the connection (and a slot)
    # for as long as the client liked, without a key; now the answer says close and means it
    port, _ = await start(nursery, body_timeout=30)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"POST /refuse HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    out = b""
    with trio.fail_after(LINGER_SECONDS + 1):
        while chunk := await stream.receive_some(4096):
            out += chunk
            await stream.send_all(b"d")          # still sending, within the body timeout
    assert out.startswith(b"HTTP/1.1 401") and b"connection: close" in out.lower()


async def test_an_answer_before_a_body_that_is_here_already_keeps_the_connection(nursery):
    # nothing to wait for: the body is dropped from the parser, and the client need not reconnect
    port, _ = await start(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"POST /refuse HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    out = await stream.receive_some(4096)
    assert out.startswith(b"HTTP/1.1 401") and b"connection: close" not in out.lower()
    await stream.send_all(POST)
    assert (await stream.receive_some(4096)).endswith(b"got:abc")
    await stream.aclose()


async def test_a_body_trickled_within_the_body_timeout_is_408_at_its_total_timeout(nursery, autojump_clock):
    port, _ = await start(nursery, body_timeout=5, body_total_timeout=12)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
    out = b""
    with trio.fail_after(12 + 1):
        with trio.move_on_after(100 * 4):
            while True:
                await stream.send_all(b"a")      # a byte every 4 s: never 5 s without one
                with trio.move_on_after(4):
                    if chunk := await stream.receive_some(4096):
                        out += chunk
                        break
    assert out.startswith(b"HTTP/1.1 408") and b"connection: close" in out.lower()


async def test_slow_body_408_closes_at_once(nursery, autojump_clock):
    port, _ = await start(nursery, body_timeout=5)
    with trio.fail_after(5 + 1):      # not 5 more seconds waiting for the rest of the body
        out = await talk(port, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    assert out.startswith(b"HTTP/1.1 408") and b"connection: close" in out.lower()


async def test_slow_body_408(nursery, autojump_clock):
    port, _ = await start(nursery, body_timeout=5)
    out = await talk(port, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    assert out.startswith(b"HTTP/1.1 408")


async def test_idle_keepalive_closed_silently(nursery, autojump_clock):
    port, _ = await start(nursery, keepalive_timeout=3)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(10):
        assert await stream.receive_some(100) == b""       # closed after 3 s, nothing sent


async def test_a_connection_that_never_sends_is_closed_after_the_header_timeout(nursery, autojump_clock):
    # not after the keep-alive timeout: it has no request yet, and holds a connection slot
    port, _ = await start(nursery, header_timeout=5, keepalive_timeout=3600)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(5 + 1):
        assert await stream.receive_some(100) == b""


async def test_the_first_head_is_due_header_timeout_after_the_connect(nursery, autojump_clock):
    # a first byte just before the deadline does not buy a whole header timeout more
    port, _ = await start(nursery, header_timeout=5, keepalive_timeout=3600)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await trio.sleep(4)
    await stream.send_all(b"GET / HTTP/1.1\r\n")
    with trio.fail_after(1 + 0.5):
        out = await stream.receive_some(4096)
    assert out.startswith(b"HTTP/1.1 408")


async def test_expect_100_continue(nursery):
    port, _ = await start(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    first = await stream.receive_some(4096)
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
    await stream.send_all(b"abc")
    rest = await stream.receive_some(4096)
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"got:abc")
    await stream.send_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n")
    assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")    # no body to invite
    await stream.aclose()


async def test_connection_cap_waits_in_backlog_while_every_connection_is_mid_request(nursery):
    port, _ = await start(nursery, max_connections=1)
    first = await trio.open_tcp_stream("127.0.0.1", port)
    await first.send_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nab")
    with trio.fail_after(5):
        assert (await first.receive_some(4096)).startswith(b"HTTP/1.1 100")   # mid-body: kept for it
    second = await trio.open_tcp_stream("127.0.0.1", port)       # connects (kernel backlog) ...
    await second.send_all(POST)
    with trio.move_on_after(0.3) as waited:
        await second.receive_some(4096)                          # ... but is not served yet
    assert waited.cancelled_caught
    await first.send_all(b"c")
    with trio.fail_after(5):
        assert (await first.receive_some(4096)).endswith(b"got:abc")
        # now idle, the first connection makes room for the second, which waits in the backlog
        assert await first.receive_some(4096) == b""
        assert (await second.receive_some(4096)).startswith(b"HTTP/1.1 200")
    await second.aclose()


async def test_at_the_cap_the_longest_idle_connection_makes_room_for_a_new_client(nursery):
    # keep-alive connections waiting for their next request must not lock out new clients
    port, _ = await start(nursery, max_connections=4, keepalive_timeout=3600, header_timeout=3600)
    idle = []
    for _ in range(4):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(POST)
        assert (await stream.receive_some(4096)).endswith(b"got:abc")
        idle.append(stream)
    with trio.fail_after(2):
        assert (await talk(port, POST, read_until_close=False)).endswith(b"got:abc")
        assert await idle[0].receive_some(4096) == b""          # the longest idle was closed
        await idle[1].send_all(POST)                             # the others were not
        assert (await idle[1].receive_some(4096)).endswith(b"got:abc")
    for stream in idle:
        await stream.aclose()


async def test_queued_connections_are_accepted_in_one_turn_while_the_loop_is_busy(nursery):
    """Busy tasks make every scheduler round count: connections already waiting in the backlog
    are all taken at once, not one per round (which left them waiting up to 0.5 s under load)."""
    server = Server(listen=("127.0.0.1:0",), max_connections=4)
    (listener,) = await open_listeners(server.listen, 64)
    port = listener.socket.getsockname()[1]
    ticks = 0
    accepted_at: list[int] = []
    held = trio.Event()

    async def busy() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async def serve(stream):
        accepted_at.append(ticks)
        await held.wait()
        await stream.aclose()

    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]   # queued, not accepted
    for _ in range(8):
        nursery.start_soon(busy)
    slots = trio.Semaphore(server.max_connections)
    nursery.start_soon(accept_loop, listener, slots, IdleConnections(), nursery, serve, lambda exc: None)
    with trio.fail_after(5):
        while len(accepted_at) < 4:
            await trio.sleep(0.001)
    await trio.sleep(0.05)
    assert len(accepted_at) == 4                       # the cap holds: two wait in the backlog
    assert max(accepted_at) - min(accepted_at) <= 8    # one round of the 8 busy tasks, not four
    held.set()
    with trio.fail_after(5):
        while len(accepted_at) < 6:
            await trio.sleep(0.001)
    for client in clients:
        client.close()
    listener.close()


async def test_pipelining_client_takes_turns_with_other_connections(nursery):
    """Answers that need no upstream never wait, so a client that pipelines them could hold the
    loop for a whole receive buffer of requests at a time; it yields every few instead."""
    served: list[str] = []

    async def handler(request: Request, response: Response) -> None:
        served.append(request.head.path)
        await response.send_full(200, [], b"ok")

    port, _ = await start(nursery, handler)
    piped = await trio.open_tcp_stream("127.0.0.1", port)
    other = await trio.open_tcp_stream("127.0.0.1", port)
    await piped.send_all(b"GET /piped HTTP/1.1\r\nHost: a\r\n\r\n" * 60)
    with trio.fail_after(5):
        while not served:           # the pipeline is being served (or, held whole, is done)
            await trio.sleep(0)
    await other.send_all(b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
    with trio.fail_after(5):
        while len(served) < 61:
            await trio.sleep(0)
    assert served.index("/other") < 40      # well before the pipeline ended: the loop was shared
    for stream in (piped, other):
        await stream.aclose()


async def test_handler_crash_is_500_without_internals_and_others_unaffected(nursery):
    port, life = await start(nursery)
    out = await talk(port, b"GET /boom HTTP/1.1\r\nHost: a\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 500") and b"secret" not in out
    assert len(life.errors) == 1
    out = await talk(port, POST, read_until_close=False)
    assert b"got:abc" in out


async def test_client_resetting_mid_request_does_not_disturb_others(nursery):
    port, life = await start(nursery)
    raw = socket.create_connection(("127.0.0.1", port))
    raw.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nab")
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    raw.close()
    out = await talk(port, POST, read_until_close=False)
    assert b"got:abc" in out and not life.errors
