"""What the process holds for serving requests, in one typed object the endpoints are given.

Built once by lifecycle.py. Its parts are long-lived and own their state (routing's learned
model, the pools, the usage writer); the config is never here: each request reads
`holder.current` once and keeps that snapshot to its end.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any, Callable, Protocol

import attrs

from hxgwd.idle import IdleWork
from hxgwd.logs import Logger
from hxgwd.memtrim import MemoryTrim
from hxgwd.metrics.gateway import GatewayMetrics
from hxgwd.offload import Offload
from hxgwd.pipeline.record import RequestRecord
from hxgwd.pipeline.route import Router
from hxgwd.runtime import RuntimeHolder
from hxgwd.services import Services
from hxgwd.upstream.transports import Transports
from hxgwd.upstream.gates import Gates


class Host(Protocol):
    """A worker's view of the other workers of its host, through the supervisor (workers/)."""

    index: int                      # this worker's, 0-based
    count: int                      # workers of the host

    async def view(self, what: str) -> Any:
        """The host's "stats", "routing", "metrics" or "status": every worker's, merged."""

    async def keys_changed(self) -> None:
        """Store keys were added or revoked here: every worker reloads them before this returns."""

    async def find_response(self, response_id: str, key: str | None) -> str | None:
        """The deployment that made a stored response, asked of the other workers."""


class ResponseHomes:
    """Which deployment made a stored Responses API object, and for which key: `GET` and
    `DELETE /v1/responses/{id}` go there, and only for that key (another key gets the 404 of an
    id that does not exist). Bounded: the oldest are forgotten first, and a forgotten or
    unknown id is a clear 404."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._homes: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self._capacity = capacity

    def add(self, response_id: str, deployment_id: str, key: str | None) -> None:
        self._homes[response_id] = (deployment_id, key)
        self._homes.move_to_end(response_id)
        if len(self._homes) > self._capacity:
            self._homes.popitem(last=False)

    def get(self, response_id: str, key: str | None) -> str | None:
        home = self._homes.get(response_id)
        return home[0] if home is not None and home[1] == key else None

    def forget(self, response_id: str) -> None:
        self._homes.pop(response_id, None)

    def __len__(self) -> int:
        return len(self._homes)


@attrs.frozen
class Failure:
    """A failed request as /status shows it: no key, no client, nothing the client sent but the
    model name (capped when shown)."""

    ts: float                 # unix time the request started
    request_id: str
    endpoint: str
    model: str | None
    deployment: str | None    # the last attempt's
    status: int
    error_type: str | None
    cause: str | None         # "m@b: connect refused (ECONNREFUSED); ..."


class RecentFailures:
    """The last `capacity` requests that failed on the gateway's or an upstream's side, newest
    last: answered 5xx, or with attempts that failed (a failover that then succeeded included).
    A caller's own errors (401, 404, 400, our 429s) and hang-ups without a cause are left out: a
    scan of keys would push every upstream failure out. Fed from idle work (handle.py)."""

    def __init__(self, capacity: int = 50) -> None:
        self._items: deque[Failure] = deque(maxlen=capacity)
        self.total = 0            # since the start, kept or not

    def add(self, rec: RequestRecord) -> None:
        if rec.cause is None and rec.status < 500:
            return
        self.total += 1
        self._items.append(Failure(rec.ts, rec.request_id, rec.endpoint, rec.model, rec.deployment,
                                   rec.status, rec.error_type, rec.cause))

    def latest(self) -> list[Failure]:
        """Newest first."""
        return list(reversed(self._items))


@attrs.frozen(eq=False)
class GatewayContext:
    holder: RuntimeHolder
    router: Router
    transports: Transports
    gates: Gates
    services: Services
    log: Logger
    idle: IdleWork
    is_listening: Callable[[], bool] = lambda: True
    is_cutting_off: Callable[[], bool] = lambda: False   # shutdown: the grace is over, or a second signal
    offload: Offload = attrs.field(factory=Offload)      # worker threads for large bodies (offload.py)
    memory: MemoryTrim = attrs.field(factory=MemoryTrim)
    response_homes: ResponseHomes = attrs.field(factory=ResponseHomes)
    metrics: GatewayMetrics = attrs.field(factory=GatewayMetrics)   # /metrics: what is recorded
    models_cache: OrderedDict[tuple[object, ...], bytes] = attrs.field(factory=OrderedDict)   # /v1/models bodies
    failures: RecentFailures = attrs.field(factory=RecentFailures)      # /status: the last failed requests
    started_at: float = attrs.field(factory=time.time)                  # unix time: /status's uptime
    host: Host | None = None         # a worker's other workers; None in a single process
