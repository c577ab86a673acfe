"""The sans-I/O server protocol, fed scripted bytes: no sockets, no trio; every test with each parser."""

from __future__ import annotations

import pytest

from hxgwd.http import END_OF_BODY, NEED_DATA, PEER_CLOSED, ProtocolError, RequestHead, server_protocol

REQ = (b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
       b"Authorization: Bearer k\r\n\r\nhello")


@pytest.fixture(params=["httptools", "h11"])
def parser(request) -> str:
    return request.param


def events(conn) -> list:
    out = []
    while (ev := conn.next()) is not NEED_DATA:
        out.append(ev)
        if ev is END_OF_BODY or ev is PEER_CLOSED:
            break
    return out


def outcome(parser: str, data: bytes, max_header_bytes: int = 16384) -> list:
    """What the protocol makes of `data`, answering each request: heads as (method, target,
    headers, length, keep-alive), body pieces joined, and how it ended."""
    conn = server_protocol(parser, max_header_bytes)
    conn.feed(data)
    out: list = []
    try:
        while True:
            got = events(conn)
            if not got:
                return out + ["NEED_DATA"]
            body = b"".join(e for e in got if type(e) is bytes)
            head = got[0]
            if head is PEER_CLOSED:
                return out + ["PEER_CLOSED"]
            out.append((head.method, head.target, head.headers, head.content_length, head.keep_alive, body))
            if got[-1] is not END_OF_BODY:
                return out + ["NEED_DATA"]
            conn.response_full(200, [], b"")
            if not conn.reusable:
                return out + ["CLOSE"]
            conn.start_next_cycle()
    except ProtocolError as exc:
        return out + [exc.status]


def test_request_in_one_piece(parser):
    conn = server_protocol(parser, 16384)
    conn.feed(REQ)
    head, body, end = events(conn)
    assert isinstance(head, RequestHead)
    assert (head.method, head.path, head.content_length, head.keep_alive) == ("POST", "/v1/chat/completions", 5, True)
    assert head.header(b"authorization") == b"Bearer k"
    assert body == b"hello" and end is END_OF_BODY


def test_request_one_byte_at_a_time(parser):
    conn = server_protocol(parser, 16384)
    got = []
    for i in range(len(REQ)):
        conn.feed(REQ[i:i + 1])
        got.extend(events(conn))
    assert isinstance(got[0], RequestHead)
    assert b"".join(e for e in got if isinstance(e, bytes)) == b"hello"
    assert got[-1] is END_OF_BODY


def test_chunked_body_and_response_bytes(parser):
    conn = server_protocol(parser, 16384)
    conn.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    evs = events(conn)
    assert evs[0].content_length is None
    assert b"".join(e for e in evs if isinstance(e, bytes)) == b"abcde"
    out = conn.response_full(200, [(b"content-type", b"text/plain")], b"ok")
    assert out == b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
    assert conn.reusable


def test_streamed_response_is_chunked_and_the_connection_stays(parser):
    conn = server_protocol(parser, 16384)
    conn.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    events(conn)
    out = conn.response_head(200, [(b"content-type", b"text/event-stream")])
    out += conn.response_body(b"data: 1\n\n") + conn.response_body(b"") + conn.response_end()
    assert out == (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                   b"9\r\ndata: 1\n\n\r\n0\r\n\r\n")
    assert conn.response_complete and conn.reusable and not conn.closes_after_response


def test_http10_streamed_response_ends_with_the_close(parser):
    conn = server_protocol(parser, 16384)
    conn.feed(b"GET / HTTP/1.0\r\n\r\n")
    assert events(conn)[0].keep_alive is False
    out = conn.response_head(200, []) + conn.response_body(b"abc") + conn.response_end()
    assert out == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nabc"
    assert conn.closes_after_response and not conn.reusable


def test_http10_keep_alive_is_kept(parser):
    conn = server_protocol(parser, 16384)
    conn.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n")
    assert events(conn)[0].keep_alive is True
    assert conn.response_full(200, [], b"x") == b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\n\r\nx"
    assert conn.reusable
    conn.start_next_cycle()
    assert events(conn)[0].target == "/2"


def test_connection_close_is_honoured(parser):
    conn = server_protocol(parser, 16384)
    conn.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert events(conn)[0].keep_alive is False
    assert b"connection: close\r\n" in conn.response_full(200, [], b"")
    assert conn.closes_after_response and not conn.reusable


def test_a_pipelined_request_waits_for_the_answer_to_the_one_before(parser):
    conn = server_protocol(parser, 16384)
    conn.feed(REQ + b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert len(events(conn)) == 3
    assert conn.next() is NEED_DATA
    conn.response_full(200, [], b"")
    conn.start_next_cycle()
    assert events(conn)[0].target == "/2"


def test_expect_100_continue(parser):
    conn = server_protocol(parser, 16384)
    conn.feed(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert events(conn)[0].content_length == 3
    assert conn.waiting_for_100_continue
    assert conn.response_continue() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert not conn.waiting_for_100_continue
    conn.feed(b"abc")
    assert events(conn) == [b"abc", END_OF_BODY]


@pytest.mark.parametrize("target, path", [
    (b"http://gw:4010/v1/models?x=1", "/v1/models?x=1"), (b"HTTPS://gw", "/"), (b"http://gw?x=1", "/?x=1"),
    (b"/v1/models", "/v1/models"), (b"ftp://gw/v1/models", "ftp://gw/v1/models")])
def test_absolute_form_target_is_reduced_to_its_path(parser, target, path):
    conn = server_protocol(parser, 16384)
    conn.feed(b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert conn.next().target == path


def test_head_is_answered_without_a_body_and_the_connection_stays_usable(parser):
    conn = server_protocol(parser, 16384)
    conn.feed(b"HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    assert events(conn)[0].method == "HEAD"
    out = conn.response_full(200, [(b"content-type", b"application/json")], b'{"ok": true}')
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\n")
    assert b"content-length: 12\r\n" in out.lower()
    assert conn.reusable
    conn.start_next_cycle()
    conn.feed(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    events(conn)
    assert conn.response_full(200, [], b'{"ok": true}').endswith(b'{"ok": true}')


def test_headers_we_send_are_checked(parser):
    conn = server_protocol(parser, 16384)
    conn.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    events(conn)
    with pytest.raises(ValueError):
        conn.response_full(200, [(b"x-a", b"b\r\nset-cookie: c")], b"")
    with pytest.raises(ValueError):
        conn.response_full(200, [(b"x a", b"b")], b"")
    assert conn.can_start_response     # nothing was sent: an error answer can still go


@pytest.mark.parametrize("request_bytes", [b"GET /healthz HTTP/2.0\r\nHost: a\r\n\r\n",
                                           b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                                           b"GET / HTTP/1.2\r\nHost: a\r\n\r\n"])
def test_http2_is_505(parser, request_bytes):
    conn = server_protocol(parser, 16384)
    conn.feed(request_bytes)
    with pytest.raises(ProtocolError) as exc:
        conn.next()
    assert exc.value.status == 505
    assert conn.response_full(505, [], b"").startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")


def test_malformed_is_400_and_headers_over_limit_431(parser):
    conn = server_protocol(parser, 16384)
    conn.feed(b"GARBAGE\r\n\r\n")
    with pytest.raises(ProtocolError) as exc:
        conn.next()
    assert exc.value.status == 400
    for pieces in ([b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 2000],          # arriving in one piece
                   [b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: "] + [b"a" * 100] * 20,    # or in many
                   [b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"]):   # or whole
        conn = server_protocol(parser, 1024)
        with pytest.raises(ProtocolError) as exc:
            for piece in pieces:
                conn.feed(piece)
                conn.next()
        assert exc.value.status == 431


def test_trailers_are_bounded(parser):
    conn = server_protocol(parser, 1024)
    conn.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: ")
    with pytest.raises(ProtocolError):
        for _ in range(30):
            conn.feed(b"a" * 100)
            events(conn)


def test_peer_closed_between_requests_and_within_one(parser):
    conn = server_protocol(parser, 16384)
    conn.feed(b"")
    assert conn.next() is PEER_CLOSED
    assert outcome(parser, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == [
        ("GET", "/", [(b"host", b"a")], 0, True, b""), "NEED_DATA"]
    conn = server_protocol(parser, 16384)
    conn.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nabc")
    events(conn)
    conn.feed(b"")
    with pytest.raises(ProtocolError):
        events(conn)


@pytest.mark.parametrize("garbage", [b"\x00\x01\x02\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                                     b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                                     b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"])
def test_garbage_only_raises_our_errors(parser, garbage):
    conn = server_protocol(parser, 16384)
    conn.feed(garbage)
    with pytest.raises(ProtocolError):
        while conn.next() is not NEED_DATA:
            pass


# Requests one of the parsers took and the other refused, before the backends were aligned; the
# outcome must now be the same with both. Each is (name, bytes, what both do: a status or "served").
H = b"Host: a\r\n"
STRICTNESS = [
    ("content-length and chunked", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("chunked, identity", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    ("gzip, chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    ("two transfer-encodings", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("content-length twice, equal", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("content-length as a list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    ("bare LF", b"GET / HTTP/1.1\n" + b"Host: a\n\n", 400),
    ("bare LF in a header", b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X: b\r\n c\r\n\r\n", 400),
    ("DEL in a value", b"GET / HTTP/1.1\r\n" + H + b"X: b\x7fc\r\n\r\n", 400),
    ("a control in a value", b"GET / HTTP/1.1\r\n" + H + b"X: b\x01c\r\n\r\n", 400),
    ("no Host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two Hosts", b"GET / HTTP/1.1\r\n" + H + b"Host: b\r\n\r\n", 400),
    ("unknown method", b"FOO / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("lowercase method", b"get / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("CONNECT", b"CONNECT a:443 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("upgrade with a body", b"POST / HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("target in no form llhttp reads", b"GET v1/chat HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("a bare CR", b"GET / HTTP/1.1\r\n" + H + b"X: a\rb\r\n\r\n", 400),
    ("obs-fold in a head still arriving", b"GET / HTTP/1.1\r\n" + H + b"X: b\r\n c", 400),
    ("a bare LF in a head still arriving", b"GET / HTTP/1.1\n" + H, 400),
    ("whitespace after Transfer-Encoding", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked \t\r\n\r\n0\r\n\r\n", 400),
    ("a trailer", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX: y\r\n\r\n", 400),
    ("Content-Length as a trailer", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 999\r\n\r\n", 400),
    ("a tab in the request line", b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("spaces after the version", b"GET / HTTP/1.1  \r\n" + H + b"\r\n", 400),
    ("spaces before the method", b"  GET / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("spaces within the target", b"GET /a  b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("a bare CR in a quoted chunk extension", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;a=\"v\r b\"\r\nabc\r\n0\r\n\r\n", 400),
    ("a control in a quoted chunk extension", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;a=\"v\x01\"\r\nabc\r\n0\r\n\r\n", 400),
    ("a space around a chunk extension's =", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;a = b\r\nabc\r\n0\r\n\r\n", 400),
    ("a chunk extension ending in ;", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;a=b;\r\nabc\r\n0\r\n\r\n", 400),
    ("a chunk extension's value neither token nor quoted", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;a=\"b\"c\r\nabc\r\n0\r\n\r\n", 400),
    ("a quote in an absolute target's host", b'GET http://a"b/v1 HTTP/1.1\r\n' + H + b"\r\n", 400),
    ("a brace in an absolute target's port", b"GET http://a:8{/v1 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("a target of * and more", b"OPTIONS *: HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("a bare LF after the last chunk", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\n"
                                       b"GET / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("a digit in an absolute target's scheme", b"GET h9ttp://a/v1 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("HTTP/0.9", b"GET /\r\n\r\n", None),           # both refuse: 400 or 505
    ("HTTP/2.0", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("HTTP/3.0", b"GET / HTTP/3.0\r\n" + H + b"\r\n", 505),
    ("runs of spaces in the request line", b"POST  /   HTTP/1.1\r\n" + H + b"\r\n", "served"),
    ("tab in a value", b"GET / HTTP/1.1\r\n" + H + b"X: b\tc\r\n\r\n", "served"),
    ("obs-text in a value", b"GET / HTTP/1.1\r\n" + H + b"X: b\xffc\r\n\r\n", "served"),
    ("whitespace after a value", b"GET / HTTP/1.1\r\nHost: a \t\r\n\r\n", "served"),
    ("empty lines before the request", b"\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n", "served"),
    ("Transfer-Encoding: Chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "served"),
    ("upgrade without a body, then a request", b"GET / HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                                               b"GET /2 HTTP/1.1\r\n" + H + b"\r\n", "served"),
    ("Upgrade alone", b"GET / HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\n\r\nGET /2 HTTP/1.1\r\n" + H + b"\r\n", "served"),
    ("chunk extension", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\n\r\n", "served"),
    ("a quoted chunk extension", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;a=\"v a\";b;=c;d=\r\nabc\r\n0\r\n\r\n", "served"),
    ("an absolute target", b"GET https://gw.example:8443/v1/models?a=%22b%22 HTTP/1.1\r\n" + H + b"\r\n", "served"),
    ("whitespace after a chunk size", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3 \t\r\nabc\r\n1\t;a=b\r\nd\r\n0\r\n\r\n", "served"),
    ("data after Connection: close", b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\nGET /2 HTTP/1.1\r\n" + H + b"\r\n", "served"),
]


@pytest.mark.parametrize("name, data, expected", STRICTNESS, ids=[case[0] for case in STRICTNESS])
def test_both_parsers_take_and_refuse_the_same_requests(name, data, expected):
    llhttp, h11 = outcome("httptools", data), outcome("h11", data)
    if expected is None:
        assert type(llhttp[-1]) is int and type(h11[-1]) is int, (llhttp, h11)
        return
    assert llhttp == h11
    if expected == "served":
        assert type(llhttp[-1]) is not int and llhttp[0][0] in ("GET", "POST"), llhttp
    else:
        assert llhttp == [expected]


def test_a_pipelined_body_is_not_counted_as_the_next_head(parser):
    conn = server_protocol(parser, 1024)
    conn.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3000\r\n\r\n" + b"b" * 3000 + b"GET /2 HTTP/1.1\r\nHost")
    assert [type(e) for e in events(conn)] == [RequestHead, bytes, type(END_OF_BODY)]
    conn.response_full(200, [], b"")
    conn.start_next_cycle()
    assert conn.next() is NEED_DATA
    conn.feed(b": a\r\n\r\n")
    assert conn.next().target == "/2"
