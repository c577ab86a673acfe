"""What an API path is to the gateway: an `Endpoint`, and the `Table` that finds one for a request.

An endpoint says everything that differs between API paths: which paths and methods it answers,
who may call it, and, for those proxied to a model's deployments, the kind of model it needs, where
the model's name is found, how the upstream calls are planned and their answers read (transform.py),
the limit estimate, and the echo backend's answer. The stages themselves (authenticate -> limit ->
route -> transform -> proxy -> record) know nothing of paths. The table is endpoints.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Literal

import attrs

from hxgwd.limits.estimate import Estimate
from hxgwd.pipeline.transform import CallPlan
from hxgwd.runtime import Deployment

if TYPE_CHECKING:
    from hxgwd.http.exchange import Request, Response
    from hxgwd.pipeline.context import GatewayContext
    from hxgwd.pipeline.exchange import Exchange
    from hxgwd.runtime import Principal, Runtime

# (context, config snapshot, the request's exchange, its principal or None, request, response, the
# endpoint, the path's variable part or "") -> the answer is sent
Serve = Callable[["GatewayContext", "Runtime", "Exchange", "Principal | None", "Request", "Response",
                  "Endpoint", str], Awaitable[None]]
# (upstream path, parsed body, deployment, public model name, in_steps) -> the upstream calls
Planner = Callable[[str, dict[str, Any], Deployment, str, bool], CallPlan]
# (model kind, parsed body, body bytes, deployments that may serve it) -> admission estimate
Estimator = Callable[[str, dict[str, Any], int, Iterable[Deployment]], Estimate]

# "anyone": no key (health checks); "key": any client key; "admin": an admin key; "monitor": an
# admin key, as a Bearer token or as HTTP Basic's password (a browser's prompt, Prometheus'
# basic_auth), for read-only pages only (authenticate.py says why). "anyone" and "monitor"
# requests are not API requests: no usage record, no access line, no CORS (handle.py).
Access = Literal["anyone", "key", "admin", "monitor"]
ModelFrom = Literal["json", "multipart", "none"]


@attrs.frozen(kw_only=True)
class Endpoint:
    name: str                          # stable, for logs and metrics: "chat.completions"
    paths: tuple[str, ...]             # a path ending in "/" also matches anything below it
    methods: tuple[str, ...]
    serve: Serve
    access: Access = "key"
    kind: str | None = None            # the model kind it needs (config [[models]] kind)
    upstream: str = ""                 # the upstream path below the backend's base, e.g. "/chat/completions"
    model_from: ModelFrom = "none"
    plan: Planner | None = None
    estimate: Estimator | None = None
    stores_answers: bool = False       # the backend keeps what it answers, fetched later by id (Responses)


@attrs.frozen
class Match:
    endpoint: Endpoint
    rest: str            # what a "/"-ending path matched below it: an id, a name; "" for exact paths


class Table:
    """Exact paths in a dict (the hot path: one lookup), then the "/"-ending prefixes, longest first."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        self._exact: dict[str, Endpoint] = {}
        prefixes: list[tuple[str, Endpoint]] = []
        for ep in self.endpoints:
            for path in ep.paths:
                if path.endswith("/"):
                    prefixes.append((path, ep))
                elif self._exact.setdefault(path, ep) is not ep:
                    raise ValueError(f"two endpoints claim {path}")
        self._prefixes = tuple(sorted(prefixes, key=lambda p: -len(p[0])))

    def find(self, path: str) -> Match | None:
        ep = self._exact.get(path)
        if ep is not None:
            return Match(ep, "")
        for prefix, ep in self._prefixes:
            if path.startswith(prefix) and len(path) > len(prefix):
                return Match(ep, path[len(prefix):])
        return None
