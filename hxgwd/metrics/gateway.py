"""The series the gateway records itself: from each finished request's record, in idle work after
its answer is out (handle.py `_finish`), so that the request path pays nothing for them; and the
reloads, counted by the lifecycle.

Labels: `endpoint` is the endpoint table's name ("chat.completions"), `deployment` and `backend`
the config's, `model` the model of the deployment that served, else the model or group the client
named if the config has it, else "" (a made-up name is not a label value), `key` a key name from
the config or the store ("" for requests without a valid key).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from hxgwd.metrics.registry import DURATION, FIRST_TOKEN, OVERHEAD, TOKENS, Counter, Family, Histogram

if TYPE_CHECKING:
    from hxgwd.pipeline.exchange import Exchange
    from hxgwd.pipeline.record import RequestRecord
    from hxgwd.runtime import Runtime

STATUS_CLASSES = {n: f"{n}xx" for n in range(1, 6)}
RELOAD_RESULTS = ("ok", "rejected", "failed")


class GatewayMetrics:
    def __init__(self) -> None:
        self.started = time.time()
        self.requests = Counter("hxgwd_requests", "API requests finished, by endpoint, model, deployment "
                                "and status class (499: the client went away first)",
                                ("endpoint", "model", "deployment", "status_class"))
        self.duration = Histogram("gen_ai_server_request_duration_seconds",
                                  "Time from a request's head to the end of its answer, by the model that "
                                  "served it (OpenTelemetry gen_ai.server.request.duration)",
                                  ("gen_ai_response_model",), DURATION)
        self.first_token = Histogram("gen_ai_server_time_to_first_token_seconds",
                                     "Streams: time from the request to the first byte of the upstream's "
                                     "answer (OpenTelemetry gen_ai.server.time_to_first_token)",
                                     ("gen_ai_response_model",), FIRST_TOKEN)
        self.token_usage = Histogram("gen_ai_client_token_usage", "Tokens per request by type, input or "
                                     "output (OpenTelemetry gen_ai.client.token.usage)",
                                     ("gen_ai_token_type", "gen_ai_response_model"), TOKENS)
        self.overhead = Histogram("hxgwd_request_overhead_seconds", "The gateway's own time per request: "
                                  "its total less the time waiting on the upstream", (), OVERHEAD)
        self.upstream = Histogram("hxgwd_upstream_duration_seconds", "Time spent on the upstream calls of a "
                                  "request, by the deployment that answered last", ("deployment",), DURATION)
        self.ttfb = Histogram("hxgwd_upstream_ttfb_seconds", "Time to the upstream answer's first byte, by "
                              "deployment", ("deployment",), FIRST_TOKEN)
        self.tokens = Counter("hxgwd_tokens", "Tokens used, by model, key name and type (input, output)",
                              ("model", "key", "type"))
        self.cost = Counter("hxgwd_cost_usd", "Cost in USD by the config's prices, by model and key name",
                            ("model", "key"))
        self.reloads = Counter("hxgwd_reloads", "Config reloads (SIGHUP) by result: ok, rejected (a bad "
                               "file), failed (an error of the gateway's)", ("result",))
        for result in RELOAD_RESULTS:
            self.reloads.inc((result,), 0.0)
        self.last_reload_ok = True
        self.last_reload_at: float | None = None
        # set by the lifecycle once it listens: open client connections and the idle ones among them
        self.connections: Callable[[], tuple[int, int]] = lambda: (0, 0)
        # the requests being answered, by id(): handle.py adds and removes each (a dict store and
        # a pop, ~0.1 us); a scrape counts them, and the streams among them
        self.live: dict[int, Exchange] = {}

    def families(self) -> list[Family]:
        return [self.requests, self.duration, self.first_token, self.token_usage, self.overhead,
                self.upstream, self.ttfb, self.tokens, self.cost, self.reloads]

    def reloaded(self, result: str) -> None:
        self.reloads.inc((result,))
        self.last_reload_ok = result == "ok"
        self.last_reload_at = time.time()

    def observe(self, rec: RequestRecord, endpoint: str, rt: Runtime) -> None:
        """One finished request. Deferred (idle.py): never on a request's path."""
        dep_id = rec.deployment
        dep = rt.deployments.get(dep_id) if dep_id is not None else None
        if dep is not None:
            model = dep.model
        elif rec.model is not None and rec.model in rt.targets:
            model = rec.model
        else:
            model = ""
        deployment = dep_id if dep is not None and dep_id is not None else ""
        self.requests.inc((endpoint, model, deployment, STATUS_CLASSES.get(rec.status // 100, "other")))
        self.overhead.observe((), rec.overhead_ms / 1000)
        if dep is None:       # refused before any upstream call: no upstream time, tokens or cost
            return
        mkey = (model,)
        self.duration.observe(mkey, rec.total_ms / 1000)
        self.upstream.observe((deployment,), rec.upstream_ms / 1000)
        if rec.ttfb_ms is not None:
            self.ttfb.observe((deployment,), rec.ttfb_ms / 1000)
            if rec.stream:
                self.first_token.observe(mkey, rec.ttfb_ms / 1000)
        key = rec.key or ""
        if rec.prompt_tokens is not None:
            self.token_usage.observe(("input", model), rec.prompt_tokens)
            self.tokens.inc((model, key, "input"), rec.prompt_tokens)
        if rec.completion_tokens is not None:
            self.token_usage.observe(("output", model), rec.completion_tokens)
            self.tokens.inc((model, key, "output"), rec.completion_tokens)
        if rec.cost_usd:
            self.cost.inc((model, key), rec.cost_usd)
