"""Budgets through the running gateway: what one request may cost (n, best_of, items), and the
day's spend surviving a restart of the daemon and a loss of the Redis data."""

from __future__ import annotations

import pytest
import trio

from tests.conftest import gateway_config, start_gateway
from tests.fakeupstream import FakeUpstream, Reply

DAILY_DOLLAR = 'budget_usd = 1.0\nbudget_period = "day"\nsha256 ='


def priced(up: FakeUpstream) -> str:
    """One chat model at $1 per 1000 completion tokens, prompts free."""
    return f"""
        [[backends]]
        name = "u"
        url = "{up.url}"
        [[models]]
        name = "m"
        backend = "u"
        output_cost_per_1k = 1.0
    """


def answer(choices: int, completion_tokens: int) -> dict:
    """What an upstream answers to `n = choices`: every choice billed, the prompt once."""
    return {"id": "chatcmpl-n", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": i, "message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}
                        for i in range(choices)],
            "usage": {"prompt_tokens": 5, "completion_tokens": completion_tokens,
                      "total_tokens": 5 + completion_tokens}}


async def test_n_choices_are_reserved_so_concurrent_requests_cannot_overrun_a_daily_budget(nursery, upstream):
    # The report: a $1/day key, requests with n = 10 in flight together, $7.175 recorded. Here each
    # costs $0.41 (10 choices x 41 tokens); a reservation of one choice ($0.041) admits all seven.
    upstream.default = Reply(delay=0.5, body=answer(10, 410))
    gw = await start_gateway(nursery, gateway_config(priced(upstream)).replace("sha256 =", DAILY_DOLLAR))
    body = {"model": "m", "max_tokens": 41, "n": 10, "messages": [{"role": "user", "content": "hi"}]}
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await gw.post("/v1/chat/completions", body)).status_code)

    async with trio.open_nursery() as clients:
        for _ in range(7):
            clients.start_soon(one)
    assert sorted(statuses) == [200, 200] + [429] * 5
    assert (await gw.post("/v1/chat/completions", body)).status_code == 429   # $0.82 spent, $0.41 asked
    await gw.stop()
    costs = [line["cost_usd"] for line in gw.log.requests() if line["status"] == 200]
    assert costs == [pytest.approx(0.41)] * 2
