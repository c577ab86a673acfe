"""Endpoints proxied to a model's deployments: parse -> route -> limit -> transform -> proxy.

`proxied` serves every endpoint whose request body is JSON naming a model; what differs between
them (kind, planner, estimate) comes from its `Endpoint`. `stored_response` serves what the
Responses API keeps (`/v1/responses/{id}`...), from the deployment that made it.
"""

from __future__ import annotations

import re
from typing import Any

import trio

from hxgwd.errors import BadRequest, NotFound, capped
from hxgwd.http.exchange import Request, Response
from hxgwd.offload import OFF_LOOP_BYTES
from hxgwd.limits import estimate as limit
from hxgwd.pipeline import content_encoding, proxy, route, transform
from hxgwd.pipeline.body import json_document, json_document_in_steps
from hxgwd.pipeline.context import GatewayContext
from hxgwd.pipeline.endpoint import Endpoint
from hxgwd.pipeline.exchange import Exchange
from hxgwd.pipeline.models_api import NO_TOKENS
from hxgwd.runtime import Deployment, Principal, Runtime

RESPONSE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,256}$")


def settings_of(ctx: GatewayContext, rt: Runtime, ex: Exchange) -> proxy.ProxySettings:
    return proxy.ProxySettings(
        max_attempts=rt.config.routing.max_attempts,
        deadline=ex.started + rt.config.timeouts.total,
        max_response_bytes=rt.config.server.max_response_bytes,
        max_sse_event_bytes=rt.config.server.max_sse_event_bytes,
        offload=ctx.offload)


async def proxied(ctx: GatewayContext, rt: Runtime, ex: Exchange, principal: Principal | None,
                  request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    assert principal is not None and ep.plan is not None and ep.estimate is not None and ep.kind is not None
    head = request.head
    offload = ctx.offload
    coding = content_encoding.coding(head.headers)     # a 415 before the body is read
    body = await request.read_body()
    ex.bytes_in = len(body)
    if coding is not None:
        body = await content_encoding.decoded(body, coding, rt.config.server.max_body_bytes, offload)
    payload = await offload.run(len(body), parse_payload, body)
    name = target_name(head.header(b"x-hx-model-group"), payload)
    ex.model = name
    target = route.resolve(rt, name, ep.kind, principal)
    ex.group = target.group
    features = route.RequestFeatures(prompt_bytes=len(body), max_tokens=limit.max_tokens(payload),
                                     stream=payload.get("stream") is True)
    ex.reservation = await ctx.services.limiter.admit(
        principal, ep.estimate(target.kind, payload, len(body), target.deployments))
    plan = ctx.router.plan(target, features, trio.current_time())
    in_steps = len(body) >= OFF_LOOP_BYTES
    planner, upstream = ep.plan, ep.upstream

    async def build(dep: Deployment) -> transform.CallPlan:
        # the upstream body is written anew for each deployment: a large one in a thread, in
        # steps (offload.py), like its parse
        return await offload.run(len(body), planner, upstream, payload, dep, name, in_steps)

    await proxy.forward(ex, plan, build, ctx.router, ctx.transports, ctx.gates, settings_of(ctx, rt, ex),
                        features, response)
    if ep.stores_answers and ex.answer_id and ex.status == 200 and ex.served is not None:
        ctx.response_homes.add(ex.answer_id, ex.served.id, ex.key)


async def stored_response(ctx: GatewayContext, rt: Runtime, ex: Exchange, principal: Principal | None,
                          request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    """GET / DELETE /v1/responses/{id}, and what lies below it (`/input_items`, `/cancel`): passed
    through to the deployment that made the response, for the key that made it."""
    assert principal is not None
    head = request.head
    response_id = rest.partition("/")[0]
    known = RESPONSE_ID.match(response_id) is not None
    home = ctx.response_homes.get(response_id, principal.key_name) if known else None
    if home is None and known and ctx.host is not None:    # made through another worker of this host
        home = await ctx.host.find_response(response_id, principal.key_name)
        if home is not None:
            ctx.response_homes.add(response_id, home, principal.key_name)
    dep = rt.deployments.get(home) if home is not None else None
    if dep is None:
        raise NotFound(f"No response with id '{capped(response_id)}' is known to this gateway (it keeps "
                       "the ids of responses made through it, for the key that made them).",
                       param="response_id", code="response_not_found")
    ex.model = dep.model
    # one endpoint in the usage records, not one per id; what lies below it (/input_items) kept
    ex.endpoint = "/v1/responses/{id}" + rest[len(response_id):]
    ex.reservation = await ctx.services.limiter.admit(principal, NO_TOKENS)
    body = await request.read_body() if head.method == "POST" else b""
    ex.bytes_in = len(body)
    query = head.target.partition("?")[2]
    stream = head.method == "GET" and re.search(r"(^|&)stream=true(&|$)", query) is not None
    path = f"{ep.upstream}/{rest}" + (f"?{query}" if query else "")
    features = route.RequestFeatures(prompt_bytes=len(body), max_tokens=0, stream=stream)
    plan = route.Plan(strategy="stored", order=(dep,))

    async def build(dep: Deployment) -> transform.CallPlan:
        return transform.CallPlan(path=path, bodies=(body,), public_model=dep.model, method=head.method,
                                  stream=stream, event_usage=transform.responses_event_usage, spends_usage=False)

    await proxy.forward(ex, plan, build, ctx.router, ctx.transports, ctx.gates, settings_of(ctx, rt, ex),
                        features, response)
    if head.method == "DELETE" and ex.status == 200 and "/" not in rest:
        ctx.response_homes.forget(response_id)


def parse_payload(body: bytes) -> dict[str, Any]:
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


def target_name(header: bytes | None, payload: dict[str, Any]) -> str:
    if header:
        return header.decode("latin-1").strip()
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter.", param="model", code="missing_model")
    return model
