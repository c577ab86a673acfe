"""Stage 7, proxy: send a request to the deployments of a plan in order until one answers, and
relay that answer to the client.

Which failures move a request on to the next deployment, and what each attempt teaches routing,
is failover.py's pure decision; this module acts on it. A deployment's own `timeouts.total` bounds
each attempt there, within the request's `[timeouts] total`.

Non-streamed answers are read whole (bounded by `server.max_response_bytes`) before anything is
sent, so a backend that breaks mid-body is still failed over. An embeddings request for a backend
that embeds one text per call is a fan-out: `embeddings_concurrency` calls at a time, merged in
order as they arrive, the first failure ending the others (`_fan_out`). Streams are relayed event by event
as they arrive; the client's pace sets the pace of upstream reads, so a slow client holds at most
one event in memory, and a client that hangs up cancels the upstream read at once.
"""

from __future__ import annotations

import math
from typing import Awaitable, Callable, cast

import attrs
import trio

from hxgwd.config.model import Timeouts
from hxgwd.errors import GatewayError, Unavailable, UpstreamError, UpstreamTimeout
from hxgwd.offload import Offload
from hxgwd.pipeline import transform
from hxgwd.pipeline.exchange import Exchange
from hxgwd.pipeline.failover import Learn, Verdict, judge_failure, judge_status
from hxgwd.http.exchange import Response
from hxgwd.http import Headers
from hxgwd.pipeline.route import Outcome, Plan, RequestFeatures, Router
from hxgwd.runtime import Deployment
from hxgwd.upstream import PoolFull, Transport, UpstreamRequest, UpstreamResponse
from hxgwd.upstream.transports import Transports
from hxgwd.upstream.gates import DeploymentBusy, Gates

COALESCE_BYTES = 65536      # most stream bytes gathered into one write to the client
SEND_IN_PIECES_BYTES = 1 << 20   # a non-streamed answer this large is written piece by piece
ERROR_BODY_LIMIT = 65536


@attrs.frozen
class ProxySettings:
    max_attempts: int
    deadline: float                      # trio clock: the whole request, every attempt included
    max_response_bytes: int
    max_sse_event_bytes: int
    offload: Offload                     # the gateway's worker threads, for a large answer's merge


class _Retry(Exception):
    """This attempt failed in a way the next deployment may not; carries what to answer if last."""

    def __init__(self, error: GatewayError | None, answer: tuple[int, Headers, bytes] | None) -> None:
        self.error = error
        self.answer = answer

    def retry_after(self) -> float | None:
        """The wait a 429 or 503 asked for: cooling instead of a failure (routing/breaker.py).
        Only a real wait counts: 0, negative or NaN would let a failing deployment dodge its breaker."""
        if self.answer is None or self.answer[0] not in (429, 503):
            return None
        for name, value in self.answer[1]:
            if name == b"retry-after":
                try:
                    seconds = float(value)
                except ValueError:
                    return None     # an HTTP date: rare from model servers; the breaker still applies
                return seconds if 0 < seconds < math.inf else None
        return None

    def cause(self) -> str:
        if self.error is not None:
            return self.error.cause or self.error.code or "upstream error"
        return f"status {self.answer[0]}" if self.answer is not None else "upstream error"


async def forward(ex: Exchange, plan: Plan, build: Callable[[Deployment], Awaitable[transform.CallPlan]],
                  router: Router, transports: Transports, gates: Gates, settings: ProxySettings,
                  features: RequestFeatures, response: Response) -> None:
    if not plan.order:
        raise Unavailable("No deployment of this model is available right now.",
                          retry_after=plan.retry_after or 1.0)
    last: _Retry | None = None
    for dep in plan.order[: settings.max_attempts]:
        calls = await build(dep)     # BadRequest here is the caller's fault: no failover
        ex.attempts += 1
        ex.deployment, ex.backend, ex.served = dep.id, dep.backend.name, dep
        ex.tried.append(dep.id)
        predicted = plan.predicted.get(dep.id)
        ex.route = f"strategy={plan.strategy}; attempts={ex.attempts}" + (
            f"; predicted_ms={predicted * 1000:.0f}" if predicted is not None else "")
        began = trio.current_time()
        router.started(dep, began)
        ttfb_before = ex.ttfb
        ex.ttfb = None
        cause_before = ex.cause
        outcome: Outcome | None = None      # None: the deployment failed (timeout, broken answer)
        # the deployment's own bound on one exchange with it, within the request's
        attempt_deadline = min(settings.deadline, began + dep.backend.timeouts.total)
        try:
            with trio.CancelScope(deadline=attempt_deadline) as bound:
                gate = gates.get(dep)
                if gate is None:
                    outcome = await _attempt(ex, dep, calls, transports, settings, response, features, began)
                else:
                    async with gate.slot(dep.config.queue_timeout):
                        outcome = await _attempt(ex, dep, calls, transports, settings, response, features, began)
            if bound.cancelled_caught:
                outcome = None
                if response.started:
                    raise UpstreamTimeout("The request took longer than its total deadline.")
                last = _Retry(UpstreamTimeout("The upstream did not answer within the request deadline.",
                                              code="upstream_total_timeout"), None)
                _note(ex, dep, "total timeout")
                if attempt_deadline >= settings.deadline:
                    break            # the request's own deadline: no time left for another attempt
                continue
            return
        except (DeploymentBusy, PoolFull) as busy:
            verdict = judge_failure(busy, gateway_limit=True)
            _note(ex, dep, busy.cause or busy.code or "busy")
            last = _Retry(busy, None)
            outcome = _learned(verdict, 0, began, features)
        except _Retry as retry:
            last = retry
            _note(ex, dep, retry.cause())
            outcome = Outcome(ok=False, status=retry.answer[0] if retry.answer else 0,
                              ttfb=0.0, duration=trio.current_time() - began, features=features,
                              retry_after=retry.retry_after(), began=began)
        except UpstreamError as exc:     # mid-answer, after the response began: the deployment's failure
            _note(ex, dep, exc.cause or exc.code or "upstream error")
            raise
        except BaseException as exc:
            outcome = _learned(judge_failure(exc, gateway_limit=False), 0, began, features)
            raise
        finally:
            if ex.ttfb is None:
                ex.ttfb = ttfb_before
            now = trio.current_time()
            ex.upstream_time += now - began
            if outcome is None:
                outcome = Outcome(ok=False, status=0, ttfb=0.0, duration=now - began, features=features,
                                  began=began)
            # this attempt's cause, if it added one (for the breaker's events)
            cause = None
            if ex.cause is not None and ex.cause is not cause_before:
                cause = ex.cause.rpartition("; ")[2].partition(": ")[2]
            router.finished(dep, outcome, now, cause)
    if last is None:
        raise UpstreamError("No deployment could take the request.", code="no_deployment_available")
    if last.answer is not None:
        status, headers, body = last.answer
        ex.status = status
        await _send_whole(ex, response, status, headers, body)
        return
    assert last.error is not None
    raise last.error


def _note(ex: Exchange, dep: Deployment, cause: str) -> None:
    """Why an attempt failed, for the access line: "deployment: cause", one per failed attempt.
    Only on failures: nothing is built for a request that went well the first time."""
    text = f"{dep.id}: {cause}"
    ex.cause = text if ex.cause is None else f"{ex.cause}; {text}"


def _learned(verdict: Verdict, status: int, began: float, features: RequestFeatures) -> Outcome:
    """The Outcome of an attempt that ended without an answer, by what the verdict teaches."""
    duration = trio.current_time() - began
    if verdict.learn is Learn.NOTHING:
        return Outcome(ok=True, status=status, ttfb=0.0, duration=duration, features=features,
                       cancelled=True, began=began)
    return Outcome(ok=verdict.learn is Learn.SERVED, status=status, ttfb=0.0, duration=duration,
                   features=features, began=began)


async def _attempt(ex: Exchange, dep: Deployment, calls: transform.CallPlan, transports: Transports,
                   settings: ProxySettings, response: Response, features: RequestFeatures,
                   started: float) -> Outcome:
    """`started`: when router.started() was told (the Outcome carries it); timings run from here,
    after any wait for the deployment's concurrency gate."""
    transport = transports.get(dep.backend)
    timeouts = dep.backend.timeouts
    headers = transform.upstream_headers(ex.client_headers, dep, (ex.client_request_id or ex.request_id).encode(),
                                         calls.content_type)
    began = trio.current_time()
    body: bytes | list[bytes]           # a list from a single call (and a fan-out's merge), as read
    if len(calls.bodies) > 1:
        status, answer_headers, body = await _fan_out(ex, dep, calls, transport, headers, settings, began)
    else:
        req = UpstreamRequest(calls.method, dep.backend.path(calls.path), headers, calls.bodies[0])
        up = await _call(transport, req, timeouts)
        try:
            if ex.ttfb is None:
                ex.ttfb = trio.current_time() - began
            await _refuse_failures(up, timeouts)
            relay = None
            if up.status == 200:
                if calls.stream and _is_event_stream(up.headers):
                    relay = _relay_stream
                elif calls.binary_answer:
                    relay = _relay_bytes
            if relay is not None:
                await relay(ex, dep, calls, up, settings, response, timeouts.between_chunks)
                return Outcome(ok=True, status=200, ttfb=ex.ttfb or 0.0, duration=trio.current_time() - began,
                               features=features, output_tokens=(ex.usage or {}).get("completion_tokens"),
                               began=started)
            try:
                body = await _read_parts(up, settings.max_response_bytes, timeouts.between_chunks)
            except UpstreamError as exc:
                raise _Retry(exc, None) from None
        finally:
            await up.aclose()
        status, answer_headers = up.status, up.headers
        if status == 200 and (calls.embeddings_merge or calls.client_base64):
            whole = b"".join(body)
            if transform.needs_merge(calls, whole):
                merge = transform.EmbeddingsMerge(calls, settings.max_response_bytes)
                try:
                    await settings.offload.run(len(whole), merge.add, 0, whole)
                except UpstreamError as exc:
                    raise _Retry(exc, None) from None
                del whole
                body = merge.answer()
    ex.status = status
    headers_out = transform.downstream_headers(answer_headers)
    duration = trio.current_time() - began
    try:
        await _send_whole(ex, response, status, headers_out, body, dep, upstream_so_far=duration)
    finally:   # after the answer is out, not before (it only feeds the record), but always
        if status == 200 and len(calls.bodies) == 1 and calls.spends_usage:
            ex.usage = transform.usage_from_body(_tail(cast("list[bytes]", body)))   # one call's, read
            if calls.note_answer_id:
                ex.answer_id = transform.answer_id(body if isinstance(body, bytes) else _head(body))
    return Outcome(ok=status < 500, status=status, ttfb=ex.ttfb or 0.0, duration=duration,
                   features=features, output_tokens=(ex.usage or {}).get("completion_tokens"), began=started)


async def _call(transport: Transport, req: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
    try:
        return await transport.request(req, timeouts)
    except PoolFull:
        raise                   # the gateway's own limit: not the deployment's failure (forward)
    except UpstreamError as exc:
        raise _Retry(exc, None) from None


async def _refuse_failures(up: UpstreamResponse, timeouts: Timeouts) -> None:
    """_Retry for an answer the next deployment may not give (failover.judge_status)."""
    verdict = judge_status(up.status)
    if not verdict.move_on:
        return
    if not verdict.pass_through:
        # The gateway's own key for this backend was refused: the upstream's message may quote
        # the key, so the client gets ours.
        raise _Retry(UpstreamError(f"The backend refused the gateway's credentials ({up.status}).",
                                   code="upstream_auth_failed", cause=f"credentials refused ({up.status})"), None)
    error_body = await _read(up, ERROR_BODY_LIMIT, timeouts.between_chunks, tolerate=True)
    raise _Retry(None, (up.status, transform.downstream_headers(up.headers), error_body))


async def _fan_out(ex: Exchange, dep: Deployment, calls: transform.CallPlan, transport: Transport,
                   headers: Headers, settings: ProxySettings,
                   began: float) -> tuple[int, Headers, bytes | list[bytes]]:
    """One call per body (an embeddings input each), `embeddings_concurrency` at a time, merged
    in order. The first failure ends the others: a retryable one fails the attempt over, a
    caller's 4xx (of any item) is the answer, as is. The usage of each call that finished is in
    `ex.usage` as soon as it finished, and `ex.fanout_left` counts the calls that did not: a
    request cut short (the client hung up) is charged for the first and keeps its reservation
    for the others (handle.py)."""
    timeouts = dep.backend.timeouts
    path = dep.backend.path(calls.path)
    merge = transform.EmbeddingsMerge(calls, settings.max_response_bytes)
    ex.usage = None
    ex.fanout_calls = ex.fanout_left = len(calls.bodies)
    todo = iter(enumerate(calls.bodies))
    first_headers: Headers | None = None
    failure: BaseException | None = None     # the first one; the others follow from its cancel
    caller_error: tuple[int, Headers, bytes] | None = None

    async def caller() -> None:
        nonlocal first_headers, failure, caller_error
        try:
            for i, body in todo:
                up = await _call(transport, UpstreamRequest("POST", path, headers, body), timeouts)
                try:
                    if ex.ttfb is None:
                        ex.ttfb = trio.current_time() - began
                    await _refuse_failures(up, timeouts)
                    try:
                        answer = await _read(up, settings.max_response_bytes, timeouts.between_chunks)
                    except UpstreamError as exc:
                        raise _Retry(exc, None) from None
                finally:
                    await up.aclose()
                if up.status != 200:
                    caller_error = (up.status, up.headers, answer)
                    nursery.cancel_scope.cancel()
                    return
                first_headers = first_headers or up.headers
                try:
                    merge.add(i, answer)
                except UpstreamError as exc:
                    raise _Retry(exc, None) from None
                ex.usage = merge.usage
                ex.fanout_left -= 1
        except Exception as exc:
            if failure is None and caller_error is None:
                failure = exc
            nursery.cancel_scope.cancel()

    concurrency = min(dep.backend.config.embeddings_concurrency, len(calls.bodies))
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(caller)
    if caller_error is not None or failure is not None:
        ex.fanout_left = 0      # the answer is this failure: what the others spent is unknown, not owed
    if caller_error is not None:
        return caller_error
    if failure is not None:
        raise failure
    assert first_headers is not None
    return 200, first_headers, merge.answer()


async def _read(up: UpstreamResponse, limit: int, between_chunks: float, tolerate: bool = False) -> bytes:
    """The whole body, each piece within `between_chunks` of the last."""
    return b"".join(await _read_parts(up, limit, between_chunks, tolerate))


async def _read_parts(up: UpstreamResponse, limit: int, between_chunks: float,
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


def _head(parts: list[bytes], at_most: int = 1 << 20) -> bytes:
    """The start of a body in pieces: the whole of it when small, else its first piece."""
    return b"".join(parts) if sum(map(len, parts)) <= at_most else parts[0]


def _tail(parts: list[bytes], at_least: int = 65536) -> bytes:
    """The end of a body in pieces: where an answer's `usage` is."""
    if len(parts) == 1:
        return parts[0]
    take, size = len(parts), 0
    while take and size < at_least:
        take -= 1
        size += len(parts[take])
    return b"".join(parts[take:])


async def _relay_stream(ex: Exchange, dep: Deployment, calls: transform.CallPlan, up: UpstreamResponse,
                        settings: ProxySettings, response: Response, between_chunks: float) -> None:
    ex.stream = True
    ex.status = 200
    relay = transform.SseRelay(calls.strip_stream_usage, settings.max_sse_event_bytes, calls.event_usage)
    # Nothing reaches the client before the stream's first whole event: a stream that breaks,
    # stalls, or sends a first event over max_sse_event_bytes before it is still failed over, like
    # a 5xx. (A stream that ends before any whole event sends what it had, as it came.)
    out = b""
    try:
        while not out and (chunk := await _next_chunk(up, between_chunks)):
            out = relay.feed(chunk)
    except UpstreamError as exc:      # UpstreamTimeout included
        raise _Retry(exc, None) from None
    headers = transform.downstream_headers(up.headers)
    headers += [(b"x-accel-buffering", b"no"), *_gateway_headers(ex, dep, trio.current_time() - ex.started)]
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
            chunk = await _next_chunk(up, between_chunks)
            out = relay.feed(chunk) if chunk else b""
        out += relay.end()
        ex.bytes_out += len(out)
        await response.end(out)
    finally:
        ex.usage = relay.usage if calls.spends_usage else None
        ex.answer_id = relay.answer_id


async def _relay_bytes(ex: Exchange, dep: Deployment, calls: transform.CallPlan, up: UpstreamResponse,
                       settings: ProxySettings, response: Response, between_chunks: float) -> None:
    """A binary answer (speech audio) relayed as it arrives, at the client's pace: one piece in
    memory at a time, however long the audio. Failover ends with its head, as for a stream."""
    ex.status = 200
    try:
        chunk = await _next_chunk(up, between_chunks)
    except UpstreamError as exc:
        raise _Retry(exc, None) from None
    headers = transform.downstream_headers(up.headers)
    headers += _gateway_headers(ex, dep, trio.current_time() - ex.started)
    await response.start(200, headers)
    while chunk:
        ex.bytes_out += len(chunk)
        await response.send(chunk)
        chunk = await _next_chunk(up, between_chunks)
    await response.end()


async def _next_chunk(up: UpstreamResponse, between_chunks: float) -> bytes:
    try:
        return await up.receive(trio.current_time() + between_chunks)
    except trio.TooSlowError:
        raise UpstreamTimeout("The upstream stream stalled.", code="upstream_read_timeout",
                              cause=f"stream stalled ({between_chunks:g} s)") from None


async def _send_whole(ex: Exchange, response: Response, status: int, headers: Headers,
                      body: bytes | list[bytes], dep: Deployment | None = None,
                      upstream_so_far: float | None = None) -> None:
    """`body`: bytes, or its pieces; pieces of a large body are sent as they are, in writes of
    COALESCE_BYTES or more, rather than joined into one (a copy of all of it, held to the end)."""
    spent = ex.upstream_time + (upstream_so_far or 0.0)
    headers = headers + _gateway_headers(ex, dep, spent)
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


def _gateway_headers(ex: Exchange, dep: Deployment | None, upstream_time: float) -> Headers:
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


def _is_event_stream(headers: Headers) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.startswith(b"text/event-stream")
    return False
