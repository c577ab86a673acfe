"""The one place the stages meet: find the endpoint -> authenticate -> serve -> record.

`Gateway` is the handler the HTTP layer calls for each request. It reads the config snapshot once
(`holder.current`) and passes it down, so a reload mid-request changes nothing for that request.
What a path is and how it is served is the endpoint table's (endpoints.py); this module only
sequences the stages every request goes through and turns errors into answers.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import trio

from hxgwd import memtrim
from hxgwd.errors import GatewayError, NotFound, ShuttingDown, Unauthorized, capped, require_method
from hxgwd.http import Headers
from hxgwd.http.exchange import ClientGone, Request, Response
from hxgwd.pipeline import authenticate, client, cors
from hxgwd.pipeline.context import GatewayContext
from hxgwd.pipeline.endpoint import Match, Table
from hxgwd.pipeline.endpoints import TABLE
from hxgwd.pipeline.exchange import Exchange
from hxgwd.pipeline.answers import route_headers
from hxgwd.runtime import Principal, Runtime
from hxgwd.store.schema import record_from_values

JSON = (b"content-type", b"application/json")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNRECORDED = frozenset(("anyone", "monitor"))     # endpoint.py's access kinds served without an Exchange


class Gateway:
    def __init__(self, ctx: GatewayContext, table: Table = TABLE) -> None:
        self.ctx = ctx
        self.table = table
        self._ids = RequestIds()
        # endpoint names of exact paths, for /metrics: one dict lookup in idle work, not a find()
        self._names = {p: ep.name for ep in table.endpoints for p in ep.paths if not p.endswith("/")}

    async def __call__(self, request: Request, response: Response) -> None:
        head = request.head
        path = head.path
        found = self.table.find(path)
        if found is not None and found.endpoint.access in UNRECORDED:
            await self._unrecorded(found, request, response)
            return
        ctx = self.ctx
        rt = ctx.holder.current
        api = cors.is_api(path, found is not None and found.endpoint.model_from != "none")
        if (preflight := cors.preflight(rt.config.server, head, api)) is not None:   # a browser's, without a key
            await response.send_full(*preflight)
            return
        rid, client_rid = self._ids.take(head.header(b"x-request-id"))
        response.add_header(b"x-request-id", (client_rid or rid).encode())
        response.add_header(b"x-hx-request-id", rid.encode())
        for name, value in cors.answer_headers(rt.config.server, head, api):
            response.add_header(name, value)
        ex = Exchange(request_id=rid, started=trio.current_time(), ts=time.time(), endpoint=path,
                      client_request_id=client_rid, client_headers=head.headers,
                      client=client.client_address(request.peer, head.headers, rt.config.server.trusted_proxies),
                      user_agent=client.user_agent(head.headers))
        live = ctx.metrics.live       # in flight, for /metrics
        live[id(ex)] = ex
        try:
            # Before anything that depends on the path: without a key, which paths exist (404 or
            # 405) is nobody's business.
            principal = self._authenticate(rt, ex, head.headers)
            if found is None:
                raise NotFound(f"Unknown endpoint {capped(path)}.", code="unknown_url")
            ep = found.endpoint
            if ep.access == "admin":
                authenticate.require_admin(principal)
            if head.method not in ep.methods:
                require_method(head.method, *ep.methods)
            await ep.serve(ctx, rt, ex, principal, request, response, ep, found.rest)
            if ex.status == 0 and response.started:
                ex.status = 200      # answered by the gateway itself (admin, model list)
        except GatewayError as exc:
            ex.error, ex.status = exc, exc.status
            if response.started:
                raise
            body = exc.body()
            ex.bytes_out = len(body)
            await response.send_full(exc.status, [JSON, *exc.headers(), *route_headers(ex)], body)
        except ClientGone:
            ex.client_gone = True
            raise
        except Exception:         # a bug: the HTTP layer answers 500 and logs it; recorded as ours
            ex.error, ex.status = GatewayError("Internal error."), 500
            raise
        except BaseException:         # cancelled: by a hang-up, or by the end of the shutdown grace
            if ctx.is_cutting_off():
                ex.error = ShuttingDown("The gateway stopped before the answer was complete.")
                ex.status = ex.error.status
            else:
                ex.client_gone = True
            raise
        finally:
            del live[id(ex)]
            await self._end(rt, ex)

    async def _unrecorded(self, found: Match, request: Request, response: Response) -> None:
        """Health checks ("anyone") and monitoring pages ("monitor"): no Exchange, no usage record,
        no access line, no CORS. A page refreshing itself every few seconds is not an API request;
        a refused key on a monitoring page is logged (rate-limited), a missing one is not: it is
        how a browser begins, before its password prompt."""
        ctx, ep, head = self.ctx, found.endpoint, request.head
        rt = ctx.holder.current
        principal = None
        if ep.access == "monitor":
            try:
                principal = authenticate.authenticate_monitor(head.headers, ctx.services.key_lookups(rt))
            except GatewayError as exc:
                if exc.code != "missing_api_key":
                    key = authenticate.monitor_key(head.headers)
                    ctx.log.limited("monitor_refused", "warning", "monitoring page refused", endpoint=ep.name,
                                    status=exc.status, code=exc.code, key_prefix=client.key_prefix(key),
                                    client=client.client_address(request.peer, head.headers,
                                                                 rt.config.server.trusted_proxies))
                await response.send_full(exc.status, [JSON, *exc.headers()], exc.body())
                return
        require_method(head.method, *ep.methods)
        # no Exchange: these are neither recorded nor given one
        await ep.serve(ctx, rt, None, principal, request, response, ep, found.rest)  # type: ignore[arg-type]

    async def _end(self, rt: Runtime, ex: Exchange) -> None:
        ctx = self.ctx
        ended = trio.current_time()
        cost = ex.cost()
        # the usage record's values now, before any await: journaled, they survive a kill -9
        # (store/usage.py); the RequestRecord is made later, with the access line
        try:
            values = ex.record_values(rt.generation, cost, ended)
            usage = ctx.services.usage
            segment = usage.journal(values) if usage is not None else None
        except Exception as exc:   # a bug: never worth skipping the settle below, or the answer
            values = None
            ctx.log.exception("cannot record a finished request", exc)
        if ex.reservation is not None:   # settle shields itself: it runs even when cancelled
            await ctx.services.limiter.settle(ex.reservation, *ex.settlement(cost))
        if ex.bytes_in + ex.bytes_out >= memtrim.AFTER_BYTES and ctx.memory.wanted():
            ctx.idle.defer(ctx.memory.trim)
        # the record for the store and the access line wait for a quiet moment: not on the next
        # request's path (idle.py); the journal holds the record meanwhile
        if values is not None:
            ctx.idle.defer(self._finish, values, segment)

    def _authenticate(self, rt: Runtime, ex: Exchange, headers: Headers) -> Principal:
        try:
            principal, _digest = authenticate.authenticate(headers, self.ctx.services.key_lookups(rt))
        except Unauthorized:   # which key was tried, by its first characters only (client.py)
            ex.key_prefix = client.key_prefix(authenticate.presented_key(headers))
            raise
        ex.key = principal.key_name
        return principal

    def _finish(self, values: tuple[Any, ...], segment: str | None) -> None:
        """Deferred (idle.py): the RequestRecord of values `journal` wrote, to the usage writer and
        the access log."""
        usage = self.ctx.services.usage
        try:
            rec = record_from_values(values)
        except Exception:   # a bug: its segment must not stay pending forever (replay decides)
            if usage is not None and segment is not None:
                usage.abandon(segment)
            raise
        if usage is not None:
            usage.hand(segment, rec)
        self.ctx.log.access(rec)
        name = self._names.get(rec.endpoint)       # the endpoint's name: a path is request data
        if name is None:
            found = self.table.find(rec.endpoint)
            name = found.endpoint.name if found is not None else "unknown"
        self.ctx.metrics.observe(rec, name, self.ctx.holder.current)
        self.ctx.failures.add(rec)


class RequestIds:
    """A new id for every request, and the client's X-Request-ID beside it when it is sane.

    The usage row is keyed by ours, never the client's: a client reusing its id would otherwise
    store one row for many paid requests. Ours is milliseconds, a counter and a random tag of this
    process, in hex: time-ordered ids make usage inserts appends to the primary key's index rather
    than random writes all over it, and cost no system call."""

    __slots__ = ("_tag", "_seq")

    def __init__(self) -> None:
        self._tag = os.urandom(4).hex()
        self._seq = 0

    def take(self, given: bytes | None) -> tuple[str, str | None]:
        """-> (the gateway's id, the client's id or None)."""
        client = None
        if given:
            text = given.decode("latin-1")
            if REQUEST_ID.match(text):
                client = text
        self._seq = (self._seq + 1) & 0xFFFFFF
        return f"{int(time.time() * 1000):011x}{self._seq:06x}{self._tag}", client
