"""A discrete-event simulation of hxgwd's request path on a virtual clock: no sockets, no sleeps.

What is simulated, and what is the real thing:

- REAL: `hxgwd.pipeline.route.Router` (plan / started / finished, the breaker, the learned model),
  fed with `Target`s compiled from TOML by `hxgwd.runtime.compile_config`, as the daemon does.
- Mirrored from `hxgwd.pipeline.proxy.forward` and `hxgwd.upstream.gates`, step by step: the plan
  is made once at arrival; its order is tried up to `routing.max_attempts` deployments, within the
  request's overall deadline; `started()` comes before the concurrency gate, a full gate queue or
  a gate timeout fails over and is reported as `cancelled` (not the deployment's fault); a
  transport failure, 5xx or 429 fails over, with the upstream's Retry-After passed on; a stream
  cut after its first byte is lost, never retried; an empty plan is a 503.
- Modelled: the upstreams. Each has a server-side batch limit (`slots`, FIFO beyond it), a time
  to first token of base + prefill per KiB of prompt, a time per output token that grows with the
  batch (continuous batching shares the GPU), log-normal noise, and a schedule of trouble:
  refused connections, 5xx bursts, hangs (no answer until the first-byte timeout), mid-stream
  resets, a slow-down factor for recoveries, and a per-window request quota answered with 429 +
  Retry-After. A non-streamed answer's head comes with its end, as from real servers.

Processes are generators that yield ("sleep", seconds) or ("acquire", semaphore, timeout); the
loop resumes them in time order. Everything random comes from one seeded `random.Random` per run.
"""

from __future__ import annotations

import heapq
import math
import random
from typing import Any, Callable, Generator

import attrs

from hxgwd.pipeline.route import Outcome, RequestFeatures, Router
from hxgwd.runtime import Deployment, Target

Proc = Generator[Any, Any, Any]


class Semaphore:
    def __init__(self, slots: int) -> None:
        self.free = slots
        self.waiters: list[list] = []          # [proc, alive]

    @property
    def waiting(self) -> int:
        return sum(1 for w in self.waiters if w[1])


class Loop:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list = []
        self._n = 0

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (t, self._n, fn, args))
        self._n += 1

    def spawn(self, proc: Proc, at: float | None = None) -> None:
        self.at(self.now if at is None else at, self._step, proc, None)

    def run(self) -> None:
        while self._heap:
            t, _, fn, args = heapq.heappop(self._heap)
            self.now = t
            fn(*args)

    def release(self, sem: Semaphore) -> None:
        while sem.waiters:
            waiter = sem.waiters.pop(0)
            if waiter[1]:
                waiter[1] = False
                self.at(self.now, self._step, waiter[0], True)
                return
        sem.free += 1

    def _step(self, proc: Proc, value: Any) -> None:
        try:
            cmd = proc.send(value)
        except StopIteration:
            return
        if cmd[0] == "sleep":
            self.at(self.now + max(0.0, cmd[1]), self._step, proc, None)
        elif cmd[0] == "acquire":
            sem, timeout = cmd[1], cmd[2]
            if sem.free > 0:
                sem.free -= 1
                self.at(self.now, self._step, proc, True)
                return
            waiter = [proc, True]
            sem.waiters.append(waiter)
            self.at(self.now + timeout, self._expire, waiter)
        else:
            raise ValueError(cmd)

    def _expire(self, waiter: list) -> None:
        if waiter[1]:
            waiter[1] = False
            self._step(waiter[0], False)


# --- upstreams ------------------------------------------------------------------------------------

@attrs.define
class Trouble:
    """A stretch of time [start, end) in which an upstream misbehaves."""

    start: float
    end: float
    kind: str                    # "refuse", "error", "hang", "reset"
    share: float = 1.0           # of the requests in the stretch


@attrs.define
class Upstream:
    name: str
    ttft: float                  # seconds before the first token, empty prompt, idle server
    prefill_per_kib: float       # seconds per KiB of prompt
    tpot: float                  # seconds per output token, batch of one
    batch_slowdown: float = 0.02 # tpot grows by this share per other request in the batch
    slots: int = 64              # the server's batch; more wait in its queue
    noise: float = 0.25          # log-normal sigma
    max_concurrency: int = 0     # the gateway's cap for this deployment (config)
    max_queue: int = 64
    queue_timeout: float = 5.0
    weight: float = 1.0
    input_cost_per_1k: float = 0.0
    output_cost_per_1k: float = 0.0
    trouble: list[Trouble] = attrs.field(factory=list)
    slow: Callable[[float], float] | None = None    # latency multiplier over time (recovery)
    quota: tuple[int, float] | None = None          # (requests, window seconds): beyond -> 429
    sem: Semaphore = attrs.field(init=False)
    batch: int = attrs.field(init=False, default=0)
    window: tuple[float, int] = attrs.field(init=False, default=(0.0, 0))

    def __attrs_post_init__(self) -> None:
        self.sem = Semaphore(self.slots)

    def trouble_at(self, now: float, rng: random.Random) -> str | None:
        for t in self.trouble:
            if t.start <= now < t.end and rng.random() < t.share:
                return t.kind
        return None


@attrs.frozen
class Timeouts:
    first_byte: float = 120.0    # request sent -> response head (a whole non-streamed answer)
    total: float = 300.0         # the whole request, every attempt: proxy's deadline
    refused: float = 0.002       # a refused connect fails this fast
    error: float = 0.15          # a 5xx takes this long


@attrs.frozen
class Request:
    arrival: float
    prompt_bytes: int
    max_tokens: int
    output_tokens: int           # what the model will produce (at most max_tokens)
    stream: bool


@attrs.define
class Result:
    arrival: float
    done: float | None = None    # None: lost
    attempts: int = 0
    size: int = 0
    why: str | None = None       # for a lost request: how it was lost
    trail: list[str] = attrs.field(factory=list)   # each attempt: "deployment:what happened"

    @property
    def ok(self) -> bool:
        return self.done is not None


def serve(loop: Loop, up: Upstream, req: Request, timeouts: Timeouts, deadline: float,
          rng: random.Random) -> Proc:
    """One attempt at an upstream. Returns (outcome kwargs, reached the client?)."""
    began = loop.now
    limit = min(began + timeouts.first_byte, deadline)
    trouble = up.trouble_at(began, rng)
    if trouble == "refuse":
        yield ("sleep", timeouts.refused)
        return dict(ok=False, status=0, ttfb=0.0, duration=loop.now - began), False
    if trouble == "error":
        yield ("sleep", timeouts.error * rng.uniform(0.5, 1.5))
        return dict(ok=False, status=500, ttfb=0.0, duration=loop.now - began), False
    if trouble == "hang":
        yield ("sleep", limit - began)
        return dict(ok=False, status=0, ttfb=0.0, duration=loop.now - began), False
    if up.quota is not None:
        count, window = up.quota
        start, used = up.window
        if began >= start + window:
            start, used = began - (began - start) % window, 0
        if used >= count:
            up.window = (start, used)
            yield ("sleep", 0.05)
            return dict(ok=False, status=429, ttfb=0.0, duration=loop.now - began,
                        retry_after=float(math.ceil(start + window - began))), False
        up.window = (start, used + 1)
    got = yield ("acquire", up.sem, max(limit - loop.now, 0.0))
    if not got:                   # the server's queue outlasted the first-byte timeout
        return dict(ok=False, status=0, ttfb=0.0, duration=loop.now - began), False
    try:
        up.batch += 1
        slow = up.slow(loop.now) if up.slow else 1.0
        jitter = math.exp(rng.gauss(0.0, up.noise) - up.noise * up.noise / 2)
        first = (up.ttft + up.prefill_per_kib * req.prompt_bytes / 1024) * slow * jitter
        per_token = up.tpot * (1 + up.batch_slowdown * (up.batch - 1)) * slow * jitter
        decode = per_token * req.output_tokens
        head = first if req.stream else first + decode
        if loop.now + head > limit:
            yield ("sleep", limit - loop.now)
            return dict(ok=False, status=0, ttfb=0.0, duration=loop.now - began), False
        yield ("sleep", head)
        ttfb = loop.now - began
        if req.stream:
            if trouble == "reset":
                yield ("sleep", decode * rng.random())
                return dict(ok=False, status=0, ttfb=0.0, duration=0.0), True
            if loop.now + decode > deadline:
                yield ("sleep", deadline - loop.now)
                return dict(ok=False, status=0, ttfb=0.0, duration=0.0), True
            yield ("sleep", decode)
        return dict(ok=True, status=200, ttfb=ttfb, duration=loop.now - began,
                    output_tokens=req.output_tokens), True
    finally:
        up.batch -= 1
        loop.release(up.sem)


def request(loop: Loop, router: Router, target: Target, ups: dict[str, Upstream],
            gates: dict[str, Semaphore], req: Request, timeouts: Timeouts, max_attempts: int,
            rng: random.Random, result: Result) -> Proc:
    """proxy.forward on the virtual clock."""
    features = RequestFeatures(req.prompt_bytes, req.max_tokens, req.stream)
    plan = router.plan(target, features, loop.now)
    deadline = req.arrival + timeouts.total
    result.why = "no deployment usable" if not plan.order else "every attempt failed"
    for dep in plan.order[:max_attempts]:
        if loop.now >= deadline:
            result.why = "deadline"
            return
        result.attempts += 1
        up = ups[dep.id]
        router.started(dep, loop.now)
        gate = gates.get(dep.id)
        if gate is not None:
            if gate.free <= 0 and gate.waiting >= dep.config.max_queue:
                router.finished(dep, _busy(features), loop.now)
                result.trail.append(f"{dep.model}:queue-full")
                continue
            got = yield ("acquire", gate, min(up.queue_timeout, deadline - loop.now))
            if not got:
                router.finished(dep, _busy(features), loop.now)
                result.trail.append(f"{dep.model}:queue-timeout")
                continue
        try:
            outcome, reached_client = yield from serve(loop, up, req, timeouts, deadline, rng)
        finally:
            if gate is not None:
                loop.release(gate)
        router.finished(dep, Outcome(features=features, **outcome), loop.now)
        result.trail.append(f"{dep.model}:{outcome['status'] or 'fail'}@{outcome['duration']:.1f}")
        if outcome["ok"]:
            result.done = loop.now
            result.why = None
            return
        if reached_client:
            result.why = "cut after the first byte"
            return                 # no retry
        if loop.now >= deadline:
            result.why = "deadline"
            return


def _busy(features: RequestFeatures) -> Outcome:
    return Outcome(ok=True, status=0, ttfb=0.0, duration=0.0, features=features, cancelled=True)


def deployment_map(target: Target, ups: list[Upstream]) -> dict[str, Upstream]:
    by_model = {u.name: u for u in ups}
    return {d.id: by_model[d.model] for d in target.deployments}


def run(router: Router | list[tuple[Router, Target]], target: Target, ups: list[Upstream], requests: list[Request],
        timeouts: Timeouts, max_attempts: int, seed: int) -> list[Result]:
    """With a list of (router, target) pairs, each is a worker process of one host
    (hxgwd/workers/): a request goes to one picked at random (as the kernel hands connections to
    whichever worker accepts), which learns only from its own requests and routes with its own
    target, compiled with its share of each max_concurrency and max_queue."""
    loop = Loop()
    rng = random.Random(seed)
    workers = router if isinstance(router, list) else [(router, target)]
    by_id = deployment_map(target, ups)
    gates = [{d.id: Semaphore(d.config.max_concurrency) for d in t.deployments if d.config.max_concurrency > 0}
             for _, t in workers]
    pick = random.Random(seed + 7919)
    results = []
    for req in requests:
        res = Result(req.arrival, size=req.prompt_bytes)
        results.append(res)
        k = pick.randrange(len(workers))
        loop.spawn(request(loop, workers[k][0], workers[k][1], by_id, gates[k], req, timeouts, max_attempts, rng, res),
                   at=req.arrival)
    loop.run()
    return results


def deployment_of(target: Target, name: str) -> Deployment:
    return next(d for d in target.deployments if d.model == name)
