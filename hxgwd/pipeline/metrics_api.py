"""`GET /metrics`: the Prometheus scrape (hxgwd/metrics/).

An "anyone" entry of the table, which checks its own credentials: an admin key as
`Authorization: Bearer`, or as the password of HTTP Basic (any user name), which is how Prometheus
scrape configs (`basic_auth`) and browsers send one; `[metrics] public = true` opens it. A scrape is
not an API request: no usage record, no access line (every 15 s of every Prometheus would be most
of both), and it counts in none of the request series.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from hxgwd.errors import Forbidden, GatewayError, Unauthorized
from hxgwd.http import Headers
from hxgwd.http.exchange import Request, Response
from hxgwd.metrics import exposition
from hxgwd.metrics.collect import collect
from hxgwd.pipeline.authenticate import presented_key
from hxgwd.pipeline.context import GatewayContext
from hxgwd.pipeline.endpoint import Endpoint
from hxgwd.pipeline.exchange import Exchange
from hxgwd.runtime import Principal, Runtime

JSON = (b"content-type", b"application/json")
CHALLENGE = [(b"www-authenticate", b'Basic realm="hxgwd", charset="UTF-8"'), (b"www-authenticate", b"Bearer")]


async def metrics(ctx: GatewayContext, rt: Runtime, ex: Exchange | None, principal: Principal | None,
                  request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    rt = ctx.holder.current
    head = request.head
    if not rt.config.metrics.public:
        try:
            _require_admin(ctx, rt, head.headers)
        except GatewayError as exc:
            extra = CHALLENGE if exc.status == 401 else []
            await response.send_full(exc.status, [JSON, *extra], exc.body())
            return
    openmetrics = exposition.wants_openmetrics(head.header(b"accept"))
    families = ctx.metrics.families() + collect(ctx, rt)
    body = exposition.render(families, openmetrics)
    await response.send_full(200, [(b"content-type", exposition.OPENMETRICS if openmetrics else exposition.TEXT),
                                   (b"cache-control", b"no-store")], body)


def basic_password(headers: Headers) -> str | None:
    """The password of `Authorization: Basic base64(user:password)`, or None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"basic":
                return None
            try:
                decoded = base64.b64decode(token.strip(), validate=True)
            except (binascii.Error, ValueError):
                return None
            _user, colon, password = decoded.partition(b":")
            return password.decode("latin-1") if colon and password else None
    return None


def _require_admin(ctx: GatewayContext, rt: Runtime, headers: Headers) -> None:
    key = basic_password(headers) or presented_key(headers)
    if key is None:
        raise Unauthorized("Send an admin key as 'Authorization: Bearer <key>' or as the password of "
                           "HTTP Basic auth.", code="missing_api_key")
    digest = hashlib.sha256(key.encode("latin-1")).digest()
    for lookup in ctx.services.key_lookups(rt):
        principal = lookup(digest)
        if principal is not None and hmac.compare_digest(principal.digest or digest, digest):
            if not principal.admin:
                raise Forbidden("This key is not an admin key.", code="admin_required")
            return
    raise Unauthorized("Invalid API key.")
