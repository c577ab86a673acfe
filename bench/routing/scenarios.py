"""The scenarios the routing benchmark replays, each through every strategy with the same requests.

Numbers are meant to be plausible, not flattering: upstreams whose speed depends on request size
in different ways (a remote API with a fixed overhead and slow decoding, GPUs whose prefill and
decode speeds differ), finite batches that slow down as they fill, and the kinds of trouble
operators see: refused connections, 5xx bursts, hangs until the first-byte timeout, mid-stream
resets, a slow recovery, a request quota answered with 429 + Retry-After.

The request stream is the same mix everywhere: short chats, RAG prompts of tens of KiB, long
generations and tiny classifications; 40% streamed; Poisson arrivals.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import attrs

from bench.routing.sim import Request, Timeouts, Trouble, Upstream


@attrs.frozen
class Scenario:
    name: str
    about: str
    upstreams: Callable[[], list[Upstream]]    # fresh, stateful upstreams for each run
    rate: float                                # requests per second
    seconds: float
    timeouts: Timeouts = Timeouts()
    control: bool = False                      # not part of the target; see CONTROLS


# (share, prompt KiB range (log-uniform), max_tokens, median output tokens)
MIX = (
    (0.50, (0.3, 8.0), 512, 150),       # chat
    (0.25, (16.0, 96.0), 300, 120),     # RAG: long prompt, short answer
    (0.15, (1.0, 4.0), 2000, 900),      # long generation
    (0.10, (0.5, 2.0), 5, 2),           # classification
)


def workload(rate: float, seconds: float, seed: int) -> list[Request]:
    rng = random.Random(seed * 7919 + 17)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        u, acc = rng.random(), 0.0
        for share, (lo, hi), max_tokens, median in MIX:
            acc += share
            if u <= acc:
                break
        kib = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        tokens = max(1, min(max_tokens, int(median * math.exp(rng.gauss(0.0, 0.5)))))
        out.append(Request(t, int(kib * 1024), max_tokens, tokens, rng.random() < 0.4))


def _size_mix() -> list[Upstream]:
    return [
        Upstream("api", ttft=0.5, prefill_per_kib=0.002, tpot=0.030, slots=1000, noise=0.35, batch_slowdown=0.0),
        Upstream("gpu-a", ttft=0.08, prefill_per_kib=0.045, tpot=0.010, slots=24, batch_slowdown=0.02),
        Upstream("gpu-b", ttft=0.15, prefill_per_kib=0.015, tpot=0.018, slots=24, batch_slowdown=0.02),
    ]


def _saturation() -> list[Upstream]:
    return [
        Upstream("small-1", ttft=0.1, prefill_per_kib=0.01, tpot=0.012, slots=6, max_concurrency=6,
                 max_queue=32, queue_timeout=5.0),
        Upstream("small-2", ttft=0.1, prefill_per_kib=0.01, tpot=0.012, slots=6, max_concurrency=6,
                 max_queue=32, queue_timeout=5.0),
        Upstream("big", ttft=0.2, prefill_per_kib=0.015, tpot=0.022, slots=24, max_concurrency=24,
                 batch_slowdown=0.02, max_queue=64, queue_timeout=5.0),
        Upstream("api", ttft=0.6, prefill_per_kib=0.004, tpot=0.035, slots=1000, noise=0.4, batch_slowdown=0.0),
    ]


def _recovering(start: float, factor: float, tau: float) -> Callable[[float], float]:
    return lambda t: 1.0 + (factor - 1.0) * math.exp(-(t - start) / tau) if t >= start else 1.0


def _failures() -> list[Upstream]:
    return [
        Upstream("east", ttft=0.15, prefill_per_kib=0.012, tpot=0.015, slots=32,
                 trouble=[Trouble(120, 360, "refuse")], slow=_recovering(360, 4.0, 120)),
        Upstream("west", ttft=0.15, prefill_per_kib=0.012, tpot=0.016, slots=32,
                 trouble=[Trouble(150, 450, "error", 0.5)]),
        Upstream("north", ttft=0.2, prefill_per_kib=0.015, tpot=0.018, slots=32,
                 trouble=[Trouble(200, 320, "hang", 0.3), Trouble(200, 320, "reset", 0.1)]),
        Upstream("south", ttft=0.2, prefill_per_kib=0.015, tpot=0.020, slots=12, max_concurrency=12,
                 max_queue=32, queue_timeout=5.0),
        Upstream("central", ttft=0.25, prefill_per_kib=0.018, tpot=0.024, slots=32, batch_slowdown=0.02),
    ]


def _homogeneous() -> list[Upstream]:
    return [Upstream(f"gpu-{i}", ttft=0.15, prefill_per_kib=0.012, tpot=0.016, slots=32, batch_slowdown=0.02)
            for i in range(4)]


def _collapse() -> list[Upstream]:
    return [u for u in _failures() if u.name != "central"]


def _cooling() -> list[Upstream]:
    return [
        Upstream("quota-api", ttft=0.3, prefill_per_kib=0.003, tpot=0.008, slots=1000, noise=0.3, batch_slowdown=0.0,
                 quota=(30, 10.0)),
        Upstream("gpu", ttft=0.15, prefill_per_kib=0.012, tpot=0.018, slots=16, max_concurrency=16,
                 batch_slowdown=0.02, max_queue=32, queue_timeout=5.0),
        Upstream("api-2", ttft=0.6, prefill_per_kib=0.004, tpot=0.025, slots=1000, noise=0.4, batch_slowdown=0.0),
    ]


SCENARIOS = (
    Scenario("size-mix", "three upstreams, each fastest for some request sizes; no caps",
             _size_mix, rate=3.0, seconds=900),
    Scenario("saturation", "two small fast GPUs (cap 6), a big slower one (cap 24), an elastic slow API",
             _saturation, rate=6.0, seconds=900),
    Scenario("failure-burst", "refused 120-360 s then a 4x slow recovery; 50% 5xx 150-450 s; "
             "30% hangs + 10% stream resets 200-320 s; two healthy ones, one capped at 12",
             _failures, rate=5.0, seconds=900),
    Scenario("429-cooling", "the fastest upstream has a quota of 30 requests / 10 s, then 429 + "
             "Retry-After; a capped GPU and a slower API",
             _cooling, rate=5.0, seconds=900),
)

# Controls, added after the four above were settled, to show where scored has nothing to win or
# wins something else: four identical upstreams (least-busy is near optimal there; nothing is to
# be learned but the load), and failure-burst without its fifth, healthy upstream, so that for two
# minutes the healthy capacity is below the demand and every strategy loses requests.
CONTROLS = (
    Scenario("homogeneous", "control: four identical GPUs, nothing to learn but the load",
             _homogeneous, rate=5.0, seconds=900, control=True),
    Scenario("capacity-collapse", "control: failure-burst without the fifth, healthy upstream: "
             "for two minutes demand exceeds what still works", _collapse, rate=5.0, seconds=900,
             control=True),
)

