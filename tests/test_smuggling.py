"""Request smuggling and framing, proved on the wire (issue 15, point 3).

Each hostile byte string goes to a real gateway over a raw loopback socket; behind the gateway a
raw upstream records every byte it receives. For every case the test checks what the client got
(the final statuses in order, and that an answer which ends the connection is the last one) and
what the upstream got, read by the test's own strict parser (tests/smuggling.py): 0 or 1 request as
the table says, never a second one hidden in the first's body, never anything after the last
request, and a body that is the JSON the gateway parsed. Where several answers are right (a parser
may refuse an ambiguous message or read it the one safe way and close), the table lists each, and
the safe properties are asserted for all.

The same for the upstream's side: a raw upstream answers with stray bytes after its answer (at
once or a moment later), bad chunk framing, a head over the pool's limit, a body longer than its
Content-Length, two answers, Content-Length with chunked, a 1xx first; the client must get that
answer or a 502, the next request through the gateway a clean answer of its own, and the upstream
each request once.

Both `[server] http_parser` values run every case.
"""

from __future__ import annotations

import json

import attrs
import pytest
import trio

from tests.conftest import HTTP_PARSER, DEV_KEY, gateway_config, start_gateway
from tests.smuggling import ANY_REQUEST_LINE, CapturingUpstream, Scripted, answer_bytes, chat_answer, \
    exchange, frame_requests, parse_responses

PARSERS = ["h11", "httptools"]
MAX_BODY = 65536
KEY = b"Authorization: Bearer " + DEV_KEY.encode() + b"\r\n"


def chat_body(content: str) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()


BODY = chat_body("hi")
SMUGGLED_BODY = chat_body("SMUGGLED")
# the request a smuggler hides in the first one's body: if the upstream ever sees SMUGGLED, it got through
HIDDEN = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n" + KEY + b"Content-Type: application/json\r\n"
          b"Content-Length: %d\r\n\r\n%s" % (len(SMUGGLED_BODY), SMUGGLED_BODY))
# a pipelined second request the gateway answers itself: makes a connection that stays in step visible
# (it says Connection: close, so that the gateway ends the exchange after it, not keepalive_timeout later)
MODELS = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n" + KEY + b"Connection: close\r\n\r\n"


def post(headers: bytes, body: bytes, *, line: bytes = b"POST /v1/chat/completions HTTP/1.1",
         host: bytes = b"Host: gw\r\n") -> bytes:
    return line + b"\r\n" + host + KEY + b"Content-Type: application/json\r\n" + headers + b"\r\n" + body


def cl(n: int | bytes) -> bytes:
    return b"Content-Length: %s\r\n" % (str(n).encode() if isinstance(n, int) else n)


TE = b"Transfer-Encoding: chunked\r\n"


def chunked(body: bytes, *, size_fmt: bytes = b"%x", ext: bytes = b"", end: bytes = b"0\r\n\r\n") -> bytes:
    """`body` in two chunks, then `end` (the last chunk and the trailers)."""
    half = len(body) // 2
    return b"".join((size_fmt % len(part)) + ext + b"\r\n" + part + b"\r\n"
                    for part in (body[:half], body[half:])) + end


@attrs.frozen
class Case:
    name: str
    data: bytes
    answers: set[tuple[int, ...]]     # each acceptable sequence of final statuses (1xx left out)
    upstream: set[int]                # acceptable numbers of requests the upstream receives
    interim: tuple[int, ...] = ()     # 1xx answers that must come (100 Continue)


REFUSED = {(400,)}
EITHER = {(200, 200), (400,)}            # read the one safe way and stay in step, or refuse


CASES = [
    # baselines: the same bytes, well formed
    Case("valid_content_length", post(cl(len(BODY)), BODY) + MODELS, {(200, 200)}, {1}),
    Case("valid_chunked", post(TE, chunked(BODY)) + MODELS, {(200, 200)}, {1}),
    Case("two_pipelined_posts", post(cl(len(BODY)), BODY) * 2, {(200, 200)}, {2}),
    # Content-Length and Transfer-Encoding together (RFC 9112 6.3: refuse, or frame by TE and close)
    Case("cl_and_te", post(cl(len(chunked(BODY) + HIDDEN)) + TE, chunked(BODY) + HIDDEN), {(200,), (400,)}, {0, 1}),
    Case("te_and_cl", post(TE + cl(len(chunked(BODY) + HIDDEN)), chunked(BODY) + HIDDEN), {(200,), (400,)}, {0, 1}),
    Case("cl_and_te_body_framed_by_cl", post(cl(len(BODY)) + TE, BODY + HIDDEN), REFUSED, {0}),
    Case("cl_and_te_short_cl", post(cl(4) + TE, chunked(BODY) + HIDDEN), {(200,), (400,)}, {0, 1}),
    # Transfer-Encoding values
    Case("te_chunked_identity", post(b"Transfer-Encoding: chunked, identity\r\n", chunked(BODY)),
         {(400,), (501,)}, {0}),
    Case("te_identity_chunked", post(b"Transfer-Encoding: identity, chunked\r\n", chunked(BODY) + MODELS),
         {(400,), (501,), (200, 200)}, {0, 1}),
    Case("te_chunked_not_last", post(b"Transfer-Encoding: chunked, gzip\r\n" + cl(len(chunked(BODY))), chunked(BODY)),
         REFUSED, {0}),
    Case("te_xchunked_with_cl", post(b"Transfer-Encoding: xchunked\r\n" + cl(len(BODY)), BODY), {(400,), (501,)}, {0}),
    Case("te_xchunked_alone", post(b"Transfer-Encoding: xchunked\r\n", chunked(BODY)), {(400,), (501,)}, {0}),
    Case("te_value_extra_space", post(b"Transfer-Encoding:  chunked\r\n", chunked(BODY)) + MODELS, {(200, 200)}, {1}),
    Case("te_value_tab", post(b"Transfer-Encoding:\tchunked\r\n", chunked(BODY)) + MODELS, {(200, 200)}, {1}),
    Case("te_trailing_whitespace", post(b"Transfer-Encoding: chunked \t\r\n", chunked(BODY)) + MODELS, EITHER, {0, 1}),
    Case("te_line_folded_under_another", post(cl(len(BODY)) + b"X-Note: a\r\n Transfer-Encoding: chunked\r\n", BODY)
         + MODELS, EITHER, {0, 1}),
    Case("te_space_before_colon", post(b"Transfer-Encoding : chunked\r\n" + cl(len(BODY)), BODY), REFUSED, {0}),
    Case("te_chunked_twice_lines", post(TE + TE, chunked(BODY)) + MODELS, {(200, 200), (400,), (501,)}, {0, 1}),
    Case("te_chunked_comma_chunked", post(b"Transfer-Encoding: chunked, chunked\r\n", chunked(BODY)) + MODELS,
         {(200, 200), (400,), (501,)}, {0, 1}),
    Case("te_uppercase_value", post(b"Transfer-Encoding: CHUNKED\r\n", chunked(BODY)) + MODELS, EITHER, {0, 1}),
    # Content-Length values
    Case("cl_duplicate_same", post(cl(len(BODY)) * 2, BODY) + MODELS, EITHER, {0, 1}),
    Case("cl_duplicate_different", post(cl(len(BODY)) + cl(len(BODY + HIDDEN)), BODY + HIDDEN), REFUSED, {0}),
    Case("cl_comma_same", post(cl(b"%d, %d" % (len(BODY), len(BODY))), BODY) + MODELS, EITHER, {0, 1}),
    Case("cl_comma_different", post(cl(b"%d, %d" % (len(BODY), len(BODY + HIDDEN))), BODY + HIDDEN), REFUSED, {0}),
    Case("cl_plus_sign", post(cl(b"+%d" % len(BODY)), BODY), REFUSED, {0}),
    Case("cl_minus_sign", post(cl(b"-%d" % len(BODY)), BODY), REFUSED, {0}),
    Case("cl_space_inside", post(cl(b"%d %d" % divmod(len(BODY), 10)), BODY), REFUSED, {0}),
    Case("cl_hex", post(cl(b"0x%x" % len(BODY)), BODY), REFUSED, {0}),
    Case("cl_leading_zeros", post(cl(b"000%d" % len(BODY)), BODY) + MODELS, {(200, 200)}, {1}),
    Case("cl_huge", post(cl(b"9" * 30), BODY), {(400,), (413,)}, {0}),
    Case("cl_over_2_64", post(cl(str(2 ** 64 + len(BODY)).encode()), BODY), {(400,), (413,)}, {0}),
    Case("cl_over_max_body", post(cl(MAX_BODY + 1), BODY), {(413,)}, {0}),
    Case("cl_shorter_than_body", post(cl(len(BODY)), BODY + b"GARBAGE\r\n\r\n"), {(200, 400)}, {1}),
    Case("cl_longer_than_body", post(cl(len(BODY) + 10), BODY), {(408,)}, {0}),
    Case("cl_folded_value", post(cl(len(BODY) // 10) + b" %d\r\n" % (len(BODY) % 10), BODY), REFUSED, {0}),
    # chunk framing
    Case("chunk_size_0x", post(TE, chunked(BODY, size_fmt=b"0x%x")), REFUSED, {0}),
    Case("chunk_size_signed", post(TE, chunked(BODY, size_fmt=b"-%x")), REFUSED, {0}),
    Case("chunk_size_leading_space", post(TE, chunked(BODY, size_fmt=b" %x")) + MODELS, EITHER, {0, 1}),
    Case("chunk_size_over_2_64", post(TE, b"1" + b"0" * 16 + b"\r\n" + BODY), {(400,), (408,), (413,)}, {0}),
    Case("chunk_size_20_hex_digits", post(TE, b"f" * 20 + b"\r\n" + BODY), {(400,), (408,), (413,)}, {0}),
    Case("chunk_size_wraps_to_small", post(TE, b"1" + b"0" * 14 + b"%02x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n"),
         {(400,), (408,), (413,)}, {0}),
    Case("chunk_extension", post(TE, chunked(BODY, ext=b";name=value")) + MODELS, {(200, 200)}, {1}),
    Case("chunk_extension_quoted", post(TE, chunked(BODY, ext=b';name="v a"')) + MODELS, EITHER, {0, 1}),
    Case("chunk_data_longer_than_size", post(TE, b"5\r\n" + BODY + b"\r\n0\r\n\r\n"), REFUSED, {0}),
    Case("chunk_missing_final_then_request", post(TE, chunked(BODY, end=b"")) + MODELS, REFUSED, {0}),
    Case("chunk_missing_final_then_wait", post(TE, chunked(BODY, end=b"")), {(408,)}, {0}),
    Case("chunk_trailers", post(TE, chunked(BODY, end=b"0\r\nX-Trailer: a\r\n\r\n")) + MODELS, REFUSED, {0}),
    Case("chunk_trailer_content_length", post(TE, chunked(BODY, end=b"0\r\nContent-Length: 999\r\n\r\n")) + MODELS,
         REFUSED, {0}),
    Case("chunk_bare_lf", post(TE, chunked(BODY).replace(b"\r\n", b"\n")) + MODELS, EITHER, {0, 1}),
    # line endings and header syntax
    Case("bare_lf_head", post(cl(len(BODY)), BODY).replace(b"\r\n", b"\n") + MODELS, EITHER, {0, 1}),
    Case("bare_lf_hides_te", post(b"X-Note: a\nTransfer-Encoding: chunked\r\n" + cl(len(chunked(BODY) + HIDDEN)),
                                  chunked(BODY) + HIDDEN), {(200,), (400,)}, {0, 1}),
    Case("bare_cr_in_value", post(b"X-Note: a\rb\r\n" + cl(len(BODY)), BODY), REFUSED, {0}),
    Case("bare_cr_ends_header", post(b"X-Note: a\rTransfer-Encoding: chunked\r\n" + cl(len(BODY)), BODY),
         REFUSED, {0}),
    Case("nul_in_value", post(b"X-Note: a\x00b\r\n" + cl(len(BODY)), BODY), REFUSED, {0}),
    Case("del_in_value", post(b"X-Note: a\x7fb\r\n" + cl(len(BODY)), BODY), REFUSED, {0}),
    Case("nul_in_name", post(b"X-No\x00te: a\r\n" + cl(len(BODY)), BODY), REFUSED, {0}),
    Case("cr_in_name", post(b"X-No\rte: a\r\n" + cl(len(BODY)), BODY), REFUSED, {0}),
    Case("lf_in_name", post(b"X-No\nte: a\r\n" + cl(len(BODY)), BODY), REFUSED, {0}),
    Case("del_in_name", post(b"X-No\x7fte: a\r\n" + cl(len(BODY)), BODY), REFUSED, {0}),
    Case("space_in_name", post(b"X Note: a\r\n" + cl(len(BODY)), BODY), REFUSED, {0}),
    Case("space_before_colon_cl", post(b"Content-Length : %d\r\n" % len(BODY), BODY), REFUSED, {0}),
    Case("tab_before_colon_cl", post(b"Content-Length\t: %d\r\n" % len(BODY), BODY), REFUSED, {0}),
    Case("header_without_colon", post(b"X-Note\r\n" + cl(len(BODY)), BODY), REFUSED, {0}),
    Case("header_empty_name", post(b": a\r\n" + cl(len(BODY)), BODY), REFUSED, {0}),
    Case("obs_fold", post(b"X-Note: a\r\n b\r\n" + cl(len(BODY)), BODY) + MODELS, EITHER, {0, 1}),
    Case("crlfcrlf_in_quoted_value", b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n" + KEY + b'X-Note: "a\r\n\r\n'
         + post(b"Connection: close\r\n" + cl(len(BODY)), BODY) + b'"\r\n\r\n', {(200, 200)}, {1}),
    Case("head_starts_with_crlf", b"\r\n" + post(cl(len(BODY)), BODY) + MODELS, EITHER, {0, 1}),
    # request line
    # RFC 9112 3: refuse, or (llhttp) read past the extra space; the gateway writes its own request line
    Case("request_line_two_spaces", post(cl(len(BODY)), BODY, line=b"POST  /v1/chat/completions HTTP/1.1"),
         {(400,), (200,)}, {0, 1}),
    Case("request_line_tab", post(cl(len(BODY)), BODY, line=b"POST\t/v1/chat/completions HTTP/1.1"), REFUSED, {0}),
    Case("request_line_trailing_space", post(cl(len(BODY)), BODY, line=b"POST /v1/chat/completions HTTP/1.1 "),
         REFUSED, {0}),
    Case("lowercase_method", post(cl(len(BODY)), BODY, line=b"post /v1/chat/completions HTTP/1.1") + MODELS,
         {(400,), (405, 200), (501,)}, {0}),
    Case("nul_in_target", post(cl(len(BODY)), BODY, line=b"POST /v1/chat/completions\x00x HTTP/1.1"), REFUSED, {0}),
    Case("http10_without_keep_alive", post(cl(len(BODY)), BODY, line=b"POST /v1/chat/completions HTTP/1.0")
         + MODELS, {(200,)}, {1}),
    Case("http10_keep_alive", post(b"Connection: keep-alive\r\n" + cl(len(BODY)), BODY,
                                   line=b"POST /v1/chat/completions HTTP/1.0") + MODELS, {(200,), (200, 200)}, {1}),
    Case("http10_chunked", post(TE, chunked(BODY), line=b"POST /v1/chat/completions HTTP/1.0") + MODELS,
         {(200,), (400,)}, {0, 1}),
    Case("http20_version", post(cl(len(BODY)), BODY, line=b"POST /v1/chat/completions HTTP/2.0"),
         {(400,), (505,)}, {0}),
    Case("http2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {(400,), (505,)}, {0}),
    Case("absolute_form", post(cl(len(BODY)), BODY, line=b"POST http://evil/v1/chat/completions HTTP/1.1")
         + MODELS, {(200, 200)}, {1}),
    Case("absolute_form_with_port", post(cl(len(BODY)), BODY,
                                         line=b"POST https://evil:8443/v1/chat/completions HTTP/1.1") + MODELS,
         {(200, 200)}, {1}),
    Case("asterisk_options", b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n" + KEY + b"\r\n" + MODELS,
         {(400,), (404, 200), (405, 200), (501,)}, {0}),
    Case("asterisk_post", post(cl(len(BODY)), BODY, line=b"POST * HTTP/1.1") + MODELS,
         {(400,), (404, 200), (405, 200)}, {0}),
    # RFC 9112 3.2: a MUST (llhttp itself takes both; the server side has to check)
    Case("missing_host", post(cl(len(BODY)), BODY, host=b""), REFUSED, {0}),
    Case("duplicate_host", post(cl(len(BODY)), BODY, host=b"Host: gw\r\nHost: evil\r\n"), REFUSED, {0}),
    # answered before the body is read (no key): the body is dropped whole, or the connection ends
    Case("no_key_then_pipelined", post(cl(len(BODY)), BODY).replace(KEY, b"") + MODELS, {(401, 200)}, {0}),
    Case("no_key_cl_and_te", post(cl(len(chunked(BODY) + HIDDEN)) + TE, chunked(BODY) + HIDDEN).replace(KEY, b""),
         {(401,), (400,)}, {0}),
    # sizes
    Case("chunked_over_max_body", post(TE, (b"%x\r\n" % 8192 + b" " * 8192 + b"\r\n") * 9 + b"0\r\n\r\n"),
         {(413,)}, {0}),
    # refused while the head still arrives: the close may reset the answer away, so none is right too
    Case("many_headers_over_limit", post(b"X-A: b\r\n" * 5000 + cl(len(BODY)), BODY), {(431,), (400,), ()}, {0}),
    Case("many_headers_under_limit", post(b"X-A: b\r\n" * 1000 + cl(len(BODY)), BODY) + MODELS, {(200, 200)}, {1}),
    # Expect: 100-continue
    Case("expect_100_body_whole", post(b"Expect: 100-continue\r\n" + cl(len(BODY)), BODY) + MODELS, {(200, 200)}, {1}),
    Case("expect_100_body_shorter", post(b"Expect: 100-continue\r\n" + cl(len(BODY) + 10), BODY), {(408,)}, {0}),
    Case("expect_100_body_longer", post(b"Expect: 100-continue\r\n" + cl(len(BODY)), BODY + b"GARBAGE\r\n\r\n"),
         {(200, 400)}, {1}),
    Case("expect_100_head_only", post(b"Expect: 100-continue\r\n" + cl(len(BODY)), b""), {(408,)}, {0}, interim=(100,)),
]

# Cases the gateway gets wrong today, by name, with the reason; their xfail is strict, so the day
# one is fixed it fails and comes off this list. None on the request side today.
KNOWN_BUGS: dict[str, str] = {}


def config(parser: str, upstream_url: str) -> str:
    server = (f'\nmax_body_bytes = {MAX_BODY}\nheader_timeout = 1\nbody_timeout = 0.5'
              f'\nkeepalive_timeout = 0.2')
    return gateway_config(f"""
        [[backends]]
        name = "u"
        url = "{upstream_url}"
        [[models]]
        name = "m"
        backend = "u"
    """).replace('listen = ["127.0.0.1:0"]', 'listen = ["127.0.0.1:0"]' + server).replace(
        f'http_parser = "{HTTP_PARSER}"', f'http_parser = "{parser}"')   # each case runs with both


async def start_pair(nursery: trio.Nursery, parser: str) -> tuple[CapturingUpstream, int, object]:
    upstream = CapturingUpstream()
    await nursery.start(upstream.serve)
    gw = await start_gateway(nursery, config(parser, upstream.url))
    return upstream, int(gw.url.rsplit(":", 1)[1]), gw


def error_code(message) -> str | None:
    try:
        return message.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def check_client(out: bytes, closed: bool, server_errors: tuple[int, ...] = (501, 505)) -> tuple[list, tuple[int, ...], tuple[int, ...]]:
    """The client's answers, checked for what holds in every case; returns (responses, finals, interim)."""
    assert closed, f"the gateway did not close the connection within the bound: {out[-300:]!r}"
    responses, rest = parse_responses(out)
    assert rest == b"", f"bytes the client cannot read as a response: {rest[:300]!r}"
    interim = tuple(r.status for r in responses if r.status < 200)
    finals = [r for r in responses if r.status >= 200]
    assert all(r.status < 200 for r in responses[:len(interim)]), "a 1xx after a final answer"
    for i, r in enumerate(finals):
        ends = (r.header(b"connection") or b"").lower() == b"close"
        if ends:
            assert i == len(finals) - 1, "an answer after one that said Connection: close"
        # a framing refusal or timeout leaves the connection out of step: it must end there
        if r.status in (408, 413, 431, 505) or (r.status == 400 and error_code(r) == "bad_http"):
            assert ends, f"{r.status} without Connection: close"
        assert r.status < 500 or r.status in server_errors, f"server error {r.status}: {r.body[:300]!r}"
    return responses, tuple(r.status for r in finals), interim


def check_upstream(upstream: CapturingUpstream, counts: set[int]) -> list:
    """What the upstream received, read strictly: returns the requests."""
    assert upstream.malformed == [], upstream.malformed
    requests = []
    for conn in upstream.connections:
        got, rest = frame_requests(bytes(conn))
        assert rest == b"", f"bytes after the last whole request on an upstream connection: {rest[:300]!r}"
        requests += got
    received = upstream.received
    assert len(requests) in counts, f"{len(requests)} upstream requests, expected {counts}: {received[:600]!r}"
    # a request line anywhere, bodies included, is a request: no more of them than framed requests
    assert len(ANY_REQUEST_LINE.findall(received)) == len(requests), received[:600]
    assert b"SMUGGLED" not in received
    assert b"evil" not in received.lower()
    for request in requests:
        assert request.start == b"POST /v1/chat/completions HTTP/1.1"
        assert request.header(b"content-type") == b"application/json"
        doc = request.json()        # the gateway re-serialises the body it parsed: valid JSON, always
        assert doc["messages"] == [{"role": "user", "content": "hi"}], doc
        assert b"x-trailer" not in request.headers and request.header(b"transfer-encoding") is None
    return requests


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[
    c.name])] if c.name in KNOWN_BUGS else []) for c in CASES])
async def test_hostile_request_is_answered_safely_and_reaches_the_upstream_at_most_once(nursery, parser, case):
    upstream, port, gw = await start_pair(nursery, parser)
    out, closed = await exchange(port, case.data)
    _, finals, interim = check_client(out, closed)
    assert finals in case.answers, f"answers {finals}, expected one of {case.answers}: {out[:600]!r}"
    assert set(case.interim) <= set(interim), f"1xx {interim}, expected {case.interim}"
    requests = check_upstream(upstream, case.upstream)
    assert len(requests) <= finals.count(200), "the upstream got a request no client answer accounts for"
    assert [line for line in gw.log.lines() if line["level"] == "error"] == []
    print(f"{case.name} [{parser}]: answers {finals}, upstream requests {len(requests)}")


def test_case_names_are_unique():
    assert len({c.name for c in CASES}) == len(CASES)


# --- hostile upstream answers ----------------------------------------------------------------------

def chunked_answer(body: bytes, *, size_fmt: bytes = b"%x", end: bytes = b"0\r\n\r\n", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra + b"Transfer-Encoding: chunked\r\n\r\n"
            + chunked(body, size_fmt=size_fmt, end=end))


FIRST = chat_answer("first")
# what must never reach a client as an answer: bytes the upstream sent after, or beside, its answer
STRAY = answer_bytes(chat_answer("STRAY"))
SECOND = answer_bytes(chat_answer("SECOND"))
OK_OR_502 = {200, 502}


def sse_answer(content: str) -> bytes:
    events = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
              for delta, finish in (({"role": "assistant", "content": content}, None), ({}, "stop"))]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked(body))


@attrs.frozen
class Answer:
    name: str
    script: Scripted
    first: set[int]                   # acceptable statuses for the request that got this answer
    stream: bool = False              # the client asks for a stream, and gets server-sent events


ANSWERS = [
    Answer("valid", Scripted(answer_bytes(FIRST)), {200}),
    Answer("stray_response_after", Scripted(answer_bytes(FIRST) + STRAY), OK_OR_502),
    Answer("stray_response_later", Scripted(answer_bytes(FIRST), later=STRAY, later_delay=0.05), {200}),
    Answer("stray_garbage_after", Scripted(answer_bytes(FIRST) + b"garbage\r\n"), OK_OR_502),
    Answer("two_responses", Scripted(answer_bytes(FIRST) + SECOND), OK_OR_502),
    Answer("body_longer_than_content_length", Scripted(answer_bytes(FIRST) + b"STRAY STRAY"), OK_OR_502),
    Answer("body_shorter_than_content_length", Scripted(answer_bytes(FIRST)[:-10], then="close"), {502}),
    Answer("content_length_duplicate_different",
           Scripted(answer_bytes(FIRST, extra=b"Content-Length: %d\r\n" % (len(FIRST) + 10))), {502}),
    Answer("content_length_negative", Scripted(answer_bytes(FIRST).replace(b"Content-Length: ", b"Content-Length: -"),
                                               then="close"), {502}),
    Answer("chunk_size_not_hex", Scripted(chunked_answer(FIRST, size_fmt=b"zz%x")), {502}),
    Answer("chunk_size_0x", Scripted(chunked_answer(FIRST, size_fmt=b"0x%x")), {502}),
    Answer("chunk_data_longer_than_size", Scripted(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n"
                                                   + FIRST + b"\r\n0\r\n\r\n"), {502}),
    Answer("chunk_missing_final_then_close", Scripted(chunked_answer(FIRST, end=b""), then="close"), {502}),
    Answer("chunked_then_stray", Scripted(chunked_answer(FIRST) + STRAY), OK_OR_502),
    # the pool reads heads of up to 64 KiB (pool.py: h11's max_incomplete_event_size=65536)
    Answer("header_far_over_pool_limit", Scripted(answer_bytes(FIRST, extra=b"X-Big: " + b"a" * 200_000 + b"\r\n")),
           {502}),
    Answer("header_over_pool_limit_in_two_reads", Scripted(answer_bytes(FIRST, extra=b"X-Big: " + b"a" * 70_000
                                                                        + b"\r\n"), split=60_000), {502}),
    Answer("header_nul_in_value", Scripted(answer_bytes(FIRST, extra=b"X-Note: a\x00b\r\n")), {502}),
    Answer("header_without_colon", Scripted(answer_bytes(FIRST, extra=b"X-Note\r\n")), {502}),
    Answer("header_obs_fold", Scripted(answer_bytes(FIRST, extra=b"X-Note: a\r\n b\r\n")), OK_OR_502),
    Answer("bare_lf_head", Scripted(answer_bytes(FIRST).replace(b"\r\n", b"\n")), OK_OR_502),
    Answer("status_four_digits", Scripted(answer_bytes(FIRST).replace(b"200 OK", b"2000 OK")), {502}),
    Answer("content_length_and_chunked", Scripted(chunked_answer(FIRST, extra=b"Content-Length: 5\r\n")), OK_OR_502),
    # framed by Content-Length, the rest is the body (not JSON); framed by chunks, a second answer is left over
    Answer("content_length_and_chunked_then_second",
           Scripted(chunked_answer(FIRST, extra=b"Content-Length: %d\r\n" % (len(chunked(FIRST)) + len(SECOND)))
                    + SECOND), OK_OR_502),
    Answer("continue_then_answer", Scripted(b"HTTP/1.1 100 Continue\r\n\r\n" + answer_bytes(FIRST)), {200}),
    Answer("early_hints_then_answer", Scripted(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
                                               + answer_bytes(FIRST)), {200}),
    Answer("stream_then_stray", Scripted(sse_answer("first") + STRAY), {200}, stream=True),
    Answer("stream_then_stray_later", Scripted(sse_answer("first"), later=STRAY, later_delay=0.05), {200}, stream=True),
    Answer("delimited_by_close", Scripted(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + FIRST,
                                          then="close"), OK_OR_502),
]

UPSTREAM_KNOWN_BUGS: dict[str, str] = {}   # header_over_pool_limit_in_two_reads: fixed by hxgwd.http.client


def client_post(content: str, stream: bool = False) -> bytes:
    # Connection: close, so that the gateway ends the exchange at once rather than at keepalive_timeout
    body = chat_body(content)
    if stream:
        body = body[:-1] + b', "stream": true}'
    return post(b"Connection: close\r\n" + cl(len(body)), body)


def one_answer(out: bytes, closed: bool):
    responses, finals, _ = check_client(out, closed, server_errors=(502,))
    assert len(finals) == 1, f"{len(finals)} answers to one request: {out[:600]!r}"
    assert b"STRAY" not in out and b"SECOND" not in out, out[:600]
    return [r for r in responses if r.status >= 200][0]


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("answer", [pytest.param(a, id=a.name, marks=[pytest.mark.xfail(
    strict=True, reason=UPSTREAM_KNOWN_BUGS[a.name])] if a.name in UPSTREAM_KNOWN_BUGS else []) for a in ANSWERS])
async def test_hostile_upstream_answer_never_reaches_the_next_request(nursery, parser, answer):
    upstream, port, gw = await start_pair(nursery, parser)
    upstream.script.append(answer.script)
    first = one_answer(*await exchange(port, client_post("first", answer.stream)))
    assert first.status in answer.first, f"{first.status}: {first.body[:300]!r}"
    if first.status == 200 and answer.stream:
        assert b'"content": "first"' in first.body and first.body.endswith(b"data: [DONE]\n\n"), first.body
    elif first.status == 200:
        assert first.json()["choices"][0]["message"]["content"] == "first"
    # whatever the upstream sent after its answer has arrived by now (`later_delay`): a connection
    # holding it must not be the next request's
    await trio.sleep(answer.script.later_delay * 3)
    second = one_answer(*await exchange(port, client_post("second")))
    assert second.status == 200, f"{second.status}: {second.body[:300]!r}"
    assert second.json()["choices"][0]["message"]["content"] == "echo: second"
    sent = [json.loads(m.body)["messages"][0]["content"] for c in upstream.connections for m in frame_requests(bytes(c))[0]]
    # a broken answer is not a reason to send a paid request again
    assert sorted(sent) == ["first", "second"], sent
    assert upstream.malformed == []
    assert [line for line in gw.log.lines() if line["level"] == "error"] == []
    print(f"{answer.name} [{parser}]: first {first.status}, upstream connections {len(upstream.connections)}")
