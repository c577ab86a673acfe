"""Operational events of their own, for the operator reading the journal: what the daemon started
with, and each breaker's changes of state. Every one carries `event` (a stable name to grep and to
alert on; docs/runbook.md names them) beside its human `msg`.

    started          config path, generation, listeners, parser, models, groups, backends, store,
                     Redis (URLs with their passwords and query strings masked)
    breaker_open     a deployment's breaker opened: why ("5 consecutive failures", "health probe
                     failed", "probe request failed") and the failure that tipped it (`cause`)
    breaker_half_open  its cooldown is over (or a health probe answered): one probe request goes
    breaker_closed   a probe request or a health probe succeeded

Breaker events go through `Logger.limited`: a storm (every deployment of a backend at once, a
flapping breaker) writes a burst, then one line now and then that counts those held back.
The other events named in logs are the existing lines', tagged where they are written: reload,
redis_lost / redis_back, store_lost / store_back, spool_replayed, key_store_lost / key_store_back,
pool_full.
"""

from __future__ import annotations

from typing import Any, Callable

from hxgwd.logs import Logger
from hxgwd.pipeline.route import BreakerChange
from hxgwd.runtime import Runtime
from hxgwd.routing.breaker import CLOSED, HALF_OPEN, OPEN

BREAKER_EVENTS = {OPEN: ("breaker_open", "warning", "deployment breaker opened: requests skip it"),
                  HALF_OPEN: ("breaker_half_open", "info", "deployment breaker half-open: one probe request at a time"),
                  CLOSED: ("breaker_closed", "info", "deployment breaker closed: serving again")}


def breaker_logger(log: Logger) -> Callable[[BreakerChange], None]:
    def changed(change: BreakerChange) -> None:
        event, level, msg = BREAKER_EVENTS[change.new]
        fields: dict[str, Any] = {"deployment": change.deployment, "backend": change.backend,
                                  "from": change.old, "why": change.why}
        if change.cause:
            fields["cause"] = change.cause
        log.limited(event, level, msg, **fields)
    return changed


def redact(url: str | None) -> str | None:
    """A URL as the log may show it: any user info but the user name masked (redis://:pw@ too),
    the query string dropped (libpq and redis-py take passwords there as well)."""
    if not url:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest = rest.partition("?")[0].partition("#")[0]
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user = userinfo.partition(":")[0]
        userinfo = f"{user}:***" if user else "***"
    return f"{scheme}://{userinfo}{at}{host}{slash}{path}"


def started_fields(runtime: Runtime, config_path: str | None, listen: list[str], tls: list[str],
                   parser: str) -> dict[str, Any]:
    """The startup line's fields: enough to tell, from the journal alone, what is being served."""
    cfg = runtime.config
    return {
        "config": config_path, "generation": runtime.generation,
        "listen": listen, "addresses": listen, "tls": tls, "http_parser": parser,
        "models": sorted({dep.model for dep in runtime.deployments.values()}),
        "groups": sorted(name for name, target in runtime.targets.items() if target.group is not None),
        "backends": {name: redact(b.config.url) if b.config.kind == "openai" else b.config.kind
                     for name, b in runtime.backends.items()},
        "store": redact(cfg.database.url), "redis": redact(cfg.redis.url),
        "keys": len(runtime.keys),
    }
