"""Client input built to break things, through the whole gateway (the echo backend behind it):
each gets a 4xx, no error-level log line, and changes nothing that other clients see."""

from __future__ import annotations

import json

import pytest
import trio

from tests.conftest import AUTH, gateway_config, start_gateway

CONFIG = gateway_config("""
    [[backends]]
    name = "e"
    kind = "echo"
    [[models]]
    name = "chat"
    backend = "e"
    [[models]]
    name = "org/model"
    backend = "e"
    [[models]]
    name = "emb"
    backend = "e"
    kind = "embedding"
""").replace("sha256 =", "admin = true\nsha256 =")
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


async def post_raw(gw, path: str, body: bytes):
    return await gw.client.post(path, content=body, headers={**AUTH, "Content-Type": "application/json"})


async def settled_log(gw, requests: int) -> list[dict]:
    """The log once `requests` access lines are in (they are written at the loop's next quiet moment)."""
    with trio.fail_after(5):
        while len(gw.log.requests()) < requests:
            await trio.sleep(0.01)
    return gw.log.lines()


async def test_bad_embeddings_inputs_are_400_and_never_open_the_breaker(nursery):
    gw = await start_gateway(nursery, CONFIG)
    bad = [[None], [1.5], ["a", 1], [[1, "x"]], [], {"a": 1}, None, [True]]
    for given in bad:
        r = await gw.post("/v1/embeddings", {"model": "emb", "input": given})
        assert r.status_code == 400, given
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = await gw.post("/v1/embeddings", {"model": "emb", "input": ["ok", [1, 2]]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    r = await gw.post("/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "text", "text": 5}, {"type": "text", "text": "fine"}]}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
    lines = await settled_log(gw, len(bad) + 2)
    assert [line for line in lines if line["level"] == "error"] == []


@pytest.mark.parametrize("body", [
    b"[" * 100000 + b"]" * 100000,
    b'{"model": "chat", "messages": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001,
    b'{"model": "chat", "messages": [], "temperature": NaN}',
    b'{"model": "chat", "messages": [], "top_p": Infinity}',
    b'{"model": "chat", "messages": [], "top_p": 1e400}',
    "\ufeff{\"model\": \"chat\"}".encode(),
    '{"model": "chat"}'.encode("utf-16"),
], ids=["nested-array", "nested-object", "nan", "infinity", "overflow", "bom", "utf-16"])
async def test_json_that_is_not_json_for_everyone_else_is_400(nursery, body):
    gw = await start_gateway(nursery, CONFIG)
    r = await post_raw(gw, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    lines = await settled_log(gw, 1)
    assert [line for line in lines if line["level"] == "error"] == []
    assert gw.log.requests()[0]["status"] == 400


async def test_absurd_max_tokens_is_served_and_leaves_routing_finite(nursery):
    gw = await start_gateway(nursery, CONFIG)
    for digits in (300, 400):
        body = json.dumps(CHAT)[:-1] + ', "max_tokens": 1' + "0" * digits + "}"
        r = await post_raw(gw, "/v1/chat/completions", body.encode())
        assert r.status_code == 200
    r = await gw.get("/admin/routing")
    json.loads(r.content, parse_constant=lambda name: pytest.fail(f"{name} in /admin/routing"))
    assert [line for line in await settled_log(gw, 3) if line["level"] == "error"] == []


async def test_stream_is_only_the_json_true(nursery):
    gw = await start_gateway(nursery, CONFIG)
    for value in ("true", 1):
        r = await gw.post("/v1/chat/completions", {**CHAT, "stream": value})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert r.json()["choices"][0]["message"]["content"] == "hi"


async def test_model_ids_are_percent_decoded_as_the_sdk_sends_them(nursery):
    gw = await start_gateway(nursery, CONFIG)
    assert (await gw.get("/v1/models/org%2Fmodel")).json()["id"] == "org/model"
    assert (await gw.get("/v1/models/c%68at")).json()["id"] == "chat"
    assert (await gw.get("/v1/models/org%2Fnone")).status_code == 404


async def test_admin_key_fields_are_checked(nursery, tmp_path):
    gw = await start_gateway(nursery, CONFIG.replace('url = ""', f'url = "sqlite:///{tmp_path}/hx.db"'))
    for doc in ({"name": "k", "models": [[1]]}, {"name": "k", "rpm": True}, {"name": "k\u0000"},
                {"name": "k" * 200}, {"name": "k", "budget_usd": 1e300}, {"name": "k", "expires_at": -1}):
        r = await gw.post("/admin/keys", doc)
        assert r.status_code == 400, doc
    r = await gw.client.get("/admin/usage?since=nan", headers=AUTH)
    assert r.status_code == 400
    assert [line for line in gw.log.lines() if line["level"] == "error"] == []


@pytest.mark.parametrize("name, value", [
    (b"x-note", b"a\x7fb"), (b"x-note", b"a\x01b"), (b"x-note", b"a\x1bb"), (b"authorization", b"Bearer \x7f"),
], ids=["del", "soh", "esc", "del-in-key"])
async def test_control_characters_in_a_header_value_are_400_and_never_forwarded(nursery, upstream, name, value):
    # h11 takes every byte but NUL, CR, LF and the other whitespace in a value; DEL and the C0
    # controls would go on to the upstream, whose parser may read the head otherwise
    gw = await start_gateway(nursery, gateway_config(f"""
        [[backends]]
        name = "u"
        url = "{upstream.url}"
        [[models]]
        name = "m"
        backend = "u"
    """))
    port = int(gw.url.rsplit(":", 1)[1])
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {b"authorization": AUTH["Authorization"].encode(), name: value}
    head = b"".join(n + b": " + v + b"\r\n" for n, v in headers.items())
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n%s\r\n%s" % (len(body), head, body))
    out = b""
    with trio.move_on_after(5):       # the answer then the close; a request let through is kept alive
        while chunk := await stream.receive_some(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 400"), out[:40]
    assert b"connection: close" in out.lower()
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "bad_http"
    assert upstream.requests == []
    r = await gw.post("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                      headers={"X-Note": "tab\tis fine"})
    assert r.status_code == 200 and len(upstream.requests) == 1
