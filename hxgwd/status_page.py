"""`GET /status`: one HTML page for the person on call, from what the host holds.

Models and groups; each deployment's breaker (and why it last moved), in flight, learned latency
and error rate; the last failed requests with their causes; upstream pools and concurrency gates;
the usage pipeline (queue, spool); store, key cache and Redis; config generation and the last
reload's result; uptime and version; with `[server] workers`, the workers. What it shows is a
status document (status_document.py): this process's, or with workers every worker's and the
supervisor's, merged; `render` makes the page from either.

Access is `"monitor"` (endpoint.py): an admin key as Bearer or as HTTP Basic's password, so a
browser asks for it. The page is read-only and server-rendered: every value goes through
`html.escape` (status_markup.py), no script, no external asset (gateway hosts are offline),
inline CSS allowed by its Content-Security-Policy and nothing else. It reloads itself every
REFRESH seconds with `<meta http-equiv="refresh">` (`?refresh=0` stops it, `?refresh=N` sets it),
so it works with JavaScript off. No secrets: key names are not shown, URLs are shown redacted.
"""

from __future__ import annotations

import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import trio

from hxgwd.errors import Unavailable, capped
from hxgwd.status_document import status_document
from hxgwd.status_markup import (CSS, Html, ago, agreed, badge, esc, facts, join, pct, secs, section, shown,
                                 table, tag, utc)

if TYPE_CHECKING:
    from hxgwd.http.exchange import Request, Response
    from hxgwd.pipeline.context import GatewayContext
    from hxgwd.pipeline.endpoint import Endpoint
    from hxgwd.pipeline.exchange import Exchange
    from hxgwd.runtime import Principal, Runtime

REFRESH = 5                      # seconds between the page's own reloads
REFRESH_RANGE = (2, 3600)        # what ?refresh=N may ask for; 0 stops it
JSON = (b"content-type", b"application/json")

HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-store"),
    # inline CSS only: no script, no image, no font, no frame, nothing fetched from anywhere
    (b"content-security-policy",
     b"default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


async def status(ctx: GatewayContext, rt: Runtime, ex: Exchange | None, principal: Principal | None,
                 request: Request, response: Response, ep: Endpoint, rest: str) -> None:
    if ctx.host is None:
        doc = status_document(ctx, rt, trio.current_time(), time.time())
    else:
        try:
            doc = await ctx.host.view("status")     # every worker's, merged (status_document.py)
        except Exception:          # the channel's PeerGone, RemoteError or a timeout, as admin.py's
            refused = Unavailable("The other workers of this host did not answer in time; try again.",
                                  code="workers_unavailable")
            await response.send_full(refused.status, [JSON, *refused.headers()], refused.body())
            return
    body = render(doc, refresh_of(request.head.target), time.time()).encode()
    await response.send_full(200, list(HEADERS), body)


def refresh_of(target: str) -> int:
    """?refresh=N: 0 for none, else within REFRESH_RANGE; REFRESH when absent or not a number."""
    values = urllib.parse.parse_qs(target.partition("?")[2]).get("refresh")
    try:
        wanted = int(values[-1]) if values else REFRESH
    except ValueError:
        return REFRESH
    return 0 if wanted <= 0 else min(max(wanted, REFRESH_RANGE[0]), REFRESH_RANGE[1])


BREAKER_LEVEL = {"closed": "ok", "half-open": "warn", "open": "bad"}
REDIS_LEVEL = {"ok": "ok", "down": "bad"}


def redis_state(limits: dict[str, Any]) -> str:
    """The limiter's view: down since a call failed; ok once one succeeded; else not called yet
    (only keys with limits call it)."""
    if limits.get("backend") != "redis":
        return "none"
    if limits.get("down"):
        return "down"
    return "ok" if limits.get("calls") else "not called yet"


# --- the page -------------------------------------------------------------------------------------

def render(doc: dict[str, Any], refresh: int, wall: float) -> str:
    """The page from a status document (status_document.py). `wall`: unix time now (ages)."""
    deployments = _deployment_rows(doc["targets"])
    open_count = sum(1 for d in deployments if d["breaker"] != "closed" or d["cooling_s"])
    sections = [
        _summary(doc, deployments, open_count, wall),
        _workers(doc["workers"], wall) if "workers" in doc else "",
        _targets(doc["targets"]),
        _deployments(doc, deployments),
        _failures(doc, wall),
        _pools(doc),
        _usage(doc, wall),
        _limits(doc),
        _config(doc, wall),
    ]
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    toggle = (Html('<a href="?refresh=0">stop refreshing</a>') if refresh
              else Html(f'<a href="?refresh={REFRESH}">refresh every {REFRESH} s</a>'))
    title = "hxgwd status" + (f" – {open_count} not closed" if open_count else "")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{meta}<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>hxgwd status</h1><p class=\"muted\">{esc(utc(wall))} · "
        f"{esc(f'refreshes every {refresh} s' if refresh else 'not refreshing')} · {toggle}</p></header>"
        f"<main>{join(sections)}</main></body></html>\n")


def _deployment_rows(targets: dict[str, Any]) -> list[dict[str, Any]]:
    """Each deployment once: from its model's target (a group repeats its models' deployments)."""
    seen: dict[str, dict[str, Any]] = {}
    for name, target in targets.items():
        for row in target["deployments"]:
            if not target["group"] or row["deployment"] not in seen:
                seen[row["deployment"]] = row
    return list(seen.values())


def _summary(doc: dict[str, Any], deployments: list[dict[str, Any]], open_count: int, wall: float) -> Html:
    usable = sum(1 for d in deployments if d["breaker"] != "open" and not d["cooling_s"])
    stats = doc["stats"]
    usage = stats.get("usage")
    store = ("none" if usage is None else "ok" if usage["store_ok"] else "down")
    redis = redis_state(stats["limits"])
    last = doc["last_reload"]
    items = [
        ("state", _state(doc)),
        ("deployments usable", badge(f"{usable} of {len(deployments)}",
                                     "ok" if usable == len(deployments) else "bad" if usable == 0 else "warn")),
        ("breakers not closed", badge(str(open_count), "ok" if not open_count else "bad")),
        ("failed requests", Html(f"{esc(doc['failures_total'])} since start "
                                 f"<a href=\"#failures\">(last {esc(len(doc['failures']))})</a>")),
        ("store", badge(store, {"ok": "ok", "down": "bad"}.get(store, "muted"))),
        ("Redis", badge(redis, REDIS_LEVEL.get(redis, "muted"))),
        ("config", f"generation {agreed(doc['generation'])}"),
        ("last reload", badge("none since start", "muted") if last is None else
         badge(f"{last['result']}, {ago(wall - last['at'])} ago", "ok" if last["result"] == "ok" else "bad")),
        ("uptime", ago(wall - doc["started_at"])),
        ("version", agreed(doc["version"])),
    ]
    return section("Now", facts(items), anchor="now")


def _state(doc: dict[str, Any]) -> Html:
    if not doc["listening"]:
        return badge("not listening (starting or draining)", "bad")
    workers = doc.get("workers")
    if workers is None:
        return badge("serving", "ok")
    serving = sum(1 for w in workers if w["serving"])
    return badge(f"serving, {serving} of {len(workers)} workers", "ok" if serving == len(workers) else "warn")


def _workers(workers: list[dict[str, Any]], wall: float) -> Html:
    rows = []
    for w in workers:
        state = (badge("crash loop", "bad") if w["crash_loop"] else badge("serving", "ok") if w["serving"]
                 else badge("restarting" if w["restarts"] else "starting", "warn"))
        rows.append((w["worker"], w["pid"], state, w["generation"],
                     badge(str(w["restarts"]), "warn") if w["restarts"] else 0, w["last_exit"],
                     None if w["started_at"] is None else ago(wall - w["started_at"]),
                     "yes" if w["answered"] else badge("no answer", "warn")))
    note = tag("p", "Processes serving this host's listeners; the supervisor restarts one that dies. The "
                    "numbers on this page add up those of the workers counted here.", "muted")
    return section("Workers", note, table(("worker", "pid", "state", "generation", "restarts", "last exit", "up",
                                           "counted here"), rows), anchor="workers")


def _targets(targets: dict[str, Any]) -> Html:
    rows = []
    for name, target in sorted(targets.items(), key=lambda kv: (not kv[1]["group"], kv[0])):
        deps = target["deployments"]
        usable = sum(1 for d in deps if d["breaker"] != "open" and not d["cooling_s"])
        rows.append((tag("strong", name), "group" if target["group"] else "model", target.get("kind"),
                     target["strategy"],
                     badge(f"{usable}/{len(deps)}", "ok" if usable == len(deps) else "bad" if not usable else "warn"),
                     join((badge(d["deployment"], BREAKER_LEVEL.get(d["breaker"], "muted")) for d in deps), " ")))
    return section("Models and groups", table(("name", "is", "kind", "strategy", "usable", "deployments"), rows),
                   anchor="targets")


def _deployments(doc: dict[str, Any], deployments: list[dict[str, Any]]) -> Html:
    gates, changes = doc["gates"], doc["breaker_changes"]
    rows = []
    for d in sorted(deployments, key=lambda d: (d["breaker"] == "closed", d["deployment"])):
        state: list[object] = [badge(d["breaker"], BREAKER_LEVEL.get(d["breaker"], "muted"))]
        if d["cooling_s"]:
            state += [" ", badge(f"cooling {d['cooling_s']:.0f} s", "warn")]
        why: list[str] = []
        change = changes.get(d["deployment"])
        if change is not None and (d["breaker"] != "closed" or change["old"] != "half-open"):
            why.append(f"{change['old']} → {change['new']}: {change['why']}"
                       + (f" ({change['cause']})" if change["cause"] else ""))
        if d["breaker"] == "open" and d.get("reopens_in_s") is not None:
            why.append(f"half-open in {d['reopens_in_s']:.0f} s")
        if d["opened"]:
            why.append(f"opened {d['opened']}× since start")
        if why:
            state.append(tag("span", shown("; ".join(why)), "why"))
        cap = d["max_concurrency"]
        gate = gates.get(d["deployment"])
        in_flight = f"{d['in_flight']}" + (f" / {agreed(cap)}" if cap else "")
        if gate and gate.get("waiting"):
            in_flight += f" (+{gate['waiting']} queued)"
        latency = d.get("latency") or {}
        rows.append((tag("strong", d["deployment"]), d["backend"], join(state), in_flight, d["requests"],
                     d["failures"], pct(d["error_rate"]),
                     Html(f"{esc(pct(d['window_error_rate']))} <span class=\"muted\">of {esc(d['window_requests'])}</span>"),
                     pct(d["throttle_rate"]), secs(d["mean_duration_s"]), secs(d["predicted_s"]),
                     secs(latency.get("intercept_s")) if d["observations"] else None))
    head = ("deployment", "backend", "breaker", "in flight", "requests", "failures", "error rate",
            "in breaker window", "429 rate", "mean time", "predicted", "base latency")
    return section("Deployments", table(head, rows), anchor="deployments")


def _failures(doc: dict[str, Any], wall: float) -> Html:
    rows = [(Html(f"{esc(utc(f['ts']))}<br><span class=\"muted\">{esc(ago(wall - f['ts']))} ago</span>"),
             badge(str(f["status"]) if f["status"] >= 400 else f"{f['status']}, failed over",
                   "bad" if f["status"] >= 500 else "warn"),
             shown(f["model"]), f["deployment"],
             f["endpoint"] if len(f["endpoint"]) < 80 else capped(f["endpoint"][:80]), f["error_type"],
             tag("span", shown(f["cause"]), "cause") if f["cause"] else None, tag("code", f["request_id"]))
            for f in doc["failures"]]
    note = tag("p", "Requests answered 5xx, or whose attempts failed (then failed over, maybe successfully); "
                    "newest first. A caller's own errors (401, 404, 400, rate limits) are not listed.", "muted")
    return section("Recent failures", note,
                   table(("time", "status", "model", "deployment", "endpoint", "error", "cause", "request id"), rows,
                         empty="none since start"), anchor="failures")


def _pools(doc: dict[str, Any]) -> Html:
    rows = [(origin, s["in_flight"], s["idle"], s["opened"], s["max_connections"] or "no cap",
             badge(str(s["refused"]), "bad") if s["refused"] else 0) for origin, s in doc["pools"].items()]
    gate_rows = [(dep, g["in_use"], g["limit"], g["waiting"], g["rejected"]) for dep, g in sorted(doc["gates"].items())]
    deferred = doc["deferred"]
    return section(
        "Upstream pools",
        table(("origin", "in use", "idle", "opened", "max connections", "refused (full)"), rows,
              empty="no upstream connection made yet"),
        tag("h3", "Concurrency gates (max_concurrency)"),
        table(("deployment", "in use", "limit", "waiting", "rejected"), gate_rows, empty="no deployment has a cap"),
        tag("p", f"Deferred bookkeeping: {deferred['pending']} pending of {deferred['max_pending']}, "
                 f"{deferred['overflowed']} run early (overflow).", "muted"),
        anchor="pools")


def _usage(doc: dict[str, Any], wall: float) -> Html:
    stats = doc["stats"]
    usage, keys, retention = stats.get("usage"), stats.get("keys"), stats.get("retention")
    if usage is None:
        return section("Usage pipeline and store",
                       tag("p", "No database ([database] url is empty): no usage records, config keys only.", "muted"),
                       anchor="usage")
    spool_share = usage["spool_bytes"] / usage["spool_max_bytes"] if usage["spool_max_bytes"] else 0.0
    items: list[tuple[str, object]] = [
        ("store", join((badge("ok" if usage["store_ok"] else "down", "ok" if usage["store_ok"] else "bad"),
                        f" {agreed(doc['store_engine']) or ''} {doc['config']['database_url'] or ''}"))),
        ("queued for the writer", usage["queued"]),
        ("written", usage["written"]),
        ("spooled", usage["spooled"]),
        ("spool", badge(f"{usage['spool_bytes']:,} of {usage['spool_max_bytes']:,} bytes ({spool_share:.0%})",
                        "ok" if spool_share < 0.5 else "warn" if spool_share < 0.9 else "bad")),
        ("replayed from the spool", usage["replayed"]),
        ("dropped", badge(str(usage["dropped"]), "bad") if usage["dropped"] else 0),
        ("rejected by the store", badge(str(usage["rejected"]), "warn") if usage["rejected"] else 0),
        ("corrupt in the spool", usage["corrupt"]),
        ("last error", tag("span", shown(usage["last_error"]), "cause") if usage["last_error"] else None),
    ]
    if keys is not None:
        loaded = keys.get("loaded_at")
        items += [
            ("store keys cached", keys["keys"]),
            ("keys read", None if loaded is None else f"{ago(wall - loaded)} ago"),
            ("key reads failing", badge(str(keys["failures"]), "bad") if keys["failures"] else 0),
            ("key store error", tag("span", shown(keys["last_error"]), "cause") if keys.get("last_error") else None),
        ]
    if retention is not None:
        items.append(("retention", f"{retention['days']} days, {retention['pruned']} pruned" if retention["days"]
                      else "keeps everything"))
    return section("Usage pipeline and store", facts(items), anchor="usage")


def _limits(doc: dict[str, Any]) -> Html:
    limits = doc["stats"]["limits"]
    local = limits.get("local", limits)
    refused = local.get("refused") or {}
    items: list[tuple[str, object]] = []
    if limits.get("backend") == "redis":
        items += [
            ("Redis", join((badge(redis_state(limits), REDIS_LEVEL.get(redis_state(limits), "muted")),
                            f" {doc['config']['redis_url'] or ''}"))),
            ("when down", limits.get("policy")),
            ("outages", limits.get("outages")), ("errors", limits.get("errors")),
            ("admitted while down (local)", limits.get("fallback_admits")), ("denied while down", limits.get("denied")),
        ]
        refused = limits.get("refused") or refused
    else:
        items.append(("counters", "this host's memory (no [redis] url)" if "workers" not in doc else
                      "this host's memory, kept by the supervisor for every worker (no [redis] url)"))
    items.append(("refused", join((f"{k}: {v}" for k, v in sorted(refused.items())), ", ") if refused else 0))
    return section("Limits and Redis", facts(items), anchor="limits")


def _config(doc: dict[str, Any], wall: float) -> Html:
    config, last = doc["config"], doc["last_reload"]
    items: list[tuple[str, object]] = [
        ("generation", config["generation"]),
        ("file", config["source"]),
        ("loaded", f"{utc(config['loaded_at'])} ({ago(wall - config['loaded_at'])} ago)"),
        ("models", config["models"]),
        ("deployments", config["deployments"]),
        ("backends", join((tag("span", f"{name} ({what})") for name, what in config["backends"]), ", ")),
        ("last reload", "none since start" if last is None else
         f"{last['result']} at {utc(last['at'])} ({ago(wall - last['at'])} ago), "
         f"serving generation {last['generation']}"),
    ]
    if last is not None and last["problems"]:
        problems = [shown(p) for p in last["problems"][:10]]
        more = len(last["problems"]) - len(problems)
        items.append(("its problems", Html("<br>".join(esc(p) for p in problems)
                                           + ("<br>" + esc(f"… and {more} more") if more else ""))))
    items += [("started", f"{utc(doc['started_at'])} ({ago(wall - doc['started_at'])} ago)"),
              ("version", f"hxgwd {agreed(doc['version'])}")]
    return section("Config", facts(items), anchor="config")
