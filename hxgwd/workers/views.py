"""What each worker tells of itself for a host view, what the supervisor adds, and the merge.

    local_view(what, ctx, rt)     in each worker: its /admin/stats, /admin/routing, /metrics, /status part
    host_view(what, supervisor)   in the supervisor: the host's own parts (its limiter, the workers)
    merge_view(what, gathered)    in the worker that was asked: one answer for the host
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from hxgwd.admin import local_routing, local_stats
from hxgwd.metrics.collect import collect, limiter_families
from hxgwd.metrics.registry import CounterSnapshot, Family, Gauge
from hxgwd.status_document import config_facts, merge_status, reload_doc, status_document
from hxgwd.workers.merge import family_doc, merge_docs, merge_families, merge_limits

if TYPE_CHECKING:
    from hxgwd.pipeline.context import GatewayContext
    from hxgwd.runtime import Runtime
    from hxgwd.workers.supervisor import Supervisor


def local_view(what: str, ctx: GatewayContext, rt: Runtime) -> Any:
    if what == "stats":
        return local_stats(ctx, rt)
    if what == "routing":
        return local_routing(ctx, rt)
    if what == "metrics":
        return [family_doc(f) for f in ctx.metrics.families() + collect(ctx, rt)]
    if what == "status":
        return status_document(ctx, rt, trio.current_time(), time.time())
    raise ValueError(f"no view {what!r}")


def host_view(what: str, sup: Supervisor) -> Any:
    if what == "metrics":
        return [family_doc(f) for f in supervisor_families(sup)]
    doc: dict[str, Any] = {"workers": sup.summaries()}
    if what in ("stats", "status"):
        doc["limits"] = sup.limiter.statistics()
        if sup.services is not None and sup.services.pruner is not None:
            doc["retention"] = sup.services.pruner.statistics()
    if what == "status":      # the host's: the supervisor started first and drives the reloads
        doc.update(started_at=sup.started_at, last_reload=reload_doc(sup.holder.last_reload),
                   config=config_facts(sup.holder.current))
    return doc


def supervisor_families(sup: Supervisor) -> list[Family]:
    states = {"serving": 0, "starting": 0, "crash_loop": 0}
    restarts = CounterSnapshot("hxgwd_worker_restarts", "Times a worker died and was restarted", ("worker",))
    connections = Gauge("hxgwd_worker_connections", "Client connections each serving worker holds (the "
                        "balance of the shared listener)", ("worker",))
    for slot in sup.slots:
        states["crash_loop" if slot.crash_looping() else "serving" if slot.serving else "starting"] += 1
        restarts.values[(str(slot.index),)] = slot.restarts
        if slot.serving:
            connections.set((str(slot.index),), float(sup.connections.get(slot.index)))
    return [Gauge("hxgwd_workers", "Worker processes of this host by state (serving, starting, crash_loop)",
                  ("state",), [((k,), float(v)) for k, v in states.items()]),
            restarts, connections, *limiter_families(sup.limiter.statistics())]


def merge_view(what: str, gathered: dict[str, Any]) -> Any:
    workers = gathered["workers"]
    docs = [w.pop("doc") for w in workers]
    host = gathered["host"]
    if what == "metrics":
        return merge_families([d for d in docs if d is not None] + [host])
    if what == "status":
        return merge_status(docs, host, workers)
    merged = merge_docs(docs) or {}
    if what == "stats":
        merged["limits"] = merge_limits(host["limits"], merged.get("limits"))
        if "retention" in host:
            merged["retention"] = host["retention"]
    merged["workers"] = workers
    return merged
