"""Endpoints the gateway answers itself: health, readiness, the model list, its OpenAPI document,
and the clear 404 of the OpenAI APIs it does not serve."""

from __future__ import annotations

import importlib.resources
import json
import urllib.parse
from typing import Any

import trio

from hxgwd import __version__
from hxgwd.errors import NotFound, capped
from hxgwd.http.exchange import Request, Response
from hxgwd.pipeline.context import GatewayContext
from hxgwd.pipeline.endpoint import Endpoint
from hxgwd.pipeline.exchange import Exchange
from hxgwd.limits.estimate import Estimate
from hxgwd.runtime import Principal, Runtime

JSON = (b"content-type", b"application/json")
NO_TOKENS = Estimate(tokens=0, cost_usd=0.0)   # counts toward rpm only
MODELS_CACHE_SIZE = 256
# GET /openapi.json: package data made from docs/openapi.yaml by docs/build.py, read once, at import
OPENAPI_JSON = importlib.resources.files("hxgwd").joinpath("openapi.json").read_bytes()


async def health(ctx: GatewayContext, rt: Runtime, ex: Exchange, principal: Principal | None,
                 request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    body: dict[str, Any] = {"ok": True, "version": __version__, "generation": ctx.holder.current.generation}
    if ctx.host is not None:     # which worker answered, and its generation: a reload shows per worker
        body["worker"] = ctx.host.index
    await response.send_full(200, [JSON], json.dumps(body).encode())


async def ready(ctx: GatewayContext, rt: Runtime, ex: Exchange, principal: Principal | None,
                request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    rt = ctx.holder.current
    reason = None
    if not ctx.is_listening():
        reason = "not listening yet"
    elif not ctx.router.usable(rt, trio.current_time()):
        reason = "no usable backend"
    body: dict[str, Any] = {"ready": reason is None, "generation": rt.generation}
    if reason:
        body["reason"] = reason
    await response.send_full(200 if reason is None else 503, [JSON], json.dumps(body).encode())


async def openapi(ctx: GatewayContext, rt: Runtime, ex: Exchange, principal: Principal | None,
                  request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    """The OpenAPI document of this gateway's surface: the same for every config, so open to anyone."""
    await response.send_full(200, [JSON], OPENAPI_JSON)


async def models(ctx: GatewayContext, rt: Runtime, ex: Exchange, principal: Principal | None,
                 request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    assert principal is not None
    ex.reservation = await ctx.services.limiter.admit(principal, NO_TOKENS)
    names = [n for n in rt.targets if principal.may_use(n)]
    if rest:
        wanted = urllib.parse.unquote(rest)   # the SDK quotes the "/" of "org/model"
        if wanted not in names:
            raise NotFound(f"The model '{capped(wanted)}' does not exist.", code="model_not_found", param="model")
        body = json.dumps(_model_entry(rt, wanted)).encode()
    else:
        cache = ctx.models_cache
        cache_key = (rt.generation, principal.allowed)
        cached = cache.get(cache_key)
        if cached is None:
            cached = cache[cache_key] = json.dumps(
                {"object": "list", "data": [_model_entry(rt, n) for n in names]}).encode()
            if len(cache) > MODELS_CACHE_SIZE:
                cache.popitem(last=False)
        body = cached
    ex.status, ex.bytes_out = 200, len(body)
    await response.send_full(200, [JSON], body)


def _model_entry(rt: Runtime, name: str) -> dict[str, Any]:
    target = rt.targets[name]
    return {"id": name, "object": "model", "created": int(rt.loaded_at), "owned_by": "hxgwd",
            "kind": target.kind, **({"group": True} if target.group else {})}


async def not_served(ctx: GatewayContext, rt: Runtime, ex: Exchange, principal: Principal | None,
                     request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    """OpenAI APIs that keep state of their own (files, batches, assistants, ...): a gateway in
    front of many backends cannot serve them faithfully, and says so rather than a bare 404."""
    raise NotFound(f"{ep.paths[0].rstrip('/')} is not served by this gateway: see the README's list of "
                   "endpoints.", code="unsupported_endpoint")


async def unknown(ctx: GatewayContext, rt: Runtime, ex: Exchange, principal: Principal | None,
                  request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    raise NotFound(f"Unknown endpoint {capped(request.head.path)}.", code="unknown_url")
