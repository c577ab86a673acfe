"""Compressed request bodies (Content-Encoding): the bounded decoder sans I/O, and a running gateway
that decodes gzip and deflate, refuses the rest with 415, and zip bombs with 413."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib

import pytest
import trio

from hxgwd.errors import GatewayError
from hxgwd.offload import OFF_LOOP_BYTES, Offload
from hxgwd.pipeline.content_encoding import STEP, Decoder, coding, decoded
from tests.conftest import AUTH
from tests.test_gateway import CHAT, last_record, single

DOC = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"message {i}"} for i in range(20000)]}
                 ).encode()
BOMB = gzip.compress(b"\0" * 10_000_000, 9)      # 10 MB of zeros in about 10 kB


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def decode(body: bytes, coding: str, max_bytes: int, step: float = 1 << 20) -> bytes:
    d = Decoder(body, coding, max_bytes)
    while not d.advance(step):
        pass
    return d.result()


def refusal(fn, *args) -> GatewayError:
    with pytest.raises(GatewayError) as exc:
        fn(*args)
    return exc.value


# --- the header ----------------------------------------------------------------------------------

@pytest.mark.parametrize("lines, expected", [
    ([], None), ([b"identity"], None), ([b"gzip"], "gzip"), ([b"x-gzip"], "gzip"), ([b" GZip "], "gzip"),
    ([b"deflate"], "deflate"), ([b"identity, gzip"], "gzip"),
])
def test_the_codings_taken(lines, expected):
    assert coding([(b"content-encoding", v) for v in lines] + [(b"content-type", b"application/json")]) == expected


@pytest.mark.parametrize("lines", [[b"br"], [b"zstd"], [b"compress"], [b"gzip, gzip"], [b"deflate, gzip"],
                                   [b"gzip", b"br"], [b"gzip;q=1"]])
def test_other_and_stacked_codings_are_a_415_naming_what_is_taken(lines):
    err = refusal(coding, [(b"content-encoding", v) for v in lines])
    assert (err.status, err.code) == (415, "unsupported_content_encoding")
    assert (b"accept-encoding", b"gzip, deflate") in err.headers()
    assert "gzip, deflate" in err.message


# --- the decoder ---------------------------------------------------------------------------------

@pytest.mark.parametrize("body, name", [(gzip.compress(DOC), "gzip"), (zlib.compress(DOC), "deflate"),
                                        (raw_deflate(DOC), "deflate")])
@pytest.mark.parametrize("step", [1, 100_000, float("inf")])
def test_decoding_in_any_steps_gives_the_body(body, name, step):
    assert decode(body, name, len(DOC), step) == DOC


def test_a_gzip_body_of_several_members_is_all_of_them():
    assert decode(gzip.compress(b'{"a": ') + gzip.compress(b"1}"), "gzip", 100) == b'{"a": 1}'


def test_a_zip_bomb_is_a_413_without_ever_holding_more_than_the_limit():
    assert len(BOMB) < 12_000
    limit = 1 << 20
    tracemalloc.start()
    try:
        err = refusal(decode, BOMB, "gzip", limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (err.status, err.code) == (413, "request_too_large")
    assert f"larger than {limit} bytes once decoded" in err.message
    assert peak < limit + 2 * STEP + 100_000


def test_the_limit_is_on_the_decoded_size_exactly():
    body = gzip.compress(DOC)
    assert decode(body, "gzip", len(DOC)) == DOC
    assert refusal(decode, body, "gzip", len(DOC) - 1).status == 413


@pytest.mark.parametrize("body, name", [
    (gzip.compress(DOC)[:-9], "gzip"),                  # truncated
    (gzip.compress(DOC)[:500], "gzip"),
    (gzip.compress(DOC) + b"junk", "gzip"),             # not another member after the first
    (zlib.compress(DOC) + b"\0", "deflate"),
    (b"", "gzip"), (b"", "deflate"),
    (DOC, "gzip"),                                       # not compressed at all
    (gzip.compress(DOC)[:40] + b"\xff" * 40 + gzip.compress(DOC)[80:], "gzip"),
])
def test_a_body_that_is_not_what_its_coding_says_is_a_400(body, name):
    err = refusal(decode, body, name, 1 << 24)
    assert (err.status, err.code) == (400, "invalid_content_encoding")


# --- a running gateway ---------------------------------------------------------------------------

async def post(gw, body: bytes, encoding: str, path: str = "/v1/chat/completions"):
    return await gw.client.post(path, content=body, headers={
        **AUTH, "Content-Type": "application/json", "Content-Encoding": encoding})


async def test_gzip_and_deflate_bodies_reach_the_upstream_decoded(nursery):
    gw, up = await single(nursery)
    body = json.dumps({**CHAT, "model": "m"}).encode()
    for encoded, name in ((gzip.compress(body), "gzip"), (gzip.compress(body), "x-gzip"),
                          (zlib.compress(body), "deflate"), (raw_deflate(body), "deflate")):
        r = await post(gw, encoded, name)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "HX-OK"
        got = up.requests[-1]
        assert got.json["messages"] == CHAT["messages"] and "content-encoding" not in got.headers
    assert (await last_record(gw))["bytes_in"] == len(encoded)     # as it came over the wire


class CountingOffload(Offload):
    __slots__ = ("calls",)

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def run(self, size, fn, *args):
        self.calls += size >= OFF_LOOP_BYTES
        return await super().run(size, fn, *args)


async def test_only_a_body_that_decodes_past_a_megabyte_goes_on_in_a_thread():
    offload = CountingOffload()
    assert await decoded(gzip.compress(DOC), "gzip", 1 << 24, offload) == DOC      # 0.9 MB
    assert offload.calls == 0
    assert await decoded(gzip.compress(DOC * 3), "gzip", 1 << 24, offload) == DOC * 3
    assert offload.calls == 1
    with pytest.raises(GatewayError):
        await decoded(BOMB, "gzip", 4 << 20, offload)    # refused in the thread: it reaches the caller
    assert offload.calls == 2


async def test_a_large_gzip_body_is_served(nursery):
    gw, up = await single(nursery)
    doc = json.loads(DOC)
    doc["messages"] *= 8                                       # 7 MB decoded, 400 kB sent
    r = await post(gw, gzip.compress(json.dumps(doc).encode()), "gzip")
    assert r.status_code == 200
    assert len(up.requests[-1].json["messages"]) == 160000


async def test_a_zip_bomb_is_a_413_in_openais_shape(nursery):
    gw, up = await single(nursery, server_extra="max_body_bytes = 1048576")
    r = await post(gw, BOMB, "gzip")
    assert r.status_code == 413
    assert r.json() == {"error": {"message": "Request body is larger than 1048576 bytes once decoded "
                                  "(Content-Encoding: gzip).", "type": "invalid_request_error",
                                  "param": None, "code": "request_too_large"}}
    assert not up.requests
    assert (await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})).status_code == 200


async def test_a_broken_body_is_a_400(nursery):
    gw, up = await single(nursery)
    r = await post(gw, gzip.compress(json.dumps({**CHAT, "model": "m"}).encode())[:-4], "gzip")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_encoding"
    assert not up.requests


async def test_another_coding_is_a_415_before_the_body_is_read(nursery):
    gw, up = await single(nursery)
    r = await post(gw, b"\x1b\x00\x00", "br")
    assert r.status_code == 415 and r.headers["accept-encoding"] == "gzip, deflate"
    assert r.json()["error"]["code"] == "unsupported_content_encoding"
    # answered without waiting for a body that never comes
    stream = await trio.open_tcp_stream("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-hx-dev-1234\r\n"
                          b"Content-Encoding: zstd\r\nContent-Length: 100000\r\n\r\n")
    with trio.fail_after(5):
        answer = await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 415 ") and b"connection: close" in answer.lower()
    await stream.aclose()
