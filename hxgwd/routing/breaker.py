"""Passive health of one deployment: a three-state circuit breaker, and Retry-After cooling.

    closed --N consecutive failures, or error rate >= threshold over the window--> open
    open --cooldown elapsed--> half-open: one request at a time goes through, as the probe
    half-open --success--> closed
    half-open --failure--> open again, with the cooldown doubled (up to 8x)

The doubling is for slow recoveries: a deployment that keeps failing its probes is probed ever
more rarely, so it costs a few requests, not a steady stream of them; one success resets it.

Cooling is separate from the three states. An upstream that answers 429 or 503 with Retry-After
said when to come back, so the deployment is skipped until then (capped by
`routing.max_retry_after`), and that answer does not count as a failure: the deployment is busy,
not broken. A 429 without Retry-After counts as a failure like any other.

Active probes (`hxgwd.upstream.probe`) open the breaker when they fail. A good probe closes a
breaker that probes opened; one that real requests opened only goes to half-open, because a
backend whose /health answers can still fail inference: a real request has the last word.

The error-rate window is a ring of time buckets, so memory stays constant at any request rate.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import attrs

from hxgwd.config.model import Routing

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
BUCKETS = 10
MAX_BACKOFF = 8


@attrs.define
class Breaker:
    state: str = CLOSED
    consecutive: int = 0
    window: deque[list[float]] = attrs.field(factory=deque)   # [bucket start, requests, failures]
    reopen_at: float = 0.0
    backoff: int = 1
    probing: bool = False
    opened_by_probe: bool = False
    cool_until: float = 0.0
    opened: int = 0                  # times it opened, for the table
    # told of every change of state: (old, new, why); the router logs it (pipeline/route.py)
    on_change: Callable[[str, str, str], None] | None = attrs.field(default=None, eq=False, repr=False)

    # --- reading --------------------------------------------------------------------------------

    def current(self, now: float) -> str:
        """The state now: an open breaker whose cooldown is over turns half-open."""
        if self.state == OPEN and now >= self.reopen_at:
            self.state = HALF_OPEN
            self.probing = False
            self._moved(OPEN, "cooldown over")
        return self.state

    def admits(self, now: float) -> bool:
        """May a request be sent now? In half-open, only while no probe is out."""
        if now < self.cool_until:
            return False
        state = self.current(now)
        return state == CLOSED or (state == HALF_OPEN and not self.probing)

    def usable(self, now: float) -> bool:
        """Not known to be down: closed or half-open (even with its probe out), and not cooling."""
        return now >= self.cool_until and self.current(now) != OPEN

    def available_at(self, now: float) -> float:
        """When this deployment may take a request again (a guess for a half-open one in use)."""
        at = max(now, self.cool_until)
        state = self.current(now)
        if state == OPEN:
            at = max(at, self.reopen_at)
        elif state == HALF_OPEN and self.probing:
            at = max(at, now + 1.0)
        return at

    def error_rate(self, now: float, settings: Routing) -> tuple[float, int]:
        self._expire(now, settings)
        n = sum(b[1] for b in self.window)
        f = sum(b[2] for b in self.window)
        return (f / n if n else 0.0), int(n)

    # --- events ---------------------------------------------------------------------------------

    def on_start(self, now: float) -> None:
        if self.current(now) == HALF_OPEN:
            self.probing = True

    def on_cancel(self, now: float) -> None:
        """The client left: no verdict, but the probe slot is free again."""
        if self.state == HALF_OPEN:
            self.probing = False

    def on_success(self, now: float, settings: Routing) -> None:
        self._record(now, settings, failed=False)
        self.consecutive = 0
        if self.state != CLOSED:
            self._close("request succeeded")

    def on_failure(self, now: float, settings: Routing, retry_after: float | None = None) -> None:
        if retry_after is not None:
            self.cool_until = max(self.cool_until, now + min(retry_after, settings.max_retry_after))
            if self.state == HALF_OPEN:
                self.probing = False      # alive but busy: probe again once cooled
            return
        self._record(now, settings, failed=True)
        self.consecutive += 1
        state = self.current(now)
        if state == HALF_OPEN:
            self._open(now, settings, self.backoff * 2, "probe request failed")
        elif state == CLOSED and (why := self._tripped(now, settings)):
            self._open(now, settings, 1, why)

    def on_probe(self, ok: bool, now: float, settings: Routing) -> None:
        state = self.current(now)
        if not ok:
            if state == OPEN:
                self.reopen_at = max(self.reopen_at, now + settings.breaker_cooldown)
            else:
                self._open(now, settings, self.backoff if state == HALF_OPEN else 1, "health probe failed")
            self.opened_by_probe = True
        elif state != CLOSED:
            if self.opened_by_probe:
                self._close("health probe ok")
            elif state == OPEN:
                self.state, self.probing = HALF_OPEN, False
                self._moved(OPEN, "health probe ok")

    # --- inside ---------------------------------------------------------------------------------

    def _tripped(self, now: float, settings: Routing) -> str:
        """Why the breaker opens now, or "" (it does not)."""
        if self.consecutive >= max(1, settings.breaker_failures):
            return f"{self.consecutive} consecutive failures"
        rate, n = self.error_rate(now, settings)
        if n >= settings.breaker_min_requests and rate >= settings.breaker_error_rate:
            return f"error rate {rate:.2f} over {n} requests"
        return ""

    def _moved(self, old: str, why: str) -> None:
        if self.on_change is not None and old != self.state:
            self.on_change(old, self.state, why)

    def _open(self, now: float, settings: Routing, backoff: int, why: str) -> None:
        old = self.state
        self.backoff = min(max(1, backoff), MAX_BACKOFF)
        self.state = OPEN
        self.probing = False
        self.opened_by_probe = False
        self.reopen_at = now + settings.breaker_cooldown * self.backoff
        self.opened += 1
        self._moved(old, why)

    def _close(self, why: str) -> None:
        old = self.state
        self.state = CLOSED
        self.probing = False
        self.opened_by_probe = False
        self.backoff = 1
        self.consecutive = 0
        self.window.clear()
        self._moved(old, why)

    def _record(self, now: float, settings: Routing, failed: bool) -> None:
        self._expire(now, settings)
        width = max(settings.breaker_window / BUCKETS, 1e-3)
        if not self.window or now >= self.window[-1][0] + width:
            self.window.append([now, 0, 0])
        bucket = self.window[-1]
        bucket[1] += 1
        bucket[2] += failed

    def _expire(self, now: float, settings: Routing) -> None:
        horizon = now - settings.breaker_window
        while self.window and self.window[0][0] < horizon:
            self.window.popleft()
