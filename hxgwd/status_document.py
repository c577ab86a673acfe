"""What `GET /status` shows, as a JSON-able document: taken from one process (`status_document`),
or, with `[server] workers`, from every worker and the supervisor and merged (`merge_status`).
status_page.py renders either the same way.

The merge is workers/merge.py's key by key (counts add up, rates are averaged, a breaker shows its
worst state), except for what is not a sum of parts: the recent failures are every worker's,
newest first, bounded as one process's are; a deployment's last breaker change is the one of the
worker whose breaker is now in the worst state; uptime, the last reload and the config facts are
the supervisor's, which started first and drives the reloads; and the limiter is the supervisor's
when the workers use its counters (without Redis), the workers' own otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import attrs

from hxgwd import __version__
from hxgwd.events import redact
from hxgwd.workers.merge import BREAKER_ORDER, merge_docs, merge_limits

if TYPE_CHECKING:
    from hxgwd.pipeline.context import GatewayContext
    from hxgwd.runtime import ReloadResult, Runtime

FAILURES_KEPT = 50        # as many as one process keeps (context.RecentFailures), with workers too
# taken whole from one place, never added up: the host's (supervisor's), or each worker's own
NOT_MERGED = ("failures", "breaker_changes", "started_at", "last_reload", "config")


def status_document(ctx: GatewayContext, rt: Runtime, now: float, wall: float) -> dict[str, Any]:
    """This process's part. `now`: the trio clock (breakers, cooling); `wall`: unix time."""
    targets: dict[str, Any] = ctx.router.table(rt, now)
    for name, target in targets.items():
        target["kind"] = rt.targets[name].kind
    return {
        "at": wall,
        "version": __version__,
        "generation": rt.generation,
        "listening": ctx.is_listening(),
        "started_at": ctx.started_at,
        "targets": targets,
        "breaker_changes": {dep: {"old": c.old, "new": c.new, "why": c.why, "cause": c.cause}
                            for dep, c in ctx.router.last_change.items()},
        "failures": [attrs.asdict(f) for f in ctx.failures.latest()[:FAILURES_KEPT]],   # newest first
        "failures_total": ctx.failures.total,
        "stats": ctx.services.statistics(),
        "store_engine": getattr(ctx.services.store, "engine", None),
        "pools": {f"{p.origin.scheme}://{p.origin.host}:{p.origin.port}": p.statistics()
                  for p in ctx.transports.pools()},
        "gates": ctx.gates.statistics(),
        "deferred": ctx.idle.statistics(),
        "config": config_facts(rt),
        "last_reload": reload_doc(ctx.holder.last_reload),
    }


def config_facts(rt: Runtime) -> dict[str, Any]:
    """The config section's facts; URLs redacted (no password, no query string)."""
    return {
        "generation": rt.generation,
        "source": rt.source or None,
        "loaded_at": rt.loaded_at,
        "models": len({d.model for d in rt.deployments.values()}),
        "deployments": len(rt.deployments),
        "backends": [[name, redact(b.config.url) if b.config.kind == "openai" else b.config.kind]
                     for name, b in sorted(rt.backends.items())],
        "database_url": redact(rt.config.database.url),
        "redis_url": redact(rt.config.redis.url),
    }


def reload_doc(last: ReloadResult | None) -> dict[str, Any] | None:
    return None if last is None else {"result": last.result, "at": last.at, "generation": last.generation,
                                      "problems": list(last.problems)}


def merge_status(docs: list[dict[str, Any] | None], host: dict[str, Any],
                 workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The host's document. `docs`: each worker's (None for one that did not answer), in the
    order of `workers` (the supervisor's summaries: index, pid, serving, restarts...); `host`:
    the supervisor's part (workers/views.py host_view)."""
    present = [d for d in docs if d is not None]
    if not present:           # the worker asking is serving: its own part at least should be here
        raise LookupError("no worker's status came back")
    merged: dict[str, Any] = merge_docs([{k: v for k, v in d.items() if k not in NOT_MERGED} for d in present])
    merged["failures"] = sorted((f for d in present for f in d["failures"]),
                                key=lambda f: f["ts"], reverse=True)[:FAILURES_KEPT]
    merged["breaker_changes"] = worst_changes(d["breaker_changes"] for d in present)
    merged["started_at"] = host["started_at"]
    merged["last_reload"] = host["last_reload"]
    merged["config"] = host["config"]
    stats = merged["stats"]
    stats["limits"] = merge_limits(host["limits"], stats["limits"])
    if "retention" in host:
        stats["retention"] = host["retention"]
    merged["workers"] = [{**w, "answered": d is not None, "started_at": None if d is None else d["started_at"]}
                         for w, d in zip(workers, docs)]
    return merged


def worst_changes(per_worker: Iterable[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per deployment, the last change of the worker whose breaker it left in the worst state
    (its "new" is the breaker's state now): an open breaker's why, not a closed one's."""
    out: dict[str, dict[str, Any]] = {}
    for changes in per_worker:
        for dep, change in changes.items():
            have = out.get(dep)
            if have is None or BREAKER_ORDER.get(change["new"], 2) > BREAKER_ORDER.get(have["new"], 2):
                out[dep] = change
    return out
