"""The host's answer from every worker's: /admin/stats, /admin/routing and /status documents are
merged key by key, /metrics families sample by sample. Pure: tested without processes.

Counts and amounts in flight add up (requests, failures, in_flight, queued, bytes); a share of a
host-wide setting adds up to the setting (a gate's limit, a pool's max_connections); rates,
learned latencies and scores are averaged over the workers that have them; a breaker shows its
worst state (open > half-open > closed), with every worker's beside it; timestamps and
countdowns take the latest; values that should agree (generation, strategy) are kept when they do
and listed when they do not, so that a disagreement shows instead of being hidden.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from hxgwd.metrics.registry import CounterSnapshot, Family, Gauge, Histogram

MEAN = frozenset({"error_rate", "throttle_rate", "window_error_rate", "latency", "first_byte", "mean_duration_s",
                  "predicted_s", "uncertainty_s", "failure_p", "impact_s", "score", "typical_request"})
LATEST = frozenset({"cooling_s", "reopens_in_s", "loaded_at", "at", "started_at"})
# "keys": the store keys every worker's cache holds. (A deployment's max_concurrency and a gate's
# limit are a worker's share of the host's cap, workers.worker.shares: they add up to it.)
SAME = frozenset({"generation", "strategy", "group", "model", "backend", "deployment", "days", "backend_kind",
                  "keys"})
ALL = frozenset({"store_ok"})           # true only if true in every worker
BREAKER_ORDER = {"closed": 0, "half-open": 1, "open": 2}


def merge_docs(docs: list[Any], key: str = "") -> Any:
    """One value from the workers' values of `key` (None where a worker has none)."""
    present = [d for d in docs if d is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, dict):
        keys: dict[str, None] = {}
        for d in present:
            if isinstance(d, dict):
                keys.update(dict.fromkeys(d))
        # a learned model's parameters are averaged as the model is ("latency": {"intercept_s": ...});
        # only a dict of numbers: a model may be named "latency" too
        mean = key in MEAN and all(_is_number(v) for d in present if isinstance(d, dict) for v in d.values())
        out = {k: merge_docs([d.get(k) if isinstance(d, dict) else None for d in present], key if mean else k)
               for k in keys}
        if key == "" or not isinstance(out.get("breaker"), str):      # a model named "breaker" is no row
            return out
        out["breakers"] = [d.get("breaker") for d in present if isinstance(d, dict)]
        return out
    if isinstance(first, list):
        if key == "deployments":             # routing rows: one per deployment, matched by id
            return _merge_rows(present)
        if all(isinstance(d, list) and d == first for d in present):
            return first
        return [item for d in present if isinstance(d, list) for item in d]
    if isinstance(first, bool):
        return all(present) if key in ALL else any(present)
    if all(_is_number(d) for d in present):
        if key in SAME:
            return first if all(d == first for d in present) else sorted(set(present))
        if key in MEAN:
            return round(math.fsum(present) / len(present), 6)
        if key in LATEST:
            return max(present)
        total = math.fsum(present)
        return int(total) if all(isinstance(d, int) for d in present) else total
    if key == "breaker":
        return max(present, key=lambda s: BREAKER_ORDER.get(s, 2))
    if all(d == first for d in present):
        return first
    return sorted({str(d) for d in present})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def merge_limits(host: dict[str, Any], workers: Any) -> Any:
    """The host's limiter: without Redis the supervisor's counters, every worker admitting on them
    (a worker's own "host" limiter only counts its calls, kept beside); with Redis each worker's
    own limiter, merged (the supervisor's then counts nothing)."""
    if isinstance(workers, dict) and workers.get("backend") == "redis":
        return workers
    return {**host, "workers": workers}


def _merge_rows(lists: list[list[Any]]) -> list[Any]:
    by_id: dict[Any, list[Any]] = {}
    for rows in lists:
        for row in rows:
            ident = row.get("deployment") if isinstance(row, dict) else None
            by_id.setdefault(ident, []).append(row)
    return [merge_docs(rows, "deployment_row") for rows in by_id.values()]


# --- metrics --------------------------------------------------------------------------------------

# Gauges that do not add up across workers; every other gauge, each counter and histogram does.
GAUGE_RULES = {
    "hxgwd_build_info": "max", "hxgwd_start_time_seconds": "min", "hxgwd_config_generation": "min",
    "hxgwd_config_loaded_timestamp_seconds": "max", "hxgwd_config_last_reload_successful": "min",
    "hxgwd_deployment_up": "min", "hxgwd_deployment_breaker_state": "max",
    "hxgwd_deployment_predicted_latency_seconds": "mean", "hxgwd_store_up": "min", "hxgwd_redis_up": "min",
    "hxgwd_tls_certificate_expiry_timestamp_seconds": "min",
    # each worker's spool fills, and drops records, on its own: the fullest one is the host's
    "hxgwd_usage_spool_bytes": "max", "hxgwd_usage_spool_max_bytes": "max",
}


# Counters of host events that every worker counts once each: the host's count is one worker's
# (a worker started since counts less: the largest is the host's).
COUNTER_RULES = {"hxgwd_reloads": "max"}


def family_doc(family: Family) -> dict[str, Any]:
    """A family as JSON, to cross the control channel."""
    doc: dict[str, Any] = {"name": family.name, "help": family.help, "labels": list(family.labels),
                           "kind": family.kind}
    if isinstance(family, Histogram):
        doc["bounds"] = list(family.bounds)
        doc["series"] = [[list(k), v] for k, v in family.series.items()]
    else:
        doc["values"] = [[list(k), v] for k, v in family.values.items()]   # type: ignore[attr-defined]
    return doc


def merge_families(per_worker: Iterable[list[dict[str, Any]]]) -> list[Family]:
    """Every worker's families (family_doc) as one host's, in the order first seen."""
    merged: dict[str, Family] = {}
    seen: dict[tuple[str, tuple[str, ...]], list[float]] = {}
    for docs in per_worker:
        for doc in docs:
            name, labels = doc["name"], tuple(doc["labels"])
            fam = merged.get(name)
            if fam is None:
                if doc["kind"] == "histogram":
                    fam = Histogram(name, doc["help"], labels, tuple(doc["bounds"]))
                elif doc["kind"] == "counter":
                    fam = CounterSnapshot(name, doc["help"], labels)
                else:
                    fam = Gauge(name, doc["help"], labels)
                merged[name] = fam
            if isinstance(fam, Histogram):
                for key, counts in doc["series"]:
                    have = fam.series.setdefault(tuple(key), [0.0] * len(counts))
                    for i, n in enumerate(counts):
                        have[i] += n
                continue
            rule = GAUGE_RULES.get(name, "sum") if doc["kind"] == "gauge" else COUNTER_RULES.get(name, "sum")
            values: dict[tuple[str, ...], float] = fam.values     # type: ignore[attr-defined]
            for key_list, value in doc["values"]:
                key = tuple(key_list)
                if rule == "mean":
                    seen.setdefault((name, key), []).append(value)
                    values[key] = math.fsum(seen[(name, key)]) / len(seen[(name, key)])
                elif key not in values:
                    values[key] = value
                elif rule == "sum":
                    values[key] += value
                elif rule == "min":
                    values[key] = min(values[key], value)
                else:
                    values[key] = max(values[key], value)
    return list(merged.values())
