#!/usr/bin/env python3
"""The floor: the least a trio gateway can do per request on this machine, per HTTP parser.

    floor.py [--port 4011] [--upstream 127.0.0.1:18080] [--mode h11|raw|httptools]

A bare pass-through with no gateway logic: one trio task per client connection, a list of idle
keep-alive upstream connections, no auth, no routing, no timeouts, no logging, no JSON. Any POST is
forwarded to the same path on the upstream; the answer is relayed whole (non-streamed). Modes:

  h11        both sides parsed and written by h11 (pure Python): the floor of a trio + h11 gateway
  raw        h11 on the client side; the upstream answer framed by hand from its Content-Length,
             to show h11's share
  httptools  both sides parsed by httptools (llhttp, in C: hxgwd's default parser), heads written
             by hand: the floor of a trio + httptools gateway

Used by bench/run.sh --floor to tell hxgwd's own cost from the cost of trio + its parser on this
box. Not a product: it trusts the upstream completely.
"""

from __future__ import annotations

import argparse
import collections
import http

import h11
import trio

try:
    import httptools
except ImportError:       # only mode httptools needs it
    httptools = None

RECEIVE = 65536


REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


class Upstream:
    def __init__(self, host: str, port: int, raw: bool) -> None:
        self.host, self.port, self.raw = host, port, raw
        self.idle: list = []
        self.host_header = f"{host}:{port}".encode()

    async def call_httptools(self, method: bytes, target: bytes, headers: list, body: bytes):
        """One request on an idle (or new) upstream connection; the answer parsed by llhttp."""
        if self.idle:
            stream, sink, parser = self.idle.pop()
        else:
            stream = await trio.open_tcp_stream(self.host, self.port)
            sink = _Sink()
            parser = sink.parser = httptools.HttpResponseParser(sink)
        head = [b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n"
                % (method, target, self.host_header, len(body))]
        head += [k + b": " + v + b"\r\n" for k, v in headers if k in (b"content-type", b"authorization")]
        head.append(b"\r\n")
        await stream.send_all(b"".join(head) + body)
        while not sink.done:
            data = await stream.receive_some(RECEIVE)
            if not data:
                await stream.aclose()
                raise trio.BrokenResourceError("upstream closed the connection")
            parser.feed_data(data)
        status, rheaders, rbody, keep, _ = sink.done.popleft()
        if keep and not sink.done:
            self.idle.append((stream, sink, parser))
        else:
            await stream.aclose()
        return status, [(k, v) for k, v in rheaders if k == b"content-type"], rbody

    async def call(self, method: bytes, target: bytes, headers: list, body: bytes):
        if self.idle:
            stream, conn = self.idle.pop()
        else:
            stream = await trio.open_tcp_stream(self.host, self.port)
            conn = None if self.raw else h11.Connection(h11.CLIENT)
        out = [(b"host", self.host_header), (b"content-length", str(len(body)).encode())]
        out += [(k, v) for k, v in headers if k in (b"content-type", b"authorization")]
        if self.raw:
            head = b"%s %s HTTP/1.1\r\n" % (method, target) + b"".join(k + b": " + v + b"\r\n" for k, v in out)
            await stream.send_all(head + b"\r\n" + body)
            status, rheaders, rbody = await _read_raw(stream)
        else:
            data = conn.send(h11.Request(method=method, target=target, headers=out))
            data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            await stream.send_all(data)
            status, rheaders, parts = 0, [], []
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(RECEIVE))
                elif type(ev) is h11.Response:
                    status, rheaders = ev.status_code, list(ev.headers)
                elif type(ev) is h11.Data:
                    parts.append(ev.data)
                elif type(ev) is h11.EndOfMessage:
                    break
                else:
                    raise RuntimeError(f"upstream: {ev!r}")
            conn.start_next_cycle()
            rbody = b"".join(parts)
        self.idle.append((stream, conn))
        return status, [(k, v) for k, v in rheaders if k == b"content-type"], rbody


async def _read_raw(stream):
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += await stream.receive_some(RECEIVE)
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = []
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k, v = k.strip().lower(), v.strip()
        headers.append((k, v))
        if k == b"content-length":
            length = int(v)
    while len(rest) < length:
        rest += await stream.receive_some(RECEIVE)
    return status, headers, rest[:length]


class _Sink:
    """httptools callbacks of one connection (either side): completed messages queue up in `done`
    as (method or status, headers, body, keep-alive); pipelined requests give several."""

    __slots__ = ("parser", "done", "url", "headers", "body", "start")

    def __init__(self) -> None:
        self.parser = None
        self.done: collections.deque = collections.deque()
        self.url, self.headers, self.body, self.start = b"", [], [], None

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        p = self.parser
        self.start = p.get_method() if isinstance(p, httptools.HttpRequestParser) else p.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done.append((self.start, self.headers, b"".join(self.body), self.parser.should_keep_alive(),
                          self.url))


async def serve_one_httptools(stream: trio.SocketStream, up: Upstream) -> None:
    sink = _Sink()
    parser = sink.parser = httptools.HttpRequestParser(sink)
    try:
        while True:
            while not sink.done:
                data = await stream.receive_some(RECEIVE)
                if not data:
                    return
                parser.feed_data(data)
            method, headers, body, keep, target = sink.done.popleft()
            status, rheaders, rbody = await up.call_httptools(method, target, headers, body)
            head = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Unknown"))]
            head += [k + b": " + v + b"\r\n" for k, v in rheaders]
            head.append(b"content-length: %d\r\n\r\n" % len(rbody))
            await stream.send_all(b"".join(head) + rbody)
            if not keep:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, httptools.HttpParserError,
            httptools.HttpParserUpgrade):
        return
    finally:
        await stream.aclose()


async def serve_one(stream: trio.SocketStream, up: Upstream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            req, parts = None, []
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await stream.receive_some(RECEIVE)
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.DONE:
                        pass
                elif type(ev) is h11.Request:
                    req = ev
                elif type(ev) is h11.Data:
                    parts.append(ev.data)
                elif type(ev) is h11.EndOfMessage:
                    break
                else:   # ConnectionClosed, PAUSED
                    return
            status, headers, body = await up.call(req.method, req.target, list(req.headers), b"".join(parts))
            headers = headers + [(b"content-length", str(len(body)).encode())]
            out = conn.send(h11.Response(status_code=status, headers=headers))
            out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            await stream.send_all(out)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
        return
    finally:
        await stream.aclose()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=4011)
    ap.add_argument("--upstream", default="127.0.0.1:18080")
    ap.add_argument("--mode", choices=("h11", "raw", "httptools"), default="h11")
    a = ap.parse_args()
    if a.mode == "httptools" and httptools is None:
        raise SystemExit("floor.py --mode httptools: httptools is not installed (pip install httptools)")
    host, port = a.upstream.rsplit(":", 1)
    up = Upstream(host, int(port), a.mode == "raw")
    serve = serve_one_httptools if a.mode == "httptools" else serve_one
    listeners = await trio.open_tcp_listeners(a.port, host="127.0.0.1")
    print(f"floor ({a.mode}) listening on 127.0.0.1:{a.port} -> {a.upstream}", flush=True)
    await trio.serve_listeners(lambda s: serve(s, up), listeners)


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
