"""The failover decision as a table (pipeline/failover.py), without sockets."""

from __future__ import annotations

import pytest
import trio

from hxgwd.errors import BadRequest, Unavailable, UpstreamError, UpstreamTimeout
from hxgwd.pipeline.failover import Learn, Verdict, judge_failure, judge_status

MOVE_ON_FAILED = Verdict(move_on=True, learn=Learn.FAILED)
PASS_THROUGH = Verdict(move_on=True, learn=Learn.FAILED, pass_through=True)
ANSWER = Verdict(move_on=False, learn=Learn.SERVED)


@pytest.mark.parametrize("status, verdict", [
    (200, ANSWER), (201, ANSWER), (204, ANSWER), (301, ANSWER),
    (400, ANSWER), (404, ANSWER), (413, ANSWER), (422, ANSWER),      # the caller's fault: as is
    (401, MOVE_ON_FAILED), (403, MOVE_ON_FAILED),                     # the gateway's own key refused
    (408, PASS_THROUGH), (409, PASS_THROUGH), (429, PASS_THROUGH),
    (500, PASS_THROUGH), (502, PASS_THROUGH), (503, PASS_THROUGH), (504, PASS_THROUGH), (599, PASS_THROUGH),
])
def test_status_table(status, verdict):
    assert judge_status(status) == verdict


@pytest.mark.parametrize("exc, gateway_limit, verdict", [
    (UpstreamError("refused"), False, MOVE_ON_FAILED),
    (UpstreamTimeout("slow"), False, MOVE_ON_FAILED),
    (Unavailable("pool full"), True, Verdict(move_on=True, learn=Learn.NOTHING)),
    (BadRequest("caller"), False, Verdict(move_on=False, learn=Learn.NOTHING)),
    (trio.Cancelled._create(), False, Verdict(move_on=False, learn=Learn.NOTHING)),   # the client left
    (RuntimeError("our bug"), False, Verdict(move_on=False, learn=Learn.NOTHING)),
])
def test_failure_table(exc, gateway_limit, verdict):
    assert judge_failure(exc, gateway_limit=gateway_limit) == verdict
