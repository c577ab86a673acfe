"""`GET /status`: one HTML page for the person on call, from what the process holds.

Models and groups; each deployment's breaker (and why it last moved), in flight, learned latency
and error rate; the last failed requests with their causes; upstream pools and concurrency gates;
the usage pipeline (queue, spool); store, key cache and Redis; config generation and the last
reload's result; uptime and version.

Access is `"monitor"` (endpoint.py): an admin key as Bearer or as HTTP Basic's password, so a
browser asks for it. The page is read-only and server-rendered: every value goes through
`html.escape` (causes and store errors quote what upstreams and databases said, a failed request's
model is what the client sent), no script, no external asset (gateway hosts are offline), inline
CSS allowed by its Content-Security-Policy and nothing else. It reloads itself every REFRESH
seconds with `<meta http-equiv="refresh">` (`?refresh=0` stops it, `?refresh=N` sets it), so it
works with JavaScript off. No secrets: key names are not shown, URLs are shown redacted.
"""

from __future__ import annotations

import html
import time
import urllib.parse
from typing import TYPE_CHECKING, Any, Iterable

import trio

from hxgwd import __version__
from hxgwd.errors import capped
from hxgwd.events import redact

if TYPE_CHECKING:
    from hxgwd.http.exchange import Request, Response
    from hxgwd.pipeline.context import GatewayContext
    from hxgwd.pipeline.endpoint import Endpoint
    from hxgwd.pipeline.exchange import Exchange
    from hxgwd.runtime import Principal, Runtime

REFRESH = 5                      # seconds between the page's own reloads
REFRESH_RANGE = (2, 3600)        # what ?refresh=N may ask for; 0 stops it
SHOWN_CHARS = 300                # of a cause or an error: the rest is cut (capped() says so)

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
    body = render(ctx, rt, refresh_of(request.head.target), trio.current_time(), time.time()).encode()
    await response.send_full(200, list(HEADERS), body)


def refresh_of(target: str) -> int:
    """?refresh=N: 0 for none, else within REFRESH_RANGE; REFRESH when absent or not a number."""
    values = urllib.parse.parse_qs(target.partition("?")[2]).get("refresh")
    try:
        wanted = int(values[-1]) if values else REFRESH
    except ValueError:
        return REFRESH
    return 0 if wanted <= 0 else min(max(wanted, REFRESH_RANGE[0]), REFRESH_RANGE[1])


# --- markup ---------------------------------------------------------------------------------------

class Html(str):
    """Markup made here, from escaped parts: `esc` passes it as is. Anything else is text."""


def esc(value: object) -> Html:
    if isinstance(value, Html):
        return value
    if value is None:
        return Html("–")
    if isinstance(value, float):
        value = f"{value:.4g}"
    return Html(html.escape(str(value), quote=True))


def tag(name: str, content: object, cls: str | None = None, title: object = None) -> Html:
    attrs = f' class="{esc(cls)}"' if cls else ""
    if title is not None:
        attrs += f' title="{esc(title)}"'
    return Html(f"<{name}{attrs}>{esc(content)}</{name}>")


def join(parts: Iterable[object], sep: str = "") -> Html:
    return Html(sep.join(esc(p) for p in parts))


def table(head: Iterable[str], rows: Iterable[Iterable[object]], empty: str = "none") -> Html:
    rows = list(rows)
    if not rows:
        return tag("p", empty, "muted")
    header = join(tag("th", h) for h in head)
    body = join(Html(f"<tr>{join(tag('td', c) for c in row)}</tr>") for row in rows)
    return Html(f'<div class="scroll"><table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></div>')


def section(title: str, *content: object, anchor: str) -> Html:
    return Html(f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{join(content)}</section>')


def badge(text: str, level: str) -> Html:
    """level: ok, warn, bad, muted."""
    return tag("span", text, f"badge {level}")


def facts(pairs: Iterable[tuple[str, object]]) -> Html:
    items = join(Html("<div>" + tag("dt", k) + tag("dd", v) + "</div>") for k, v in pairs)
    return Html(f"<dl>{items}</dl>")


def shown(text: object) -> str | None:
    return None if text is None else capped(str(text))[:SHOWN_CHARS + 40]


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def secs(value: object) -> str | None:
    return None if not isinstance(value, (int, float)) else f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def pct(value: object) -> str | None:
    return None if not isinstance(value, (int, float)) else f"{value * 100:.1f} %"


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

def render(ctx: GatewayContext, rt: Runtime, refresh: int, now: float, wall: float) -> str:
    """The page. `now`: the trio clock (breakers, cooling); `wall`: unix time (uptime, ages)."""
    targets: dict[str, Any] = ctx.router.table(rt, now)
    deployments = _deployment_rows(ctx, targets)
    open_count = sum(1 for d in deployments if d["breaker"] != "closed" or d["cooling_s"])
    stats = ctx.services.statistics()
    sections = [
        _summary(ctx, rt, stats, deployments, open_count, wall),
        _targets(rt, targets),
        _deployments(ctx, deployments),
        _failures(ctx, wall),
        _pools(ctx),
        _usage(ctx, rt, stats, wall),
        _limits(rt, stats),
        _config(ctx, rt, wall),
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


def _deployment_rows(ctx: GatewayContext, targets: dict[str, Any]) -> list[dict[str, Any]]:
    """Each deployment once: from its model's target (a group repeats its models' deployments)."""
    seen: dict[str, dict[str, Any]] = {}
    for name, target in targets.items():
        for row in target["deployments"]:
            if not target["group"] or row["deployment"] not in seen:
                seen[row["deployment"]] = row
    return list(seen.values())


def _summary(ctx: GatewayContext, rt: Runtime, stats: dict[str, Any], deployments: list[dict[str, Any]],
             open_count: int, wall: float) -> Html:
    usable = sum(1 for d in deployments if d["breaker"] != "open" and not d["cooling_s"])
    usage = stats.get("usage")
    store = ("none" if usage is None else "ok" if usage["store_ok"] else "down")
    limits = stats["limits"]
    redis = redis_state(limits)
    last = ctx.holder.last_reload
    serving = "serving" if ctx.is_listening() else "not listening (starting or draining)"
    items = [
        ("state", badge(serving, "ok" if ctx.is_listening() else "bad")),
        ("deployments usable", badge(f"{usable} of {len(deployments)}",
                                     "ok" if usable == len(deployments) else "bad" if usable == 0 else "warn")),
        ("breakers not closed", badge(str(open_count), "ok" if not open_count else "bad")),
        ("failed requests", Html(f"{esc(ctx.failures.total)} since start "
                                 f"<a href=\"#failures\">(last {esc(len(ctx.failures.latest()))})</a>")),
        ("store", badge(store, {"ok": "ok", "down": "bad"}.get(store, "muted"))),
        ("Redis", badge(redis, REDIS_LEVEL.get(redis, "muted"))),
        ("config", f"generation {rt.generation}"),
        ("last reload", badge("none since start", "muted") if last is None else
         badge(f"{last.result}, {ago(wall - last.at)} ago", "ok" if last.result == "ok" else "bad")),
        ("uptime", ago(wall - ctx.started_at)),
        ("version", __version__),
    ]
    return section("Now", facts(items), anchor="now")


def _targets(rt: Runtime, targets: dict[str, Any]) -> Html:
    rows = []
    for name, target in sorted(targets.items(), key=lambda kv: (not kv[1]["group"], kv[0])):
        deps = target["deployments"]
        states = [d["breaker"] for d in deps]
        usable = sum(1 for d in deps if d["breaker"] != "open" and not d["cooling_s"])
        kind = rt.targets[name].kind if name in rt.targets else None
        rows.append((tag("strong", name), "group" if target["group"] else "model", kind, target["strategy"],
                     badge(f"{usable}/{len(deps)}", "ok" if usable == len(deps) else "bad" if not usable else "warn"),
                     join((badge(d["deployment"], BREAKER_LEVEL.get(s, "muted")) for d, s in zip(deps, states)), " ")))
    return section("Models and groups", table(("name", "is", "kind", "strategy", "usable", "deployments"), rows),
                   anchor="targets")


def _deployments(ctx: GatewayContext, deployments: list[dict[str, Any]]) -> Html:
    gates = ctx.gates.statistics()
    rows = []
    for d in sorted(deployments, key=lambda d: (d["breaker"] == "closed", d["deployment"])):
        state: list[object] = [badge(d["breaker"], BREAKER_LEVEL.get(d["breaker"], "muted"))]
        if d["cooling_s"]:
            state += [" ", badge(f"cooling {d['cooling_s']:.0f} s", "warn")]
        why: list[str] = []
        change = ctx.router.last_change.get(d["deployment"])
        if change is not None and (d["breaker"] != "closed" or change.old != "half-open"):
            why.append(f"{change.old} → {change.new}: {change.why}" + (f" ({change.cause})" if change.cause else ""))
        if d["breaker"] == "open" and d.get("reopens_in_s") is not None:
            why.append(f"half-open in {d['reopens_in_s']:.0f} s")
        if d["opened"]:
            why.append(f"opened {d['opened']}× since start")
        if why:
            state.append(tag("span", shown("; ".join(why)), "why"))
        cap = d["max_concurrency"]
        gate = gates.get(d["deployment"])
        in_flight = f"{d['in_flight']}" + (f" / {cap}" if cap else "")
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


def _failures(ctx: GatewayContext, wall: float) -> Html:
    rows = [(Html(f"{esc(utc(f.ts))}<br><span class=\"muted\">{esc(ago(wall - f.ts))} ago</span>"),
             badge(str(f.status) if f.status >= 400 else f"{f.status}, failed over", "bad" if f.status >= 500 else "warn"),
             shown(f.model), f.deployment,
             f.endpoint if len(f.endpoint) < 80 else capped(f.endpoint[:80]), f.error_type,
             tag("span", shown(f.cause), "cause") if f.cause else None, tag("code", f.request_id))
            for f in ctx.failures.latest()]
    note = tag("p", "Requests answered 5xx, or whose attempts failed (then failed over, maybe successfully); "
                    "newest first. A caller's own errors (401, 404, 400, rate limits) are not listed.", "muted")
    return section("Recent failures", note,
                   table(("time", "status", "model", "deployment", "endpoint", "error", "cause", "request id"), rows,
                         empty="none since start"), anchor="failures")


def _pools(ctx: GatewayContext) -> Html:
    rows = []
    for pool in ctx.transports.pools():
        s = pool.statistics()
        o = pool.origin
        rows.append((f"{o.scheme}://{o.host}:{o.port}", s["in_flight"], s["idle"], s["opened"],
                     s["max_connections"] or "no cap", badge(str(s["refused"]), "bad") if s["refused"] else 0))
    gates = ctx.gates.statistics()
    gate_rows = [(dep, g["in_use"], g["limit"], g["waiting"], g["rejected"]) for dep, g in sorted(gates.items())]
    deferred = ctx.idle.statistics()
    return section(
        "Upstream pools",
        table(("origin", "in use", "idle", "opened", "max connections", "refused (full)"), rows,
              empty="no upstream connection made yet"),
        tag("h3", "Concurrency gates (max_concurrency)"),
        table(("deployment", "in use", "limit", "waiting", "rejected"), gate_rows, empty="no deployment has a cap"),
        tag("p", f"Deferred bookkeeping: {deferred['pending']} pending of {deferred['max_pending']}, "
                 f"{deferred['overflowed']} run early (overflow).", "muted"),
        anchor="pools")


def _usage(ctx: GatewayContext, rt: Runtime, stats: dict[str, Any], wall: float) -> Html:
    usage, keys, retention = stats.get("usage"), stats.get("keys"), stats.get("retention")
    if usage is None:
        return section("Usage pipeline and store",
                       tag("p", "No database ([database] url is empty): no usage records, config keys only.", "muted"),
                       anchor="usage")
    store = ctx.services.store
    engine = getattr(store, "engine", None)
    spool_share = usage["spool_bytes"] / usage["spool_max_bytes"] if usage["spool_max_bytes"] else 0.0
    items: list[tuple[str, object]] = [
        ("store", join((badge("ok" if usage["store_ok"] else "down", "ok" if usage["store_ok"] else "bad"),
                        f" {engine or ''} {redact(rt.config.database.url) or ''}"))),
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


def _limits(rt: Runtime, stats: dict[str, Any]) -> Html:
    limits = stats["limits"]
    local = limits.get("local", limits)
    refused = local.get("refused") or {}
    items: list[tuple[str, object]] = []
    if limits.get("backend") == "redis":
        items += [
            ("Redis", join((badge(redis_state(limits), REDIS_LEVEL.get(redis_state(limits), "muted")),
                            f" {redact(rt.config.redis.url) or ''}"))),
            ("when down", limits.get("policy")),
            ("outages", limits.get("outages")), ("errors", limits.get("errors")),
            ("admitted while down (local)", limits.get("fallback_admits")), ("denied while down", limits.get("denied")),
        ]
        refused = limits.get("refused") or refused
    else:
        items.append(("counters", "this host's memory (no [redis] url)"))
    items.append(("refused", join((f"{k}: {v}" for k, v in sorted(refused.items())), ", ") if refused else 0))
    return section("Limits and Redis", facts(items), anchor="limits")


def _config(ctx: GatewayContext, rt: Runtime, wall: float) -> Html:
    last = ctx.holder.last_reload
    items: list[tuple[str, object]] = [
        ("generation", rt.generation),
        ("file", rt.source or None),
        ("loaded", f"{utc(rt.loaded_at)} ({ago(wall - rt.loaded_at)} ago)"),
        ("models", len({d.model for d in rt.deployments.values()})),
        ("deployments", len(rt.deployments)),
        ("backends", join((tag("span", f"{name} ({redact(b.config.url) if b.config.kind == 'openai' else b.config.kind})")
                           for name, b in sorted(rt.backends.items())), ", ")),
        ("last reload", "none since start" if last is None else
         f"{last.result} at {utc(last.at)} ({ago(wall - last.at)} ago), serving generation {last.generation}"),
    ]
    if last is not None and last.problems:
        problems = [shown(p) for p in last.problems[:10]]
        more = len(last.problems) - len(problems)
        items.append(("its problems", Html("<br>".join(esc(p) for p in problems)
                                           + ("<br>" + esc(f"… and {more} more") if more else ""))))
    items += [("started", f"{utc(ctx.started_at)} ({ago(wall - ctx.started_at)} ago)"),
              ("version", f"hxgwd {__version__}")]
    return section("Config", facts(items), anchor="config")


CSS = """
:root{color-scheme:light dark;--fg:#1b1f24;--bg:#fff;--muted:#667;--line:#d8dde3;--head:#f3f5f7;
--ok:#1a7f37;--okbg:#dafbe1;--warn:#9a6700;--warnbg:#fff8c5;--bad:#b42318;--badbg:#ffebe9}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--bg:#0d1117;--muted:#8b949e;--line:#30363d;
--head:#161b22;--okbg:#12361f;--ok:#56d364;--warnbg:#3b2e00;--warn:#e3b341;--badbg:#490202;--bad:#ff7b72}}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header,main{max-width:1400px;margin:0 auto;padding:0 12px}
h1{font-size:20px;margin:12px 0 0}h2{font-size:16px;margin:20px 0 6px;border-bottom:1px solid var(--line)}
h3{font-size:14px;margin:12px 0 4px}
p{margin:4px 0}.muted{color:var(--muted)}a{color:inherit}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:4px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:var(--head);white-space:nowrap;font-weight:600}
td{white-space:nowrap}
.cause,.why{display:block;white-space:normal;word-break:break-word;min-width:14em;max-width:44em}
.cause{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
.why{font-size:12px;color:var(--muted);max-width:24em;margin-top:2px}
code{font-size:12px}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-weight:600;white-space:nowrap}
.ok{color:var(--ok);background:var(--okbg)}.warn{color:var(--warn);background:var(--warnbg)}
.bad{color:var(--bad);background:var(--badbg)}.badge.muted{background:var(--head)}
dl{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:2px 16px;margin:0}
dl div{display:flex;gap:8px;border-bottom:1px solid var(--line);padding:3px 0}
dt{color:var(--muted);min-width:11em}dd{margin:0;word-break:break-word}
@media (max-width:600px){body{font-size:15px}dt{min-width:9em}}
"""
