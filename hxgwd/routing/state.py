"""Everything the router knows of one deployment, and how one finished attempt updates it.

The record is keyed by deployment id and outlives config snapshots: a reload that keeps a
deployment keeps what was learned about it.

Load is tracked as an integral over time of the deployment's upstream concurrency (in flight, at
most its cap), so a finished request can be told the average number of other requests it shared
the deployment with, not just the number at its end: under a burst, a 60 s request's end says
little about the load it actually ran under. `started()` and `finished()` carry no request id,
so a finish is paired with the start its duration points to (`Outcome.began` makes that exact);
pairing errors only blur the load and overdue figures, and are kept from leaving a stale start
behind, which would look overdue for ever.

Two models are fitted: the duration (what routing predicts: time to finish) and, for streams, the
time to the response head. The latter is kept apart because servers differ in when they send the
head of a stream (some at once, some with the first token), so it is shown, not mixed into the
duration fit.
"""

from __future__ import annotations

import bisect

import attrs

from hxgwd.config.model import Routing
from hxgwd.routing.breaker import Breaker
from hxgwd.routing.estimator import Ewma, LatencyModel, OutputLength, Rates

RATE_HALF_LIFE = 20.0      # seconds: how fast an error or 429 is forgotten by the scored strategy
KIB = 1024.0
OVERDUE_FACTOR = 2.0       # a request running longer than 2x its prediction + 5 s is overdue
OVERDUE_MARGIN = 5.0
OVERDUE_SCAN = 16


@attrs.define
class DeploymentState:
    backend: str = ""                 # its backend's name: active probes speak per backend
    cap: int = 0                      # max_concurrency, refreshed at each plan (reloads change it)
    queue_timeout: float = 0.0        # ... and queue_timeout
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    breaker: Breaker = attrs.field(factory=Breaker)
    latency: LatencyModel = attrs.field(factory=LatencyModel)          # duration: what routing uses
    first_byte: LatencyModel = attrs.field(factory=LatencyModel)       # streams' time to first byte
    rates: Rates = attrs.field(factory=Rates)
    duration: Ewma = attrs.field(factory=lambda: Ewma(alpha=0.2))        # successful requests
    fail_time: Ewma = attrs.field(factory=lambda: Ewma(alpha=0.2))       # how long a failure takes
    last_started: float | None = None
    load_area: float = 0.0            # integral of upstream concurrency over time
    load_at: float = 0.0
    starts: list[tuple[float, float, float]] = attrs.field(factory=list)  # (start, load_area, expected s)
    expect: float = 0.0               # the last plan's predicted duration here, for the next start

    def upstream_load(self) -> int:
        return min(self.in_flight, self.cap) if self.cap > 0 else self.in_flight

    def others(self) -> float:
        """Requests another one would share the upstream with if it started now."""
        return float(min(self.in_flight, self.cap - 1) if self.cap > 0 else self.in_flight)

    def _advance(self, now: float) -> None:
        if now > self.load_at:
            self.load_area += self.upstream_load() * (now - self.load_at)
            self.load_at = now

    def start(self, now: float) -> None:
        self._advance(now)
        self.in_flight += 1
        self.requests += 1
        self.last_started = now
        self.starts.append((now, self.load_area, self.expect))
        self.breaker.on_start(now)

    def _pair(self, now: float, duration: float, began: float | None, cancelled: bool) -> float | None:
        """Pop the start matching a finish; return the mean number of others it ran with.

        Starts are appended in time order and stay sorted, so each lookup is a bisection.
        """
        starts = self.starts
        if not starts:
            return None
        if began is not None:                          # the caller said: exact
            best = _closest(starts, began)
        elif cancelled and duration <= 0.0:            # the gate turned it away: at once, or after Q
            best = len(starts) - 1
            if now - starts[best][0] >= 1e-3:
                best = _closest(starts, now - self.queue_timeout)
        else:
            # A success's duration excludes its wait at the gate (at most Q), so its start lies in
            # [now - duration - Q, now - duration]; the gate is FIFO, so the oldest there is it.
            latest = now - duration + 1e-6
            earliest = latest - (self.queue_timeout if self.cap > 0 else 0.0) - 2e-6
            best = bisect.bisect_left(starts, earliest, key=_time)
            if best == len(starts) or starts[best][0] > latest:
                best = _closest(starts, latest)
        t0, area0, _ = self.starts.pop(best)
        span = now - t0
        if span <= 1e-6:
            return max(0.0, self.others())
        return max(0.0, (self.load_area - area0) / span - 1.0)

    def overdue(self, now: float) -> tuple[float, float]:
        """Requests in flight far past their predicted time (how many, the oldest one's age).

        A hang is only reported when its timeout fires, minutes later; meanwhile the requests
        piling up unanswered are the evidence. They count as failures-in-waiting in the score
        (censored observations), weighted like any verdict by how long ago they were sent, and
        as nothing once they finish and report for themselves.
        Only the oldest few are looked at: they are the ones that can be overdue.
        """
        count, oldest = 0.0, 0.0
        for t0, _, expected in self.starts[:OVERDUE_SCAN]:
            age = now - t0
            if age > OVERDUE_FACTOR * expected + OVERDUE_MARGIN:
                count += 0.5 ** (age / RATE_HALF_LIFE)     # evidence from when it was sent
                oldest = max(oldest, age)
        return count, oldest

    def finish(self, ok: bool, status: int, ttfb: float, duration: float, *, began: float | None,
               prompt_bytes: int | None,
               max_tokens: int, stream: bool, output_tokens: int | None, cancelled: bool,
               retry_after: float | None, lengths: OutputLength, now: float, settings: Routing) -> None:
        self._advance(now)
        load = self._pair(now, duration, began, cancelled)
        self.in_flight = max(0, self.in_flight - 1)
        if cancelled:
            self.breaker.on_cancel(now)
            return
        if not ok:
            self.failures += 1
            self.fail_time.add(duration)
            throttled = status == 429 or retry_after is not None
            self.rates.add(now, RATE_HALF_LIFE, error=not throttled, throttled=throttled, age=duration)
            self.breaker.on_failure(now, settings, retry_after)
            return
        self.rates.add(now, RATE_HALF_LIFE, age=duration)
        self.breaker.on_success(now, settings)
        if not 200 <= status < 300 or prompt_bytes is None:
            return                    # a caller's 4xx: quick, and says nothing about speed
        self.duration.add(duration)
        out: float                    # expected when not counted
        if output_tokens is not None:
            lengths.observe(max_tokens, output_tokens)
            out = output_tokens
        else:
            out = lengths.expect(max_tokens)
        kb = prompt_bytes / KIB
        c = load if load is not None else self.others()
        self.latency.update(kb, out / 1000.0, c, duration, now)
        if stream and 0.0 < ttfb <= duration:
            self.first_byte.update(kb, 0.0, c, ttfb, now)


def _time(start: tuple[float, float, float]) -> float:
    return start[0]


def _closest(starts: list[tuple[float, float, float]], t: float) -> int:
    i = bisect.bisect_left(starts, t, key=_time)
    if i == len(starts) or (i > 0 and t - starts[i - 1][0] <= starts[i][0] - t):
        return i - 1
    return i

