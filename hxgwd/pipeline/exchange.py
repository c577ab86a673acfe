"""One request's facts as the stages learn them, and the usage record they make at its end.

`Exchange` is the only definition of what a request's record holds: the stages fill its fields,
`record_values()` turns them into the record's values in `schema.LINE_FIELDS` order (journaled at
once, on the request path: they survive a kill -9), and `store.schema.record_from_values` makes the
frozen `RequestRecord` of them later, in idle work.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from hxgwd.errors import GatewayError
from hxgwd.http import Headers
from hxgwd.limits.estimate import usage_cost
from hxgwd.limits.reservation import Reservation
from hxgwd.pipeline.record import STATUS_CLIENT_CLOSED, usage_tokens
from hxgwd.runtime import Deployment


@attrs.define
class Exchange:
    request_id: str
    started: float                       # trio clock
    ts: float                            # unix time
    endpoint: str
    client_request_id: str | None = None   # the client's X-Request-ID: echoed, sent upstream, stored
    key: str | None = None
    model: str | None = None
    group: str | None = None
    deployment: str | None = None
    backend: str | None = None
    status: int = 0
    error: GatewayError | None = None
    stream: bool = False
    usage: dict[str, int] | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_time: float = 0.0
    ttfb: float | None = None
    attempts: int = 0
    route: str | None = None
    client_gone: bool = False
    client_headers: Headers = attrs.field(factory=list, repr=False)
    served: Deployment | None = None     # the deployment of the last attempt
    tried: list[str] = attrs.field(factory=list)   # deployment ids, in the order attempted
    answer_id: str | None = None         # the id of what the backend keeps of its answer (Responses)
    reservation: Reservation | None = None   # what the limit stage reserved; settled at the end
    fanout_calls: int = 0                # calls of the last attempt's fan-out (embeddings, one per input)
    fanout_left: int = 0                 # ... not finished: their share of the reservation is kept
    client: str | None = None            # the peer's address (client.py)
    user_agent: str | None = None
    key_prefix: str | None = None        # on a 401: what the refused key starts with (authenticate.py)
    cause: str | None = None             # why attempts failed, one "deployment: cause" each (proxy.py)

    def cost(self) -> float | None:
        if self.usage is None or self.served is None:
            return None
        return usage_cost(self.served.config, self.usage.get("prompt_tokens") or 0,
                          self.usage.get("completion_tokens") or 0)

    def record_values(self, generation: int, cost: float | None, ended: float) -> tuple[Any, ...]:
        """The record as values in schema.LINE_FIELDS order: what the journal writes, on the
        request path. A tuple, not the attrs RequestRecord: that cost ~8 us a request in a
        running daemon (25 frozen fields)."""
        err = self.error
        error_type: str | None
        fault: str | None
        if self.client_gone:
            status = STATUS_CLIENT_CLOSED
            error_type, fault = (err.type, err.fault) if err else ("client_closed", "client")
        else:
            status = self.status
            error_type, fault = (err.type, err.fault) if err else (None, upstream_fault(status))
        prompt, completion, total = usage_tokens(self.usage)
        ttfb = self.ttfb
        # the order of schema.LINE_FIELDS (tests/test_store_journal.py checks it against record.py)
        return (self.ts, self.request_id, self.client_request_id, self.key, self.endpoint, self.model,
                self.group, self.deployment, self.backend, status, error_type, fault, self.stream, prompt,
                completion, total, cost, self.bytes_in, self.bytes_out, (ended - self.started) * 1000,
                self.upstream_time * 1000, ttfb * 1000 if ttfb is not None else None, self.attempts,
                self.route, generation, self.client, self.user_agent, self.key_prefix, self.cause)

    def settlement(self, cost: float | None) -> tuple[int | None, float | None]:
        """(tokens, cost) to settle the reservation with. A failed request is charged nothing it
        did not report; one cut short mid-fan-out is charged for the calls that finished, and the
        calls that did not keep their share of the reservation (the upstream may have done them)."""
        tokens = (self.usage or {}).get("total_tokens")
        if self.fanout_left:
            res = self.reservation
            left = self.fanout_left / self.fanout_calls
            if res is not None and res.tokens is not None:
                tokens = (tokens or 0) + math.ceil(res.tokens * left)
            if res is not None and res.nano_usd is not None:
                cost = (cost or 0.0) + res.cost_usd * left
        failed = self.status >= 400 or self.status == 0
        return (0 if failed and tokens is None else tokens), (0.0 if failed and cost is None else cost)


def upstream_fault(status: int) -> str | None:
    """Whose fault an upstream's error answer, passed through, was: its 4xx are the caller's
    (bad request, unknown model), its 5xx and 429 its own (a provider's limit, not ours)."""
    if status < 400:
        return None
    return "caller" if status < 500 and status != 429 else "upstream"
