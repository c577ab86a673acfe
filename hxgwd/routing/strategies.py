"""How the candidates of a plan are ordered: the first is tried first, the rest are the failover.

Candidates arrive already filtered by health (open breakers and cooling deployments are out).

- priority: config order; ordered failover.
- weighted: a random order, first place with probability weight / total weights.
- least-busy: fewest in flight relative to capacity.
- least-latency: lowest recent mean duration of successful requests; unmeasured ones first.
- scored: lowest expected time to an answer, from what was learned (`estimator`):

      T     = gateway queue wait + predicted duration at the deployment's current load
      score = T + p * F / (1 - p)  +  I  +  cost_weight * predicted USD

  p is the chance this attempt fails (recent errors and 429s, requests overdue right now, a
  gateway queue that would time out) and F how long a failure takes. Trying deployments in
  order until one answers, the order by this index minimises the expected time to an answer
  (swap any two neighbours and compare): a deployment that fails fast costs little, since the
  next one is close behind; one that hangs costs its timeouts; one that always fails sinks last.
  I is what the request costs the others there: the slowdown it adds to each request in flight
  (the learned load share), and the wait it adds to each one that will queue behind it at the
  gateway. Choosing by own time alone is what a selfish client does, and it crowds the fastest
  deployment until everyone there is slower: the marginal cost is what keeps the total low.

Uncertainty and load. Two predictions closer than the model can tell apart (within Z standard
deviations of their uncertainty) are a tie, and ties go to the least busy, as `least-busy`
would. That is both the exploration and the load balancing:
- a new deployment (its mean taken from its peers', its uncertainty the prior's) or one silent
  for long (uncertainty grows with time, see `estimator`) ties with the best, so it gets requests
  and is measured; once measured, it keeps them only if it is really as good;
- among equals, the least loaded wins, which keeps batches small and queues short; a purely
  greedy choice piles each burst onto whichever looks fastest by a hair.
Requests already in flight count in the load, so a burst spreads over a new deployment and its
peers instead of piling onto the unknown.

On top, the group's `exploration` share is a floor against starvation: with that probability, a
request that is not larger than usual goes first to a healthy deployment nobody tried for STALE
seconds. A small request suffices to see whether a deployment is up and how it is doing, and
keeps the cost of measuring it out of the tail. `exploration = 0` turns both off: greedy.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import attrs

from hxgwd.routing.estimator import Ewma, OutputLength, quad
from hxgwd.routing.state import KIB, RATE_HALF_LIFE, DeploymentState

if TYPE_CHECKING:                 # runtime holds the router's inputs; routing/ stays free of it
    from hxgwd.config.model import Model
    from hxgwd.runtime import Deployment

Z = 2.0                  # standard deviations within which two predictions are a tie
SMALL = 1.5              # "not larger than usual": predicted at most 1.5 x the typical request
STALE = 30.0             # seconds without a request before the exploration floor applies
MAX_FAIL_P = 0.99


@attrs.frozen
class Estimate:
    time: float          # predicted seconds to finish if tried first: gateway queue + duration
    wait: float          # the gateway queue part
    spread: float        # standard deviation of the duration prediction (uncertainty, not noise)
    fail_p: float
    fail_time: float
    cost: float          # USD
    measured: bool
    impact: float = 0.0  # seconds it would add to the others' times, all of them together


def estimate(dep: Deployment, st: DeploymentState, prompt_bytes: int, max_tokens: int, lengths: OutputLength,
             now: float) -> Estimate:
    cfg = dep.config
    cap = cfg.max_concurrency
    st.cap, st.queue_timeout = cap, cfg.queue_timeout
    out = lengths.expect(max_tokens)
    kb, out_k = prompt_bytes / KIB, out / 1000.0
    model = st.latency
    model.drift(now)
    others = st.others()
    t = model.theta
    base = t[0] + t[1] * kb + t[2] * out_k
    if base < 0.0:
        base = 0.0
    factor = 1.0 + model.kappa * others
    mean = base * factor
    var = quad(model.cov, 1.0, kb, out_k) * factor * factor
    # What it costs the others: each request already there slows down by kappa * (its size; ours
    # stands in for it), and each one that will queue behind ours at the gateway waits S / cap more.
    impact = others * model.kappa * base
    in_flight = st.in_flight
    if cap > 0 and in_flight >= cap:
        impact += (in_flight - cap + 1) * mean / cap
        wait, busy_p, busy_time = _queue(st, cfg, mean)
    else:
        wait = busy_p = busy_time = 0.0
    # The upstream: its recent failures, plus the requests overdue right now (see state.overdue).
    rates = st.rates
    rates.decay(now, RATE_HALF_LIFE)
    overdue, oldest = st.overdue(now) if st.starts else (0.0, 0.0)
    up_p = (rates.errors + rates.throttled + overdue + rates.PRIOR_RATE) / (rates.total + overdue + 1.0)
    up_time = st.fail_time.get(1.0)
    if oldest > up_time:
        up_time = oldest
    # The gateway's queue in front of it, if capped: a wait, or a failover once it times out.
    fail_p = 1.0 - (1.0 - busy_p) * (1.0 - up_p)
    fail_time = ((busy_p * busy_time + (1.0 - busy_p) * up_p * (wait + up_time)) / fail_p
                 if fail_p > 0.0 else 0.0)
    cost = ((cfg.input_cost_per_1k * prompt_bytes / 4.0 + cfg.output_cost_per_1k * out) / 1000.0
            if cfg.input_cost_per_1k or cfg.output_cost_per_1k else 0.0)
    return Estimate(wait + mean, wait, math.sqrt(var) if var > 0.0 else 0.0, fail_p, fail_time, cost,
                    model.observations > 0, impact)


def predict_time(dep: Deployment, st: DeploymentState, prompt_bytes: int, max_tokens: int, lengths: OutputLength,
                 now: float) -> float:
    """Just the predicted time (queue + duration): all a plan with one candidate needs."""
    cfg = dep.config
    st.cap, st.queue_timeout = cfg.max_concurrency, cfg.queue_timeout
    st.latency.drift(now)
    mean = max(st.latency.predict(prompt_bytes / KIB, lengths.expect(max_tokens) / 1000.0, st.others())[0], 0.0)
    return _queue(st, cfg, mean)[0] + mean


def like_peers(estimates: dict[str, Estimate]) -> dict[str, Estimate]:
    """An unmeasured deployment is predicted to be like its measured peers (mean of their
    durations), with its prior uncertainty: "unknown" reads as "like the others, unsure"."""
    measured = [e.time - e.wait for e in estimates.values() if e.measured]
    if not measured or len(measured) == len(estimates):
        return estimates
    peer = sum(measured) / len(measured)
    return {k: e if e.measured else attrs.evolve(e, time=e.wait + peer) for k, e in estimates.items()}


def _queue(st: DeploymentState, cfg: Model, service: float) -> tuple[float, float, float]:
    """(expected wait for a slot, chance the wait ends in failover, time lost when it does).

    With `ahead` requests before ours and `cap` slots each freeing after a mean duration S, a
    slot comes after about ahead * S / cap. The wait is taken as exponential around that mean,
    so the queue timeout Q cuts it off with probability exp(-Q / mean). A full queue rejects
    at once: certain failover, no time lost, but one attempt of the request spent.
    """
    cap = cfg.max_concurrency
    if cap <= 0 or st.in_flight < cap:
        return 0.0, 0.0, 0.0
    ahead = st.in_flight - cap + 1
    if ahead > cfg.max_queue:
        return 0.0, 1.0, 0.0
    mean = ahead * st.duration.get(service) / cap
    if mean <= 0.0:
        return 0.0, 0.0, 0.0
    timeout = cfg.queue_timeout
    return min(mean, timeout), math.exp(-timeout / mean), timeout


def score(time: float, est: Estimate, cost_weight: float) -> float:
    p = min(est.fail_p, MAX_FAIL_P)
    return time + p * est.fail_time / (1.0 - p) + est.impact + cost_weight * est.cost


def load_ratio(cands: Sequence[Deployment]) -> Callable[[Deployment, DeploymentState], float]:
    """In flight relative to capacity: max_concurrency; for an uncapped deployment, its weight
    times the capped ones' capacity per unit of weight (1 if none is capped), so capped and
    uncapped deployments compare fairly."""
    capped = [d for d in cands if d.config.max_concurrency > 0]
    unit = (sum(d.config.max_concurrency for d in capped) / max(sum(d.weight for d in capped), 1e-9)
            if capped else 1.0)
    return lambda d, st: st.in_flight / max(d.config.max_concurrency or d.weight * unit, 1e-9)


# --- orders ---------------------------------------------------------------------------------------

def priority(cands: Sequence[Deployment], **_: object) -> list[Deployment]:
    return list(cands)


def weighted(cands: Sequence[Deployment], *, rng: random.Random, **_: object) -> list[Deployment]:
    """Efraimidis-Spirakis: sort by u ** (1 / w); what remains is again weighted: the failover."""
    keyed = [(math.log(rng.random() or 1e-300) / max(d.weight, 1e-9), i, d) for i, d in enumerate(cands)]
    keyed.sort(key=lambda k: (k[0], -k[1]), reverse=True)
    return [d for _, _, d in keyed]


def least_busy(cands: Sequence[Deployment], *, states: Callable[[str], DeploymentState], rng: random.Random,
               **_: object) -> list[Deployment]:
    ratio = load_ratio(cands)
    return _sorted(cands, lambda d: ratio(d, states(d.id)), rng)


def least_latency(cands: Sequence[Deployment], *, states: Callable[[str], DeploymentState], rng: random.Random,
                  **_: object) -> list[Deployment]:
    return _sorted(cands, lambda d: states(d.id).duration.get(-1.0), rng)


def scored(cands: Sequence[Deployment], *, estimates: dict[str, Estimate], states: Callable[[str], DeploymentState],
           rng: random.Random, cost_weight: float, exploration: float, typical: Ewma, now: float,
           **_: object) -> list[Deployment]:
    rows: list[tuple[float, float, float, Deployment]] = []
    for d in cands:
        est = estimates[d.id]
        rows.append((score(est.time, est, cost_weight), est.spread, rng.random(), d))
    rows.sort(key=lambda r: (r[0], r[2]))
    best, best_spread = rows[0][0], rows[0][1]
    z = Z if exploration > 0 else 0.0
    ties: list[tuple[float, float, float, Deployment]] = []
    rest: list[tuple[float, float, float, Deployment]] = []
    for r in rows:
        tied = r[0] <= best + z * math.sqrt(r[1] * r[1] + best_spread * best_spread)
        (ties if tied else rest).append(r)
    if len(ties) > 1:
        # least busy first; among equally busy, the lowest optimistic score (the least known)
        ratio = load_ratio(cands)
        ties.sort(key=lambda r: (ratio(r[3], states(r[3].id)), r[0] - z * r[1], r[2]))
    order = [r[3] for r in ties] + [r[3] for r in rest]
    est = estimates[order[0].id]
    small = typical.value is None or est.time <= SMALL * typical.value
    typical.add(est.time)
    if exploration > 0 and small and len(order) > 1 and rng.random() < exploration:
        stale = [d for d in order[1:] if _stale(states(d.id), now)]
        if stale:
            pick = min(stale, key=lambda d: states(d.id).last_started or -math.inf)
            order.remove(pick)
            order.insert(0, pick)
    return order


def _stale(st: DeploymentState, now: float) -> bool:
    return st.last_started is None or now - st.last_started >= STALE


def _sorted(cands: Iterable[Deployment], key: Callable[[Deployment], float],
            rng: random.Random) -> list[Deployment]:
    """Sort by key; ties in random order, so equal deployments share the load."""
    keyed = [(key(d), rng.random(), d) for d in cands]
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [d for _, _, d in keyed]


ORDERS: dict[str, Callable[..., list[Deployment]]] = {
    "priority": priority, "weighted": weighted, "least-busy": least_busy,
    "least-latency": least_latency, "scored": scored,
}
