"""The gauges of the present, read at scrape time from the objects that own the state: the router
(breakers, in flight, learned latency), the pools, the concurrency gates, the limiter, the usage
writer and key cache, the config snapshot. Nothing here is kept between scrapes but the TLS
certificate's expiry (certs.py), read once per config generation.
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any

import trio

from hxgwd import __version__
from hxgwd.metrics import certs
from hxgwd.metrics.registry import CounterSnapshot, Family, Gauge

if TYPE_CHECKING:
    from hxgwd.pipeline.context import GatewayContext
    from hxgwd.runtime import Runtime

BREAKER_VALUES = {"closed": 0.0, "half-open": 1.0, "open": 2.0}
DEP = ("deployment", "model", "backend")


def collect(ctx: GatewayContext, rt: Runtime) -> list[Family]:
    m = ctx.metrics
    live = list(m.live.values())
    fams: list[Family] = [
        Gauge("hxgwd_build_info", "1, labelled with the version of hxgwd and Python and the HTTP parser",
              ("version", "python_version", "http_parser"),
              [((__version__, platform.python_version(), ctx.transports.http_parser), 1.0)]),
        Gauge("hxgwd_start_time_seconds", "Unix time the process started", values=[((), m.started)]),
        Gauge("hxgwd_config_generation", "Generation of the config serving: 1 at start, +1 per reload",
              values=[((), rt.generation)]),
        Gauge("hxgwd_config_loaded_timestamp_seconds", "Unix time the serving config was read",
              values=[((), rt.loaded_at)]),
        Gauge("hxgwd_config_last_reload_successful", "0 when the last reload was refused or failed (the "
              "previous config still serves), else 1", values=[((), 1.0 if m.last_reload_ok else 0.0)]),
        Gauge("hxgwd_requests_in_flight", "API requests being answered", values=[((), len(live))]),
        Gauge("hxgwd_streams_in_flight", "Streamed answers being relayed", values=[((), sum(1 for ex in live if ex.stream))]),
    ]
    open_conns, idle_conns = m.connections()
    fams.append(Gauge("hxgwd_connections", "Open client connections, by state (active, idle keep-alive)",
                      ("state",), [(("active",), open_conns - idle_conns), (("idle",), idle_conns)]))
    fams += _deployments(ctx, rt)
    fams += _pools(ctx)
    fams += _services(ctx, rt)
    expiry = certs.expiry(rt)
    if expiry is not None:
        fams.append(Gauge("hxgwd_tls_certificate_expiry_timestamp_seconds", "Unix time the served TLS "
                          "certificate ([server] tls_cert) expires", values=[((), expiry)]))
    return fams


def _deployments(ctx: GatewayContext, rt: Runtime) -> list[Family]:
    now = trio.current_time()
    up = Gauge("hxgwd_deployment_up", "1 when the deployment takes requests (breaker closed, or half-open "
               "with no probe out), else 0", DEP)
    breaker = Gauge("hxgwd_deployment_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", DEP)
    in_flight = Gauge("hxgwd_deployment_in_flight", "Requests in flight to the deployment", DEP)
    opened = CounterSnapshot("hxgwd_deployment_breaker_opened", "Times the deployment's breaker opened", DEP)
    failures = CounterSnapshot("hxgwd_deployment_failures", "Failed attempts on the deployment", DEP)
    predicted = Gauge("hxgwd_deployment_predicted_latency_seconds", "The router's learned prediction of a "
                      "typical request's duration on the deployment", DEP)
    waiting = Gauge("hxgwd_deployment_queue_waiting", "Requests waiting for a slot of the deployment's "
                    "max_concurrency", ("deployment",))
    for dep in rt.deployments.values():
        st = ctx.router.state(dep, now)
        labels = (dep.id, dep.model, dep.backend.name)
        state = st.breaker.current(now)
        up.set(labels, 1.0 if st.breaker.usable(now) else 0.0)
        breaker.set(labels, BREAKER_VALUES.get(state, 2.0))
        in_flight.set(labels, st.in_flight)
        opened.values[labels] = st.breaker.opened
        failures.values[labels] = st.failures
    # the prediction as /admin/routing shows it: per model target, for its typical request
    for name, target in ctx.router.table(rt, now).items():
        doc: Any = target
        if doc["group"]:
            continue
        for row in doc["deployments"]:
            known = rt.deployments.get(row["deployment"])
            if known is not None:
                predicted.set((known.id, known.model, known.backend.name), row["predicted_s"])
    for dep_id, gate in ctx.gates.statistics().items():
        if dep_id in rt.deployments:
            waiting.set((dep_id,), gate["waiting"])
    return [up, breaker, in_flight, opened, failures, predicted, waiting]


def _pools(ctx: GatewayContext) -> list[Family]:
    conns = Gauge("hxgwd_pool_connections", "Upstream connections by backend and state (in_use, idle)",
                  ("backend", "state"))
    waiting = Gauge("hxgwd_pool_waiting", "Requests waiting for a connection at the backend's "
                    "max_connections", ("backend",))
    opened = CounterSnapshot("hxgwd_pool_connections_opened", "Upstream connections opened", ("backend",))
    refused = CounterSnapshot("hxgwd_pool_refused", "Requests refused because the backend's pool was full "
                              "(max_connections) for the pool timeout", ("backend",))
    for pool in ctx.transports.pools():
        name, st = pool.name, pool.statistics()
        conns.set((name, "in_use"), st["in_flight"])
        conns.set((name, "idle"), st["idle"])
        waiting.set((name,), st["waiting"])
        opened.values[(name,)] = st["opened"]
        refused.values[(name,)] = st["refused"]
    return [conns, waiting, opened, refused]


def limiter_families(limits: dict[str, Any]) -> list[Family]:
    """The limiter's: a worker's limiter has none of its own (its supervisor keeps the counters)."""
    if limits.get("backend") == "host":
        return []
    refused = dict(limits.get("refused", {}))
    for reason, n in limits.get("local", {}).get("refused", {}).items():   # Redis down, "local" policy
        refused[reason] = refused.get(reason, 0) + n
    fams: list[Family] = [CounterSnapshot("hxgwd_limiter_refusals", "Requests refused by the key's limits, "
                                          "by reason", ("reason",), [((r,), n) for r, n in refused.items()])]
    if limits.get("backend") == "redis":
        fams.append(Gauge("hxgwd_redis_up", "1 when Redis answers the limiter, else 0",
                          values=[((), 0.0 if limits.get("down") else 1.0)]))
    return fams


def _services(ctx: GatewayContext, rt: Runtime) -> list[Family]:
    services = ctx.services
    fams = limiter_families(services.limiter.statistics())
    usage, keys = services.usage, services.keys
    if usage is None or keys is None:
        return fams
    u = usage.statistics()
    fams += [
        Gauge("hxgwd_store_up", "1 when the database takes usage records and key reads, else 0",
              values=[((), 1.0 if u["store_ok"] and keys.failures == 0 else 0.0)]),
        Gauge("hxgwd_usage_queue_depth", "Usage records in memory waiting for the writer",
              values=[((), u["queued"])]),
        Gauge("hxgwd_usage_spool_bytes", "Bytes in the usage spool (records the store has not taken yet)",
              values=[((), u["spool_bytes"])]),
        Gauge("hxgwd_usage_spool_max_bytes", "[database] spool_max_bytes", values=[((), u["spool_max_bytes"])]),
        CounterSnapshot("hxgwd_usage_written", "Usage records written to the store", values=[((), u["written"])]),
        CounterSnapshot("hxgwd_usage_spooled", "Usage records written to the spool", values=[((), u["spooled"])]),
        CounterSnapshot("hxgwd_usage_replayed", "Usage records replayed from the spool into the store",
                        values=[((), u["replayed"])]),
        CounterSnapshot("hxgwd_usage_dropped", "Usage records lost: the spool was full",
                        values=[((), u["dropped"])]),
    ]
    return fams
