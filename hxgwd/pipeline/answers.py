"""An upstream's answer, read and written to the client: whole (bounded, in pieces), as a stream of
server-sent events relayed event by event at the client's pace, or as bytes relayed as they come
(audio). Each answer carries the gateway's own headers (X-HX-*)."""

from __future__ import annotations

import trio

from hxgwd.errors import UpstreamError, UpstreamTimeout
from hxgwd.http import Headers
from hxgwd.http.exchange import Response
from hxgwd.pipeline import transform
from hxgwd.pipeline.exchange import Exchange
from hxgwd.pipeline.failover import Retry
from hxgwd.runtime import Deployment
from hxgwd.upstream import UpstreamResponse

COALESCE_BYTES = 65536      # most stream bytes gathered into one write to the client
SEND_IN_PIECES_BYTES = 1 << 20   # a non-streamed answer this large is written piece by piece


async def read(up: UpstreamResponse, limit: int, between_chunks: float, tolerate: bool = False) -> bytes:
    """The whole body, each piece within `between_chunks` of the last."""
    return b"".join(await read_parts(up, limit, between_chunks, tolerate))


async def read_parts(up: UpstreamResponse, limit: int, between_chunks: float,
                      tolerate: bool = False) -> list[bytes]:
    """The whole body as it came, in pieces: joined, a 40 MB answer took the loop for ~20 ms
    and its memory twice over."""
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            chunk = await up.receive(trio.current_time() + between_chunks)
            if not chunk:
                return parts
            size += len(chunk)
            if size > limit:
                if tolerate:
                    return parts
                raise UpstreamError("The upstream answer is larger than the gateway accepts.",
                                    cause=f"answer over max_response_bytes ({limit})")
            parts.append(chunk)
    except UpstreamError:
        if tolerate:
            return parts
        raise
    except trio.TooSlowError:
        if tolerate:
            return parts
        raise UpstreamTimeout("The upstream stopped sending mid-answer.", code="upstream_read_timeout",
                              cause=f"read timeout after {size} bytes ({between_chunks:g} s)") from None


def head(parts: list[bytes], at_most: int = 1 << 20) -> bytes:
    """The start of a body in pieces: the whole of it when small, else its first piece."""
    return b"".join(parts) if sum(map(len, parts)) <= at_most else parts[0]


def tail(parts: list[bytes], at_least: int = 65536) -> bytes:
    """The end of a body in pieces: where an answer's `usage` is."""
    if len(parts) == 1:
        return parts[0]
    take, size = len(parts), 0
    while take and size < at_least:
        take -= 1
        size += len(parts[take])
    return b"".join(parts[take:])


async def relay_stream(ex: Exchange, dep: Deployment, calls: transform.CallPlan, up: UpstreamResponse,
                       max_event_bytes: int, response: Response, between_chunks: float) -> None:
    ex.stream = True
    ex.status = 200
    relay = transform.SseRelay(calls.strip_stream_usage, max_event_bytes, calls.event_usage)
    # Nothing reaches the client before the stream's first whole event: a stream that breaks,
    # stalls, or sends a first event over max_sse_event_bytes before it is still failed over, like
    # a 5xx. (A stream that ends before any whole event sends what it had, as it came.)
    out = b""
    try:
        while not out and (chunk := await next_chunk(up, between_chunks)):
            out = relay.feed(chunk)
    except UpstreamError as exc:      # UpstreamTimeout included
        raise Retry(exc, None) from None
    headers = transform.downstream_headers(up.headers)
    headers += [(b"x-accel-buffering", b"no"), *gateway_headers(ex, dep, trio.current_time() - ex.started)]
    await response.start(200, headers)
    try:
        while chunk:
            # What has already arrived behind it goes out in the same write: one system call and
            # one chunk for a burst of events, never a wait for more. (None: the rest is still on
            # its way; b"": the end, which then goes out in the same write too.)
            more = None
            while len(out) < COALESCE_BYTES and (more := up.receive_ready()):
                out += relay.feed(more)
            if more == b"":
                break
            if out:
                ex.bytes_out += len(out)
                await response.send(out)
            chunk = await next_chunk(up, between_chunks)
            out = relay.feed(chunk) if chunk else b""
        out += relay.end()
        ex.bytes_out += len(out)
        await response.end(out)
    finally:
        ex.usage = relay.usage if calls.spends_usage else None
        ex.answer_id = relay.answer_id


async def relay_bytes(ex: Exchange, dep: Deployment, calls: transform.CallPlan, up: UpstreamResponse,
                      max_event_bytes: int, response: Response, between_chunks: float) -> None:
    """A binary answer (speech audio) relayed as it arrives, at the client's pace: one piece in
    memory at a time, however long the audio. Failover ends with its head, as for a stream."""
    ex.status = 200
    try:
        chunk = await next_chunk(up, between_chunks)
    except UpstreamError as exc:
        raise Retry(exc, None) from None
    headers = transform.downstream_headers(up.headers)
    headers += gateway_headers(ex, dep, trio.current_time() - ex.started)
    await response.start(200, headers)
    while chunk:
        ex.bytes_out += len(chunk)
        await response.send(chunk)
        chunk = await next_chunk(up, between_chunks)
    await response.end()


async def next_chunk(up: UpstreamResponse, between_chunks: float) -> bytes:
    try:
        return await up.receive(trio.current_time() + between_chunks)
    except trio.TooSlowError:
        raise UpstreamTimeout("The upstream stream stalled.", code="upstream_read_timeout",
                              cause=f"stream stalled ({between_chunks:g} s)") from None


async def send_whole(ex: Exchange, response: Response, status: int, headers: Headers,
                      body: bytes | list[bytes], dep: Deployment | None = None,
                      upstream_so_far: float | None = None) -> None:
    """`body`: bytes, or its pieces; pieces of a large body are sent as they are, in writes of
    COALESCE_BYTES or more, rather than joined into one (a copy of all of it, held to the end)."""
    spent = ex.upstream_time + (upstream_so_far or 0.0)
    headers = headers + gateway_headers(ex, dep, spent)
    if isinstance(body, list):
        size = sum(map(len, body))
        if size > SEND_IN_PIECES_BYTES:
            ex.bytes_out = size
            await response.start(status, [*headers, (b"content-length", b"%d" % size)])
            batch: list[bytes] = []
            batched = 0
            for part in body:
                batch.append(part)
                batched += len(part)
                if batched >= COALESCE_BYTES:
                    await response.send(b"".join(batch))
                    batch, batched = [], 0
            await response.send(b"".join(batch))
            await response.end()
            return
        body = b"".join(body)
    ex.bytes_out = len(body)
    await response.send_full(status, headers, body)


def gateway_headers(ex: Exchange, dep: Deployment | None, upstream_time: float) -> Headers:
    """`dep`: the deployment whose answer this is; None when the answer is the request's, after
    every attempt failed (the last one's answer passed through): then every deployment tried."""
    overhead_ms = max(0.0, (trio.current_time() - ex.started - upstream_time) * 1000)
    out = [(b"x-hx-overhead-ms", f"{overhead_ms:.3f}".encode())]
    if dep is None:
        return out + route_headers(ex)
    out.append((b"x-hx-deployment", dep.id.encode()))
    if ex.route:
        out.append((b"x-hx-route", ex.route.encode()))
    return out


def route_headers(ex: Exchange) -> Headers:
    """X-HX-Deployment naming every deployment tried, in order, and X-HX-Route: on the answers of
    requests that failed, so that a 502/503/504 says where it came from."""
    out = []
    if ex.tried:
        out.append((b"x-hx-deployment", ", ".join(ex.tried).encode()))
    if ex.route:
        out.append((b"x-hx-route", ex.route.encode()))
    return out


def is_event_stream(headers: Headers) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.startswith(b"text/event-stream")
    return False
