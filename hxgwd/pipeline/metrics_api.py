"""`GET /metrics`: the Prometheus scrape (hxgwd/metrics/).

An "anyone" entry of the table, which checks its own credentials: an admin key as
`Authorization: Bearer`, or as the password of HTTP Basic (any user name), which is how Prometheus
scrape configs (`basic_auth`) and browsers send one; `[metrics] public = true` opens it. A scrape is
not an API request: no usage record, no access line (every 15 s of every Prometheus would be most
of both), and it counts in none of the request series.
"""

from __future__ import annotations

from hxgwd.errors import GatewayError, Unavailable
from hxgwd.http.exchange import Request, Response
from hxgwd.metrics import exposition
from hxgwd.metrics.collect import collect
from hxgwd.pipeline.authenticate import authenticate_monitor
from hxgwd.pipeline.context import GatewayContext
from hxgwd.pipeline.endpoint import Endpoint
from hxgwd.pipeline.exchange import Exchange
from hxgwd.runtime import Principal, Runtime

JSON = (b"content-type", b"application/json")


async def metrics(ctx: GatewayContext, rt: Runtime, ex: Exchange | None, principal: Principal | None,
                  request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    rt = ctx.holder.current
    head = request.head
    if not rt.config.metrics.public:
        try:
            authenticate_monitor(head.headers, ctx.services.key_lookups(rt))   # as /status takes one
        except GatewayError as exc:
            await response.send_full(exc.status, [JSON, *exc.headers()], exc.body())
            return
    openmetrics = exposition.wants_openmetrics(head.header(b"accept"))
    if ctx.host is None:
        families = ctx.metrics.families() + collect(ctx, rt)
    else:
        try:
            families = await ctx.host.view("metrics")     # every worker's, summed (workers/merge.py)
        except Exception:
            refused = Unavailable("The other workers of this host did not answer in time; try again.",
                                  code="workers_unavailable")
            await response.send_full(refused.status, [JSON, *refused.headers()], refused.body())
            return
    body = exposition.render(families, openmetrics)
    await response.send_full(200, [(b"content-type", exposition.OPENMETRICS if openmetrics else exposition.TEXT),
                                   (b"cache-control", b"no-store")], body)
