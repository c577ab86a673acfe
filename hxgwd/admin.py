"""The admin HTTP API, for keys with `admin = true` (checked by the caller, handle.py):

    GET    /admin/routing              the live routing table: breakers, in flight, learned model, scores
    GET    /admin/stats                limiter, usage sink, key cache, pools, concurrency gates
    GET    /admin/keys                 store keys (never a secret; `?revoked=1` includes revoked ones)
    POST   /admin/keys                 {"name", "models", "rpm", "tpm", "budget_usd", "budget_period",
                                        "expires_at", "admin"} -> 201 with the key, shown this once
    GET    /admin/keys/NAME
    DELETE /admin/keys/NAME            revoke; applied on this host (every worker) before the answer,
                                       on other hosts within key_refresh
    GET    /admin/usage?since=&until=&by=key|model|deployment|day&key=
                                       since/until: unix seconds, ISO dates, or "24h" / "30d" ago
"""

from __future__ import annotations

import json
import time
import urllib.parse
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio

from hxgwd.commandline import parse_when
from hxgwd.config.validate import NAME_RE
from hxgwd.errors import BadRequest, NotFound, Unavailable, UpstreamTimeout, capped
from hxgwd.pipeline.body import json_document
from hxgwd.runtime import Principal, Runtime

if TYPE_CHECKING:
    from hxgwd.http.exchange import Request, Response
    from hxgwd.pipeline.context import GatewayContext
    from hxgwd.pipeline.endpoint import Endpoint
    from hxgwd.pipeline.exchange import Exchange
    from hxgwd.store import Store

JSON = (b"content-type", b"application/json")
READS = ("GET", "HEAD")          # HEAD is answered as GET, without the body (errors.require_method)


class Conflict(BadRequest):
    status = 409
    code = "conflict"


class DatabaseTimeout(UpstreamTimeout):
    """504: the database answers, but not this query within [database] statement_timeout."""

    code = "database_timeout"


async def routing(ctx: GatewayContext, rt: Runtime, ex: Exchange, principal: Principal | None,
                  request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    await _send(response, ex, 200, await _host_or_local(ctx, "routing", local_routing(ctx, rt)))


async def stats(ctx: GatewayContext, rt: Runtime, ex: Exchange, principal: Principal | None,
                request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    await _send(response, ex, 200, await _host_or_local(ctx, "stats", local_stats(ctx, rt)))


def local_routing(ctx: GatewayContext, rt: Runtime) -> dict[str, Any]:
    return {"generation": rt.generation, "targets": ctx.router.table(rt, trio.current_time())}


def local_stats(ctx: GatewayContext, rt: Runtime) -> dict[str, Any]:
    return {
        "generation": rt.generation, **ctx.services.statistics(),
        "concurrency": ctx.gates.statistics(),
        "deferred": ctx.idle.statistics(),
        "stored_responses": len(ctx.response_homes),
        "pools": {f"{p.origin.scheme}://{p.origin.host}:{p.origin.port}": p.statistics()
                  for p in ctx.transports.pools()}}


async def _host_or_local(ctx: GatewayContext, what: str, local: dict[str, Any]) -> Any:
    """With workers, the host's view (every worker's, merged); a 503 if the supervisor cannot
    gather it in time. A single process: its own."""
    if ctx.host is None:
        return local
    try:
        return await ctx.host.view(what)
    except Exception as exc:       # the channel's PeerGone, RemoteError or a timeout
        raise Unavailable("The other workers of this host did not answer in time; try again.",
                          code="workers_unavailable") from exc


async def keys(ctx: GatewayContext, rt: Runtime, ex: Exchange, principal: Principal | None,
               request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    await _with_store(ctx, rt, ex, response, "database query", lambda store: _keys(ctx, store, request))


async def key(ctx: GatewayContext, rt: Runtime, ex: Exchange, principal: Principal | None,
              request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    name = urllib.parse.unquote(rest)
    await _with_store(ctx, rt, ex, response, "database query", lambda store: _key(ctx, store, name, request))


async def usage(ctx: GatewayContext, rt: Runtime, ex: Exchange, principal: Principal | None,
                request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    params = _params(request)
    await _with_store(ctx, rt, ex, response, "usage query",
                      lambda store: _usage(store, params, rt.config.limits.timezone))


def _params(request: Request) -> dict[str, str]:
    query = request.head.target.partition("?")[2]
    return {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}


async def _with_store(ctx: GatewayContext, rt: Runtime, ex: Exchange, response: Response, what: str,
                      call: Callable[[Store], Awaitable[tuple[int, Any]]]) -> None:
    """Runs a store call within the database's bounds, its failures as answers."""
    store = ctx.services.store
    if store is None:
        raise Unavailable("No database is configured ([database] url).", code="no_database")
    from hxgwd.store import KeyExists, KeyNotFound, StoreTimeout, StoreUnavailable

    db = rt.config.database
    # SQLite has no statement timeout of its own (PostgreSQL's server enforces one): the same
    # bound here, and a cancel interrupts the query in its thread
    limit = db.connect_timeout + db.statement_timeout
    status: int | None = None
    with trio.move_on_after(limit) as bound:
        try:
            status, doc = await call(store)
        except KeyExists as exc:
            raise Conflict(str(exc)) from None
        except KeyNotFound as exc:
            raise NotFound(capped(str(exc)), code="key_not_found") from None
        except StoreTimeout:
            raise DatabaseTimeout(f"The {what} timed out: the database did not answer within "
                                  f"{db.statement_timeout:g} s ([database] statement_timeout).") from None
        except StoreUnavailable:
            if not bound.cancel_called:    # else: the interrupted query, reporting itself
                raise Unavailable("The database is unreachable.", code="database_unavailable",
                                  retry_after=5) from None
    if status is None:
        raise DatabaseTimeout(f"The {what} timed out: no answer within {limit:g} s "
                              "([database] connect_timeout + statement_timeout).")
    await _send(response, ex, status, doc)


async def _keys(ctx: GatewayContext, store: Store, request: Request) -> tuple[int, Any]:
    head = request.head
    now = time.time()
    if head.method in READS:
        listed = await store.list_keys(include_revoked=_params(request).get("revoked") in ("1", "true"))
        return 200, {"object": "list", "data": [k.as_dict(now) for k in listed]}
    doc = _json_object(await request.read_body())
    config_names = {k.name for k in ctx.holder.current.config.keys}
    fields = _key_fields(doc, ctx.holder.current, config_names)
    if fields["name"] in config_names:
        raise Conflict(f"A key named {fields['name']!r} is in the config file.")
    made, info = await store.create_key(**fields)
    await _refresh_keys(ctx)
    return 201, {"key": made, **info.as_dict(now)}


async def _key(ctx: GatewayContext, store: Store, name: str, request: Request) -> tuple[int, Any]:
    now = time.time()
    if request.head.method in READS:
        return 200, (await store.get_key(name)).as_dict(now)
    info = await store.revoke_key(name)
    await _refresh_keys(ctx)
    return 200, info.as_dict(now)


async def _refresh_keys(ctx: GatewayContext) -> None:
    """After a key was made or revoked: this worker's key cache, and every other worker's, are
    reloaded before the answer goes out, so that the key works, or is refused, wherever the
    client's next request lands."""
    keys = ctx.services.keys
    assert keys is not None, "the key cache comes with the store"
    await keys.refresh()
    if ctx.host is not None:
        try:
            await ctx.host.keys_changed()
        except Exception as exc:      # stored already: the others read it within key_refresh
            ctx.log.warning("the other workers did not confirm the key change",
                            error=f"{type(exc).__name__}: {exc}"[:200])


def _key_fields(doc: dict[str, Any], rt: Runtime, config_names: set[str]) -> dict[str, Any]:
    allowed = {"name", "models", "admin", "rpm", "tpm", "budget_usd", "budget_period", "expires_at"}
    unknown = set(doc) - allowed
    if unknown:
        raise BadRequest(f"Unknown fields: {capped(', '.join(sorted(unknown)))}.", param=capped(sorted(unknown)[0]))
    name = doc.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name.strip()):
        raise BadRequest("'name' is 1-128 letters, digits and ._:/@- (starting with a letter or digit).",
                         param="name")
    models = doc.get("models", [])
    targets = rt.targets
    if not isinstance(models, list) or any(not isinstance(m, str) or m not in targets for m in models):
        raise BadRequest("'models' must list models or groups of the config.", param="models")
    for field in ("rpm", "tpm"):
        value = doc.get(field)
        if value is not None and (type(value) is not int or not 1 <= value < 1 << 40):
            raise BadRequest(f"'{field}' must be a positive integer.", param=field)
    budget = doc.get("budget_usd")
    if budget is not None and (type(budget) not in (int, float) or not 0 <= budget < 1e12):
        raise BadRequest("'budget_usd' must be 0 or more.", param="budget_usd")
    if doc.get("budget_period", "month") not in ("day", "month"):
        raise BadRequest("'budget_period' is 'day' or 'month'.", param="budget_period")
    expires = doc.get("expires_at")
    if expires is not None and (type(expires) not in (int, float) or not 0 <= expires < 1e11):
        raise BadRequest("'expires_at' is unix seconds.", param="expires_at")
    return {"name": name.strip(), "models": tuple(models), "admin": bool(doc.get("admin", False)),
            "rpm": doc.get("rpm"), "tpm": doc.get("tpm"), "budget_usd": doc.get("budget_usd"),
            "budget_period": doc.get("budget_period", "month"), "expires_at": expires}


async def _usage(store: Store, params: dict[str, str], tz: str) -> tuple[int, Any]:

    now = time.time()
    by = params.get("by", "key")
    if by not in ("key", "model", "deployment", "day"):
        raise BadRequest("'by' is one of key, model, deployment, day.", param="by")
    def when(text: str | None) -> float | None:
        if not text:
            return None
        try:
            seconds = float(text)        # unix seconds
        except ValueError:
            return parse_when(text, now, tz=tz)
        if not 0 <= seconds < 1e11:      # NaN and inf included
            raise ValueError(text)
        return seconds

    try:
        since, until = when(params.get("since")), when(params.get("until"))
    except ValueError:
        raise BadRequest("'since' and 'until' are unix seconds, ISO dates or durations like 24h.") from None
    rows = await store.usage_summary(since, until, by, key=params.get("key"), tz=tz)
    return 200, {"by": by, "since": since, "until": until, "timezone": tz, "data": rows}


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json_document(body or b"{}")
    except ValueError:
        raise BadRequest("The body is not JSON.", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise BadRequest("The body must be a JSON object.", code="invalid_json")
    return doc


async def _send(response: Response, ex: Exchange, status: int, doc: Any) -> None:
    body = json.dumps(doc, default=str).encode()
    ex.bytes_out = len(body)       # the access line's bytes_out: what was answered
    await response.send_full(status, [JSON], body)

