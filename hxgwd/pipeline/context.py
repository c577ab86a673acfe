"""What the process holds for serving requests, in one typed object the endpoints are given.

Built once by lifecycle.py. Its parts are long-lived and own their state (routing's learned
model, the pools, the usage writer); the config is never here: each request reads
`holder.current` once and keeps that snapshot to its end.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import attrs

from hxgwd.idle import IdleWork
from hxgwd.logs import Logger
from hxgwd.memtrim import MemoryTrim
from hxgwd.metrics.gateway import GatewayMetrics
from hxgwd.offload import Offload
from hxgwd.pipeline.route import Router
from hxgwd.runtime import RuntimeHolder
from hxgwd.services import Services
from hxgwd.upstream.transports import Transports
from hxgwd.upstream.gates import Gates


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
