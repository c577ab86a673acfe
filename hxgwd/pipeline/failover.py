"""When a request moves on to the next deployment, and what the attempt teaches routing.

Pure: an upstream's status, or what went wrong on the way to it, in; a `Verdict` out. proxy.py
acts on it; tests/test_failover.py checks it as a table, the way h11 tests its state machine.

Failover happens only before the first byte reaches the client. An answer of 5xx, 429, 408 or
409 moves on, and is passed through if it was the last attempt. So does a 401 or 403: the backend
refused the gateway's own key (a client's key never goes upstream), which is not the caller's doing
and becomes our 502 on the last attempt. Any other status is the answer, as is. A transport failure
(refused, reset, a timeout before the head, a broken answer) moves on and counts against the
deployment. Waiting too long for the gateway's own limits (a deployment's concurrency gate, a
pool's connection cap) moves on and teaches nothing: the deployment did nothing wrong. Anything
else (the client left, the caller's input, a bug of ours) ends the request and teaches nothing: a
client must not be able to open a deployment's breaker for everyone.
"""

from __future__ import annotations

import enum
import math

import attrs

from hxgwd.errors import GatewayError, UpstreamError
from hxgwd.http import Headers

RETRY_STATUSES = frozenset((408, 409, 429))
REFUSED_CREDENTIALS = frozenset((401, 403))


class Learn(enum.Enum):
    SERVED = "served"      # the deployment answered usably (a caller's 4xx included)
    FAILED = "failed"      # held against it: breaker, error rate, latency
    NOTHING = "nothing"    # says nothing about it


@attrs.frozen
class Verdict:
    move_on: bool          # try the next deployment of the plan (if any is left)
    learn: Learn
    pass_through: bool = False   # on the last attempt, the client gets this upstream answer as is


def judge_status(status: int) -> Verdict:
    """An upstream answered with `status` (before anything reached the client)."""
    if status in REFUSED_CREDENTIALS:
        return Verdict(move_on=True, learn=Learn.FAILED)
    if status >= 500 or status in RETRY_STATUSES:
        return Verdict(move_on=True, learn=Learn.FAILED, pass_through=True)
    return Verdict(move_on=False, learn=Learn.SERVED)


def judge_failure(exc: BaseException, *, gateway_limit: bool) -> Verdict:
    """An attempt ended in `exc` before anything reached the client. `gateway_limit`: it was the
    gateway's own wait (concurrency gate, pool cap) that gave up."""
    if gateway_limit:
        return Verdict(move_on=True, learn=Learn.NOTHING)
    if isinstance(exc, UpstreamError):      # UpstreamTimeout included
        return Verdict(move_on=True, learn=Learn.FAILED)
    return Verdict(move_on=False, learn=Learn.NOTHING)


class Retry(Exception):
    """This attempt failed in a way the next deployment may not; carries what to answer if last."""

    def __init__(self, error: GatewayError | None, answer: tuple[int, Headers, bytes] | None) -> None:
        self.error = error
        self.answer = answer

    def retry_after(self) -> float | None:
        """The wait a 429 or 503 asked for: cooling instead of a failure (routing/breaker.py).
        Only a real wait counts: 0, negative or NaN would let a failing deployment dodge its breaker."""
        if self.answer is None or self.answer[0] not in (429, 503):
            return None
        for name, value in self.answer[1]:
            if name == b"retry-after":
                try:
                    seconds = float(value)
                except ValueError:
                    return None     # an HTTP date: rare from model servers; the breaker still applies
                return seconds if 0 < seconds < math.inf else None
        return None

    def cause(self) -> str:
        if self.error is not None:
            return self.error.cause or self.error.code or "upstream error"
        return f"status {self.answer[0]}" if self.answer is not None else "upstream error"
