"""Limits exact across the workers of a host, without Redis: the supervisor keeps the host's
counters (one `HostLimiter`, the single process's own), and each worker asks it.

    worker: WorkerLimiter.admit ── "admit" call ──> supervisor: HostLimiter.local.admit -> reply
    worker: WorkerLimiter.settle ── "settle" notification ──> supervisor: HostLimiter.local.settle

A key without limits never leaves its worker. Admission is one round trip on the control channel
(bench/RESULTS.md has its cost); it is atomic because the supervisor runs each admit to its end
before reading the next frame. A settle is a notification queued without waiting: if the channel's
queue were full it is counted and dropped, and the reservation stays at its estimate, which
leans high. A supervisor that does not answer within ADMIT_TIMEOUT gets the request a 503, as a
Redis that does not answer does (`limits_unavailable`).

With `[redis] url` set, workers use Redis directly, as separate hosts do.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import trio

from hxgwd.config import model as m
from hxgwd.errors import RateLimited
from hxgwd.limits.estimate import Estimate
from hxgwd.limits.limiter import HostLimiter
from hxgwd.limits.local import LocalLimiter
from hxgwd.limits.periods import Period
from hxgwd.limits.redis import LimitsUnavailable
from hxgwd.limits.reservation import Reservation
from hxgwd.runtime import Principal
from hxgwd.workers.channel import Peer, PeerGone, RemoteError

ADMIT_TIMEOUT = 2.0


class WorkerLimiter:
    """A worker's limiter: the Limiter protocol (limits/limiter.py) over the control channel."""

    def __init__(self, peer: Peer, limits: m.Limits, clock: Callable[[], float] = time.time) -> None:
        self.peer = peer
        self.local = LocalLimiter(limits.timezone)   # its calendar only: the counters are the supervisor's
        self.clock = clock
        self.calls = 0
        self.failures = 0
        self.settles_dropped = 0

    async def admit(self, principal: Principal, est: Estimate) -> Reservation | None:
        if principal.rpm is None and principal.tpm is None and principal.budget_usd is None:
            return None
        self.calls += 1
        try:
            reply = await self.peer.call("admit", [principal.key_name, principal.rpm, principal.tpm,
                                                   principal.budget_usd, principal.budget_period,
                                                   est.tokens, est.cost_usd], timeout=ADMIT_TIMEOUT)
        except (PeerGone, RemoteError, trio.TooSlowError):
            self.failures += 1
            raise LimitsUnavailable("Usage limits cannot be checked right now. Please try again shortly.",
                                    retry_after=1) from None
        if reply[0] == "refused":
            raise RateLimited(reply[1], code=reply[2], retry_after=reply[3])
        return None if reply[1] is None else Reservation(*reply[1])

    async def settle(self, res: Reservation | None, tokens: int | None, cost_usd: float | None) -> None:
        if res is None:
            return
        if not self.peer.notify_nowait("settle", [[res.key, res.bucket, res.tokens, res.nano_usd, res.period,
                                                   res.period_end, res.where], tokens, cost_usd]):
            self.settles_dropped += 1

    def configure(self, config: m.Config) -> None:
        self.local.set_timezone(config.limits.timezone)

    def statistics(self) -> dict[str, Any]:
        return {"backend": "host", "calls": self.calls, "failures": self.failures,
                "settles_dropped": self.settles_dropped}

    async def unseeded(self, periods: list[Period]) -> list[Period]:
        return []      # the supervisor seeds its own counters (open_services, host_duties)

    async def seed(self, period: Period, spend: dict[str, int]) -> None:
        raise AssertionError("a worker's limiter is seeded by its supervisor")


def handlers(limiter: HostLimiter) -> dict[str, Callable[[Any], Any]]:
    """The supervisor's side: admit and settle on the host's counters, never awaiting."""

    def admit(args: list[Any]) -> list[Any]:
        key, rpm, tpm, budget, period, tokens, cost = args
        principal = Principal(key, None, rpm=rpm, tpm=tpm, budget_usd=budget, budget_period=period)
        try:
            res = limiter.local.admit(principal, Estimate(tokens, cost), limiter.clock())
        except RateLimited as exc:
            return ["refused", exc.message, exc.code, exc.retry_after]
        if res is None:
            return ["ok", None]
        return ["ok", [res.key, res.bucket, res.tokens, res.nano_usd, res.period, res.period_end, res.where]]

    def settle(args: list[Any]) -> None:
        res, tokens, cost = args
        limiter.local.settle(Reservation(*res), tokens, cost, limiter.clock())

    return {"admit": admit, "settle": settle}
