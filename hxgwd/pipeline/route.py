"""Stage 5, route: which deployments may serve a request, and in which order to try them.

`resolve()` turns the requested name into a `Target` (404 / 403 / 400 as OpenAI clients expect).
`Router.plan()` orders its deployments by the target's strategy; `Router.started()` and
`Router.finished()` are the feedback every attempt reports, so a strategy can learn. The router's
state is keyed by deployment id and lives outside the config snapshot: it survives reloads for
deployments that still exist. Pure: no I/O; time and randomness come in as arguments.
"""

from __future__ import annotations

import math
import random
from typing import Iterable

import attrs

from hxgwd.config.model import Routing
from hxgwd.errors import BadRequest, Forbidden, NotFound
from hxgwd.runtime import Deployment, Principal, Runtime, Target


def resolve(runtime: Runtime, name: str, kind: str, principal: Principal) -> Target:
    target = runtime.targets.get(name)
    if target is None:
        raise NotFound(f"The model '{name}' does not exist.", code="model_not_found", param="model")
    if not principal.may_use(name):
        raise Forbidden(f"This key may not use the model '{name}'.", param="model")
    if target.kind != kind:
        what = "an embedding model" if target.kind == "embedding" else "a chat model"
        raise BadRequest(f"'{name}' is {what}; it cannot serve this endpoint.", code="model_wrong_kind",
                         param="model")
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


@attrs.define
class DeploymentState:
    in_flight: int = 0
    requests: int = 0
    failures: int = 0


@attrs.frozen
class Plan:
    strategy: str
    order: tuple[Deployment, ...]                 # empty: nothing usable now
    predicted: dict[str, float] = attrs.field(factory=dict)   # deployment id -> predicted seconds
    retry_after: float | None = None             # with an empty order: when to come back


class Router:
    def __init__(self, rng: random.Random | None = None, settings: Routing | None = None) -> None:
        self.rng = rng or random.Random()
        self.settings = settings or Routing()
        self.states: dict[str, DeploymentState] = {}

    def configure(self, settings: Routing) -> None:
        """A reload's [routing] settings; learned state is kept."""
        self.settings = settings

    def state(self, dep_id: str) -> DeploymentState:
        st = self.states.get(dep_id)
        if st is None:
            st = self.states[dep_id] = DeploymentState()
        return st

    def plan(self, target: Target, features: RequestFeatures, now: float) -> Plan:
        deps = target.deployments
        if target.strategy == "priority" or len(deps) == 1:
            return Plan(target.strategy, deps)
        return Plan(target.strategy, tuple(weighted_order(deps, self.rng)))

    def started(self, dep: Deployment, now: float) -> None:
        st = self.state(dep.id)
        st.in_flight += 1
        st.requests += 1

    def finished(self, dep: Deployment, outcome: Outcome, now: float) -> None:
        st = self.state(dep.id)
        st.in_flight -= 1
        if not outcome.ok:
            st.failures += 1

    def probe_result(self, backend: str, ok: bool, now: float) -> None:
        """An active health probe of a backend answered (ok) or not."""

    def usable(self, runtime: Runtime, now: float) -> bool:
        return bool(runtime.deployments)

    def table(self, runtime: Runtime, now: float) -> dict[str, object]:
        """The live routing table per target, for the admin endpoint."""
        return {name: [{"deployment": d.id, **attrs.asdict(self.state(d.id))} for d in t.deployments]
                for name, t in runtime.targets.items()}

    def retain(self, deployment_ids: Iterable[str]) -> None:
        """After a reload: drop state of deployments that are gone (in-flight ones finish first)."""
        keep = set(deployment_ids)
        for dep_id in list(self.states):
            if dep_id not in keep and self.states[dep_id].in_flight == 0:
                del self.states[dep_id]


def weighted_order(deps: Iterable[Deployment], rng: random.Random) -> list[Deployment]:
    """A random order where each deployment comes first with probability weight / total.

    Efraimidis-Spirakis: sort by u ** (1 / w); the remaining order is again weighted, which makes
    it the failover order too.
    """
    keyed = [(math.log(rng.random() or 1e-300) / d.weight, i, d) for i, d in enumerate(deps)]
    keyed.sort(reverse=True)
    return [d for _, _, d in keyed]
