"""Endpoints whose request is a multipart form naming a model (audio transcriptions and
translations): the form is read as it arrives, its model field found, and the upstream gets the
same form with the deployment's upstream name in that field.

The client's body is copied once, as it arrives, into the bytes around the model field's value
(`FormBody`), so a 20 MB upload is held once, not twice, and each deployment tried gets those
pieces with its own name between them, sent as they are, never joined.
"""

from __future__ import annotations

import trio

from hxgwd.errors import BadRequest, UnsupportedEncoding
from hxgwd.http.exchange import Request, Response
from hxgwd.limits.estimate import estimate
from hxgwd.pipeline import content_encoding, multipart, proxy, route, transform
from hxgwd.pipeline.context import GatewayContext
from hxgwd.pipeline.endpoint import Endpoint
from hxgwd.pipeline.exchange import Exchange
from hxgwd.pipeline.serve_model import settings_of
from hxgwd.runtime import Deployment, Principal, Runtime


class FormBody:
    """The upstream form as the bytes before and after its model field's value (`multipart.MODEL`)."""

    def __init__(self) -> None:
        self.segments: list[bytearray] = [bytearray()]

    def add(self, pieces: list[multipart.Piece]) -> None:
        for piece in pieces:
            if isinstance(piece, multipart.ModelSlot):
                self.segments.append(bytearray())
            else:
                self.segments[-1] += piece

    def pieces(self, model: bytes) -> tuple[bytes | bytearray, ...]:
        out: list[bytes | bytearray] = [self.segments[0]]
        for segment in self.segments[1:]:
            out += (model, segment)
        return tuple(out)


async def transcribe(ctx: GatewayContext, rt: Runtime, ex: Exchange, principal: Principal | None,
                     request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    assert principal is not None and ep.kind is not None
    head = request.head
    if content_encoding.coding(head.headers) is not None:
        raise UnsupportedEncoding("A multipart upload is sent as it is: its files are compressed "
                                  "already, if at all.", ())
    form = multipart.FormRewriter(multipart.parse_boundary(head.header(b"content-type")))
    request.max_body_bytes = rt.config.server.max_upload_bytes
    body = FormBody()
    async for chunk in request.body_chunks():
        body.add(form.feed(chunk))
    form.end()
    ex.bytes_in = form.bytes_in
    header = head.header(b"x-hx-model-group")
    name = header.decode("latin-1").strip() if header else form.model
    if not name:
        raise BadRequest("You must provide a model parameter.", param="model", code="missing_model")
    ex.model = name
    target = route.resolve(rt, name, ep.kind, principal)
    ex.group = target.group
    text_bytes = sum(len(value) for _, value in form.fields)
    features = route.RequestFeatures(prompt_bytes=text_bytes, max_tokens=0, stream=form.stream is True)
    ex.reservation = await ctx.services.limiter.admit(principal, estimate(ep.kind, text_bytes, 0, target.deployments))
    plan = ctx.router.plan(target, features, trio.current_time())
    content_type = head.header(b"content-type") or b""

    async def build(dep: Deployment) -> transform.CallPlan:
        try:
            model = multipart.model_bytes(dep.upstream_model)
        except ValueError:
            raise BadRequest("This deployment's upstream model name cannot be written in a form.") from None
        return transform.CallPlan(path=ep.upstream, bodies=(body.pieces(model),), public_model=name,
                                  stream=form.stream is True, content_type=content_type)

    await proxy.forward(ex, plan, build, ctx.router, ctx.transports, ctx.gates, settings_of(ctx, rt, ex),
                        features, response)
