"""Stage 5, route: which deployments may serve a request, and in which order to try them.

`resolve()` turns the requested name into a `Target` (404 / 403 / 400 as OpenAI clients expect).
`Router.plan()` orders its deployments by the target's strategy, leaving out those whose breaker
is open or that an upstream's Retry-After is cooling; a half-open deployment whose probe slot is
free goes first, as that probe. `Router.started()` and `Router.finished()` are the feedback every
attempt reports: they move the breakers and teach the latency model (hxgwd.routing). The state is
keyed by deployment id and lives outside the config snapshot: it survives reloads for deployments
that still exist. Pure: no I/O; time and randomness come in as arguments, so tests and the
routing simulation (bench/routing) drive this very code on a virtual clock with a seeded rng.
"""

from __future__ import annotations

import random
from typing import Callable, Iterable

import attrs

from hxgwd.config.model import Routing
from hxgwd.errors import BadRequest, Forbidden, NotFound, capped
from hxgwd.routing import strategies
from hxgwd.routing.breaker import HALF_OPEN
from hxgwd.routing.estimator import Ewma, OutputLength
from hxgwd.routing.state import DeploymentState
from hxgwd.runtime import Deployment, Principal, Runtime, Target


KIND_NAMES = {"chat": "a chat model", "embedding": "an embedding model", "moderation": "a moderation model",
              "rerank": "a rerank model", "transcription": "a transcription model", "speech": "a speech model",
              "image": "an image model"}


def resolve(runtime: Runtime, name: str, kind: str, principal: Principal) -> Target:
    target = runtime.targets.get(name)
    if target is None:   # only here is `name` any length the client chose; below, a config name
        raise NotFound(f"The model '{capped(name)}' does not exist.", code="model_not_found", param="model")
    if not principal.may_use(name):
        raise Forbidden(f"This key may not use the model '{name}'.", param="model")
    if target.kind != kind:
        raise BadRequest(f"'{name}' is {KIND_NAMES.get(target.kind, target.kind)}; this endpoint needs "
                         f"{KIND_NAMES.get(kind, kind)}.", code="model_wrong_kind", param="model")
    return target


@attrs.frozen
class RequestFeatures:
    """What a strategy may know of a request before it is sent; no tokenizer involved."""

    prompt_bytes: int
    max_tokens: int
    stream: bool


@attrs.frozen
class Outcome:
    ok: bool                 # the deployment answered usably (a 4xx that is the caller's fault counts)
    status: int              # upstream status, or 0 when no answer came
    ttfb: float              # seconds from sending to the response head
    duration: float          # seconds for the whole exchange
    features: RequestFeatures | None = None
    output_tokens: int | None = None
    cancelled: bool = False  # the client left first: says nothing about the deployment
    retry_after: float | None = None   # the upstream's Retry-After on a 429 / 503, in seconds
    began: float | None = None         # the `now` given to started() for this attempt, if known


@attrs.frozen
class BreakerChange:
    """A deployment's breaker changed state: what the log's breaker_* events say."""

    deployment: str
    backend: str
    old: str
    new: str
    why: str                 # "5 consecutive failures", "cooldown over", "health probe ok", ...
    cause: str | None        # the failure that tipped it, when a request's: "connect refused (...)"


@attrs.frozen
class Plan:
    strategy: str
    order: tuple[Deployment, ...]                 # empty: nothing usable now
    predicted: dict[str, float] = attrs.field(factory=dict)   # deployment id -> predicted seconds
    retry_after: float | None = None             # with an empty order: when to come back



TYPICAL_PROMPT_BYTES = 2048      # the table's "typical request" before any request was seen
TYPICAL_MAX_TOKENS = 256


@attrs.define
class _Typical:
    """A target's typical request (for the table's scores) and best predicted time (exploration)."""

    prompt_bytes: Ewma = attrs.field(factory=lambda: Ewma(alpha=0.05))
    max_tokens: Ewma = attrs.field(factory=lambda: Ewma(alpha=0.05))
    best_time: Ewma = attrs.field(factory=lambda: Ewma(alpha=0.05))


class Router:
    def __init__(self, rng: random.Random | None = None, settings: Routing | None = None) -> None:
        self.rng = rng or random.Random()
        self.settings = settings or Routing()
        self.states: dict[str, DeploymentState] = {}
        self.lengths: dict[str, OutputLength] = {}      # by public model name: output length habits
        self.typical: dict[str, _Typical] = {}          # by target name
        self.probed: dict[str, bool] = {}               # backend name -> last active probe verdict
        self._keep: set[str] | None = None              # ids the last reload kept
        self.on_breaker: Callable[[BreakerChange], None] | None = None   # the daemon logs these
        self._cause: str | None = None                  # the cause of the attempt being finished
        self.last_change: dict[str, BreakerChange] = {}  # deployment id -> its breaker's (/status: why open)

    def configure(self, settings: Routing) -> None:
        """A reload's [routing] settings; learned state is kept."""
        self.settings = settings

    def state(self, dep: Deployment | str, now: float = 0.0) -> DeploymentState:
        dep_id = dep if isinstance(dep, str) else dep.id
        st = self.states.get(dep_id)
        if st is None:
            st = self.states[dep_id] = DeploymentState()
            st.breaker.on_change = lambda old, new, why: self._breaker_moved(dep_id, st, old, new, why)
            if not isinstance(dep, str):
                st.backend = dep.backend.name
                st.cap, st.queue_timeout = dep.config.max_concurrency, dep.config.queue_timeout
                if self.probed.get(st.backend) is False:
                    st.breaker.on_probe(False, now, self.settings)
        return st

    # --- the request path ---------------------------------------------------------------------

    def plan(self, target: Target, features: RequestFeatures, now: float) -> Plan:
        candidates: list[Deployment] = []
        probes: list[Deployment] = []
        blocked: list[DeploymentState] = []
        for dep in target.deployments:
            st = self.state(dep, now)
            if st.breaker.admits(now):
                (probes if st.breaker.state == HALF_OPEN else candidates).append(dep)
            else:
                blocked.append(st)
        if not candidates and not probes:
            at = min((st.breaker.available_at(now) for st in blocked), default=now + 1.0)
            return Plan(target.strategy, (), {}, retry_after=max(1.0, at - now))
        typical = self._typical(target.name)
        typical.prompt_bytes.add(features.prompt_bytes)
        typical.max_tokens.add(features.max_tokens)
        if len(candidates) + len(probes) == 1:     # the common case: nothing to order
            dep = (candidates or probes)[0]
            st = self.states[dep.id]
            time = strategies.predict_time(dep, st, features.prompt_bytes, features.max_tokens,
                                           self._lengths(dep.model), now)
            st.expect = time
            return Plan(target.strategy, (dep,), {dep.id: time} if st.latency.observations else {})
        estimates = strategies.like_peers({
            dep.id: strategies.estimate(dep, self.states[dep.id], features.prompt_bytes, features.max_tokens,
                                        self._lengths(dep.model), now)
            for dep in (*probes, *candidates)})
        for dep_id, est in estimates.items():
            self.states[dep_id].expect = est.time     # what its next start is expected to take
        if len(candidates) > 1:
            policy = target.policy
            order_fn = strategies.ORDERS.get(target.strategy, strategies.scored)
            candidates = order_fn(candidates, rng=self.rng, states=self.states.__getitem__,
                                  estimates=estimates, cost_weight=policy.cost_weight,
                                  exploration=policy.exploration, typical=typical.best_time, now=now)
        order = (*probes, *candidates)
        return Plan(target.strategy, order, {dep_id: est.time for dep_id, est in estimates.items()})

    def started(self, dep: Deployment, now: float) -> None:
        self.state(dep, now).start(now)

    def finished(self, dep: Deployment, outcome: Outcome, now: float, cause: str | None = None) -> None:
        """`cause`: why the attempt failed, if it did (for the breaker's events)."""
        st = self.state(dep, now)
        self._cause = cause
        f = outcome.features
        st.finish(outcome.ok, outcome.status, outcome.ttfb, outcome.duration, began=outcome.began,
                  prompt_bytes=f.prompt_bytes if f else None, max_tokens=f.max_tokens if f else 0,
                  stream=f.stream if f else False, output_tokens=outcome.output_tokens,
                  cancelled=outcome.cancelled, retry_after=outcome.retry_after,
                  lengths=self._lengths(dep.model), now=now, settings=self.settings)
        self._cause = None
        if self._keep is not None and dep.id not in self._keep and st.in_flight == 0:
            del self.states[dep.id]     # gone in a reload; its last request is done

    def _breaker_moved(self, dep_id: str, st: DeploymentState, old: str, new: str, why: str) -> None:
        change = BreakerChange(dep_id, st.backend, old, new, why, self._cause)
        self.last_change[dep_id] = change
        if self.on_breaker is not None:
            self.on_breaker(change)

    def probe_result(self, backend: str, ok: bool, now: float) -> None:
        """An active health probe of a backend answered (ok) or not: every deployment on it."""
        self.probed[backend] = ok
        for st in self.states.values():
            if st.backend == backend:
                st.breaker.on_probe(ok, now, self.settings)

    # --- views --------------------------------------------------------------------------------

    def usable(self, runtime: Runtime, now: float) -> bool:
        """For /readyz: is any deployment not known to be down?"""
        return any(self.state(dep, now).breaker.usable(now) for dep in runtime.deployments.values())

    def table(self, runtime: Runtime, now: float) -> dict[str, object]:
        """The live routing table per target (groups, and models with their deployments), JSON-able."""
        out: dict[str, object] = {}
        for name, target in runtime.targets.items():
            typical = self.typical.get(name) or _Typical()
            prompt_bytes = int(typical.prompt_bytes.get(TYPICAL_PROMPT_BYTES))
            max_tokens = int(typical.max_tokens.get(TYPICAL_MAX_TOKENS))
            estimates = strategies.like_peers({
                dep.id: strategies.estimate(dep, self.state(dep, now), prompt_bytes, max_tokens,
                                            self._lengths(dep.model), now)
                for dep in target.deployments})
            rows = [self._row(dep, target, estimates[dep.id], now) for dep in target.deployments]
            out[name] = {"strategy": target.strategy, "group": target.group is not None,
                         "typical_request": {"prompt_bytes": prompt_bytes, "max_tokens": max_tokens},
                         "deployments": rows}
        return out

    def _row(self, dep: Deployment, target: Target, est: strategies.Estimate, now: float) -> dict[str, object]:
        st = self.state(dep, now)
        b = st.breaker
        state = b.current(now)
        window_rate, window_n = b.error_rate(now, self.settings)
        return {
            "deployment": dep.id, "model": dep.model, "backend": dep.backend.name,
            "breaker": state, "cooling_s": round(max(0.0, b.cool_until - now), 3),
            "reopens_in_s": round(max(0.0, b.reopen_at - now), 3) if state == "open" else None,
            "probe_in_flight": b.probing, "opened": b.opened,
            "in_flight": st.in_flight, "max_concurrency": dep.config.max_concurrency,
            "requests": st.requests, "failures": st.failures,
            "error_rate": round(st.rates.error_rate(), 4), "throttle_rate": round(st.rates.throttle_rate(), 4),
            "window_error_rate": round(window_rate, 4), "window_requests": window_n,
            "latency": {k: round(v, 6) for k, v in st.latency.params().items()},
            "first_byte": {k: round(v, 6) for k, v in st.first_byte.params().items()},
            "observations": st.latency.observations,
            "mean_duration_s": st.duration.value,
            "predicted_s": round(est.time, 4), "uncertainty_s": round(est.spread, 4),
            "failure_p": round(est.fail_p, 4), "impact_s": round(est.impact, 4),
            "score": round(strategies.score(est.time, est, target.policy.cost_weight), 4),
        }

    def retain(self, deployment_ids: Iterable[str]) -> None:
        """After a reload: drop state of deployments that are gone (in-flight ones finish first)."""
        self._keep = set(deployment_ids)
        for dep_id in list(self.states):
            if dep_id not in self._keep and self.states[dep_id].in_flight == 0:
                del self.states[dep_id]
        for dep_id in list(self.last_change):
            if dep_id not in self._keep:
                del self.last_change[dep_id]

    def _lengths(self, model: str) -> OutputLength:
        lengths = self.lengths.get(model)
        if lengths is None:
            lengths = self.lengths[model] = OutputLength()
        return lengths

    def _typical(self, name: str) -> _Typical:
        typical = self.typical.get(name)
        if typical is None:
            typical = self.typical[name] = _Typical()
        return typical
