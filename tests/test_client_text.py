"""A client's strings (model name, group header, path) repeated to it in errors and to operators
in the access log are cut at a fixed length, with a marker that says so and how long they were."""

from __future__ import annotations

import json

import trio

from hxgwd.errors import MAX_ECHOED, capped
from tests.conftest import AUTH, gateway_config, start_gateway

HUGE = 1 << 20
CONFIG = gateway_config("""
    [[backends]]
    name = "e"
    kind = "echo"
    [[models]]
    name = "chat"
    backend = "e"
""", extra="").replace("[server]\n", "[server]\nmax_header_bytes = 4194304\n")


async def access_lines(gw, count: int) -> list[bytes]:
    """The raw access-log lines once `count` are in (they are written at the loop's next quiet moment)."""
    with trio.fail_after(5):
        while len(gw.log.requests()) < count:
            await trio.sleep(0.01)
    return [line for line in gw.log.getvalue().splitlines() if b'"msg":"request"' in line]


def test_capped_keeps_short_text_and_marks_a_cut():
    assert capped("gpt-4o") == "gpt-4o"
    assert capped("x" * MAX_ECHOED) == "x" * MAX_ECHOED
    assert capped("x" * HUGE) == "x" * MAX_ECHOED + f"…(cut, {HUGE} chars)"


async def test_a_huge_model_name_makes_a_short_404_and_a_short_log_line(nursery):
    gw = await start_gateway(nursery, CONFIG)
    name = "m" * HUGE
    answers = [await gw.post("/v1/chat/completions", {"model": name, "messages": []}),
               await gw.post("/v1/chat/completions", {"model": "chat", "messages": []},
                             headers={"X-HX-Model-Group": name})]
    for r in answers:
        assert r.status_code == 404 and len(r.content) < 1024, len(r.content)
        error = r.json()["error"]
        assert error["code"] == "model_not_found"
        assert error["message"] == f"The model '{'m' * MAX_ECHOED}…(cut, {HUGE} chars)' does not exist."
    for line in await access_lines(gw, 2):
        assert len(line) < 2048, len(line)
        assert json.loads(line)["model"] == capped(name)


async def test_a_huge_path_makes_a_short_log_line(nursery):
    gw = await start_gateway(nursery, CONFIG)
    path = "/v1/" + "p" * 60000       # httpx refuses URLs past 64 KiB
    r = await gw.client.get(path, headers=AUTH)
    assert r.status_code == 404
    (line,) = await access_lines(gw, 1)
    assert len(line) < 2048, len(line)
    assert json.loads(line)["endpoint"] == capped(path)
