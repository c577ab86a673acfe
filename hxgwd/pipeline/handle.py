"""The one place the stages meet: parse -> authenticate -> route -> transform -> proxy -> record.

`Gateway` is the handler the HTTP layer calls for each request. It reads the config snapshot once
(`holder.current`) and passes it down, so a reload mid-request changes nothing for that request.
Stage logic lives in the stage modules; this module only sequences them and turns errors into
answers.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.parse
from collections import OrderedDict
from typing import Any, Callable

import trio

from hxgwd import __version__
from hxgwd.errors import BadRequest, GatewayError, NotFound, ShuttingDown, capped, require_method
from hxgwd.idle import IdleWork
from hxgwd.logs import Logger
from hxgwd import admin, memtrim
from hxgwd.offload import OFF_LOOP_BYTES, Offload
from hxgwd.pipeline import authenticate, content_encoding, cors, limit, proxy, record, route, transform
from hxgwd.http.connection import ClientGone, Request, Response
from hxgwd.pipeline.body import json_document, json_document_in_steps
from hxgwd.runtime import Deployment, Principal, Runtime, RuntimeHolder
from hxgwd.services import Services
from hxgwd.store.schema import record_from_values
from hxgwd.upstream import Transports
from hxgwd.upstream.gates import Gates

JSON = (b"content-type", b"application/json")
API_POST = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
NO_TOKENS = limit.Estimate(tokens=0, cost_usd=0.0)   # /v1/models: counts toward rpm only


class Gateway:
    def __init__(self, holder: RuntimeHolder, router: route.Router, transports: Transports, gates: Gates,
                 services: Services, log: Logger, idle: IdleWork, *,
                 is_listening: Callable[[], bool] = lambda: True,
                 is_cutting_off: Callable[[], bool] = lambda: False) -> None:
        self.holder = holder
        self.services = services
        self.limiter = services.limiter
        self.router = router
        self.transports = transports
        self.gates = gates
        self.log = log
        self.idle = idle
        self.is_listening = is_listening
        self.is_cutting_off = is_cutting_off   # shutdown: the grace is over, or a second signal came
        self._models_cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._ids = RequestIds()
        self._memory = memtrim.MemoryTrim()
        self._offload = Offload()

    async def __call__(self, request: Request, response: Response) -> None:
        head = request.head
        path = head.path
        if path == "/healthz":
            require_method(head.method, "GET")
            await self._health(response)
            return
        if path == "/readyz":
            require_method(head.method, "GET")
            await self._ready(response)
            return
        rt = self.holder.current
        if (preflight := cors.preflight(rt.config.server, head)) is not None:   # a browser's, without a key
            await response.send_full(*preflight)
            return
        rid, client_rid = self._ids.take(head.header(b"x-request-id"))
        response.add_header(b"x-request-id", (client_rid or rid).encode())
        response.add_header(b"x-hx-request-id", rid.encode())
        for name, value in cors.answer_headers(rt.config.server, head):
            response.add_header(name, value)
        ex = proxy.Exchange(request_id=rid, started=trio.current_time(), ts=time.time(), endpoint=path,
                            client_request_id=client_rid, client_headers=head.headers)
        try:
            await self._api(rt, ex, request, response)
        except GatewayError as exc:
            ex.error, ex.status = exc, exc.status
            if response.started:
                raise
            await response.send_full(exc.status, [JSON, *exc.headers()], exc.body())
        except ClientGone:
            ex.client_gone = True
            raise
        except Exception:         # a bug: the HTTP layer answers 500 and logs it; recorded as ours
            ex.error, ex.status = GatewayError("Internal error."), 500
            raise
        except BaseException:         # cancelled: by a hang-up, or by the end of the shutdown grace
            if self.is_cutting_off():
                ex.error = ShuttingDown("The gateway stopped before the answer was complete.")
                ex.status = ex.error.status
            else:
                ex.client_gone = True
            raise
        finally:
            ended = trio.current_time()
            cost = self._cost(ex)
            # the usage record's values now, before any await: journaled, they survive a kill -9
            # (store/usage.py); the RequestRecord is made later, with the access line
            try:
                values = self._values(rt, ex, cost, ended)
                usage = self.services.usage
                segment = usage.journal(values) if usage is not None else None
            except Exception as exc:   # a bug: never worth skipping the settle below, or the answer
                values = None
                self.log.exception("cannot record a finished request", exc)
            if ex.reservation is not None:   # settle shields itself: it runs even when cancelled
                tokens, charged = (ex.usage or {}).get("total_tokens"), cost
                failed = ex.status >= 400 or ex.status == 0
                if ex.fanout_left:
                    # cut short mid-fan-out: charged for the calls that finished, and the calls that
                    # did not keep their share of the reservation (the upstream may have done them)
                    tokens, charged = _with_unfinished_share(ex, tokens, cost)
                await self.limiter.settle(ex.reservation, 0 if failed and tokens is None else tokens,
                                          0.0 if failed and charged is None else charged)
            if ex.bytes_in + ex.bytes_out >= memtrim.AFTER_BYTES and self._memory.wanted():
                self.idle.defer(self._memory.trim)
            # the record for the store and the access line wait for a quiet moment: not on the next
            # request's path (idle.py); the journal holds the record meanwhile
            if values is not None:
                self.idle.defer(self._finish, values, segment)

    async def _api(self, rt: Runtime, ex: proxy.Exchange, request: Request, response: Response) -> None:
        head = request.head
        path = ex.endpoint
        # Before anything that depends on the path: without a key, which paths exist (404 or 405)
        # is nobody's business.
        principal = self._authenticate(rt, ex, head.headers)
        if path == "/v1/models" or path.startswith("/v1/models/"):
            require_method(head.method, "GET")
            ex.reservation = await self.limiter.admit(principal, NO_TOKENS)
            await self._models(rt, principal, path, response)
            ex.status = 200
            return
        if path.startswith("/admin/"):
            authenticate.require_admin(principal)
            await admin.handle(self, rt, request, response)
            ex.status = 200
            return
        if path not in API_POST:
            raise NotFound(f"Unknown endpoint {capped(path)}.", code="unknown_url")
        if head.method != "POST":
            require_method(head.method, "POST")
        coding = content_encoding.coding(head.headers)     # a 415 before the body is read
        body = await request.read_body()
        ex.bytes_in = len(body)
        if coding is not None:
            body = await content_encoding.decoded(body, coding, rt.config.server.max_body_bytes, self._offload)
        payload = await self._offload.run(len(body), _payload, body)
        name = _target_name(head.header(b"x-hx-model-group"), payload)
        endpoint = path[3:]          # below /v1
        ex.model = name
        target = route.resolve(rt, name, transform.ENDPOINT_KINDS[endpoint], principal)
        ex.group = target.group
        features = route.RequestFeatures(prompt_bytes=len(body), max_tokens=_max_tokens(payload),
                                         stream=payload.get("stream") is True)
        ex.reservation = await self.limiter.admit(
            principal, limit.estimate_request(target.kind, payload, len(body), target.deployments))
        plan = self.router.plan(target, features, trio.current_time())
        settings = proxy.ProxySettings(
            max_attempts=rt.config.routing.max_attempts,
            deadline=ex.started + rt.config.timeouts.total,
            max_response_bytes=rt.config.server.max_response_bytes,
            max_sse_event_bytes=rt.config.server.max_sse_event_bytes,
            offload=self._offload)
        in_steps = len(body) >= OFF_LOOP_BYTES

        async def build(dep: Deployment) -> transform.CallPlan:
            # the upstream body is written anew for each deployment: a large one in a thread, in
            # steps (offload.py), like its parse
            return await self._offload.run(len(body), transform.plan_calls, endpoint, payload, dep, name,
                                           in_steps)

        await proxy.forward(ex, plan, build, self.router, self.transports, self.gates, settings, features,
                            response)

    def _authenticate(self, rt: Runtime, ex: proxy.Exchange, headers) -> Principal:
        principal, _digest = authenticate.authenticate(headers, self.services.key_lookups(rt))
        ex.key = principal.key_name
        return principal

    async def _models(self, rt: Runtime, principal: Principal, path: str, response: Response) -> None:
        names = [n for n in rt.targets if principal.may_use(n)]
        if path != "/v1/models":
            wanted = urllib.parse.unquote(path[len("/v1/models/"):])   # the SDK quotes the "/" of "org/model"
            if wanted not in names:
                raise NotFound(f"The model '{capped(wanted)}' does not exist.", code="model_not_found", param="model")
            body = json.dumps(_model_entry(rt, wanted)).encode()
        else:
            cache_key = (rt.generation, principal.allowed)
            body = self._models_cache.get(cache_key)
            if body is None:
                body = json.dumps({"object": "list", "data": [_model_entry(rt, n) for n in names]}).encode()
                self._models_cache[cache_key] = body
                if len(self._models_cache) > 256:
                    self._models_cache.popitem(last=False)
        await response.send_full(200, [JSON], body)

    async def _health(self, response: Response) -> None:
        rt = self.holder.current
        body = {"ok": True, "version": __version__, "generation": rt.generation}
        await response.send_full(200, [JSON], json.dumps(body).encode())

    async def _ready(self, response: Response) -> None:
        rt = self.holder.current
        reason = None
        if not self.is_listening():
            reason = "not listening yet"
        elif not self.router.usable(rt, trio.current_time()):
            reason = "no usable backend"
        body = {"ready": reason is None, "generation": rt.generation}
        if reason:
            body["reason"] = reason
        await response.send_full(200 if reason is None else 503, [JSON], json.dumps(body).encode())

    @staticmethod
    def _cost(ex: proxy.Exchange) -> float | None:
        if ex.usage is None or ex.served is None:
            return None
        return limit.usage_cost(ex.served.config, ex.usage.get("prompt_tokens") or 0,
                                ex.usage.get("completion_tokens") or 0)

    @staticmethod
    def _values(rt: Runtime, ex: proxy.Exchange, cost: float | None, ended: float) -> tuple[Any, ...]:
        """The finished request's record as values in schema.LINE_FIELDS order: what the journal
        writes, on the request path. A tuple, not the attrs RequestRecord: that cost ~8 us a
        request in a running daemon (25 frozen fields), and is made later (`_finish`)."""
        err = ex.error
        if ex.client_gone:
            status = record.STATUS_CLIENT_CLOSED
            error_type, fault = (err.type, err.fault) if err else ("client_closed", "client")
        else:
            status = ex.status
            error_type, fault = (err.type, err.fault) if err else (None, _upstream_fault(status))
        prompt, completion, total = record.usage_tokens(ex.usage)
        ttfb = ex.ttfb
        # the order of schema.LINE_FIELDS (tests/test_store_journal.py checks it against record.py)
        return (ex.ts, ex.request_id, ex.client_request_id, ex.key, ex.endpoint, ex.model, ex.group,
                ex.deployment, ex.backend, status, error_type, fault, ex.stream, prompt, completion, total,
                cost, ex.bytes_in, ex.bytes_out, (ended - ex.started) * 1000, ex.upstream_time * 1000,
                ttfb * 1000 if ttfb is not None else None, ex.attempts, ex.route, rt.generation)

    def _finish(self, values: tuple[Any, ...], segment: str | None) -> None:
        """Deferred (idle.py): the RequestRecord of values `journal` wrote, to the usage writer and
        the access log."""
        usage = self.services.usage
        try:
            rec = record_from_values(values)
        except Exception:   # a bug: its segment must not stay pending forever (replay decides)
            if usage is not None and segment is not None:
                usage.abandon(segment)
            raise
        if usage is not None:
            usage.hand(segment, rec)
        self.log.access(rec)


def _model_entry(rt: Runtime, name: str) -> dict[str, Any]:
    target = rt.targets[name]
    return {"id": name, "object": "model", "created": int(rt.loaded_at), "owned_by": "hxgwd",
            "kind": target.kind, **({"group": True} if target.group else {})}


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


def _upstream_fault(status: int) -> str | None:
    """Whose fault an upstream's error answer, passed through, was: its 4xx are the caller's
    (bad request, unknown model), its 5xx and 429 its own (a provider's limit, not ours)."""
    if status < 400:
        return None
    return "caller" if status < 500 and status != 429 else "upstream"


def _with_unfinished_share(ex: proxy.Exchange, tokens: int | None,
                           cost: float | None) -> tuple[int | None, float | None]:
    res = ex.reservation
    left = ex.fanout_left / ex.fanout_calls
    if getattr(res, "tokens", None) is not None:
        tokens = (tokens or 0) + math.ceil(res.tokens * left)
    if getattr(res, "nano_usd", None) is not None:
        cost = (cost or 0.0) + res.cost_usd * left
    return tokens, cost


def _payload(body: bytes) -> dict[str, Any]:
    # a large body is parsed in a thread (Offload): in steps there, so the loop's thread runs between them
    decode = json_document if len(body) < OFF_LOOP_BYTES else json_document_in_steps
    try:
        payload = decode(body)
    except ValueError:
        raise BadRequest("We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    if (key := transform.ambiguous_key(payload)) is not None:
        raise BadRequest(f"The parameter '{key[:64]}' could be read as '{key.casefold()[:64]}': use the "
                         "exact lowercase name, once.", param=key[:256], code="ambiguous_parameter")
    return payload


def _target_name(header: bytes | None, payload: dict[str, Any]) -> str:
    if header:
        return header.decode("latin-1").strip()
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter.", param="model", code="missing_model")
    return model


def _max_tokens(payload: dict[str, Any]) -> int:
    return limit.max_tokens(payload)      # the routing estimate reads it as the limits do
