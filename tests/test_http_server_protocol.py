"""The sans-IO server side, fed scripted bytes: no sockets, no trio."""

from __future__ import annotations

import pytest

from hxgwd.errors import BadRequest, GatewayError, HeadersTooLarge
from hxgwd.http.server_h11 import END_OF_BODY, NEED_DATA, PEER_CLOSED, RequestHead, ServerConn

REQ = (b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
       b"Authorization: Bearer k\r\n\r\nhello")


def events(conn: ServerConn) -> list:
    out = []
    while (ev := conn.next()) is not NEED_DATA:
        out.append(ev)
        if ev is END_OF_BODY or ev is PEER_CLOSED:
            break
    return out


def test_request_in_one_piece():
    conn = ServerConn(16384)
    conn.feed(REQ)
    head, body, end = events(conn)
    assert isinstance(head, RequestHead)
    assert (head.method, head.path, head.content_length, head.keep_alive) == ("POST", "/v1/chat/completions", 5, True)
    assert head.header(b"authorization") == b"Bearer k"
    assert body == b"hello" and end is END_OF_BODY


def test_request_one_byte_at_a_time():
    conn = ServerConn(16384)
    got = []
    for i in range(len(REQ)):
        conn.feed(REQ[i:i + 1])
        got.extend(events(conn))
    assert isinstance(got[0], RequestHead)
    assert b"".join(e for e in got if isinstance(e, bytes)) == b"hello"
    assert got[-1] is END_OF_BODY


def test_chunked_body_and_response_bytes():
    conn = ServerConn(16384)
    conn.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    evs = events(conn)
    assert evs[0].content_length is None
    assert b"".join(e for e in evs if isinstance(e, bytes)) == b"abcde"
    out = conn.response_full(200, [(b"content-type", b"text/plain")], b"ok")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nok")
    assert conn.reusable


@pytest.mark.parametrize("target, path", [
    (b"http://gw:4010/v1/models?x=1", "/v1/models?x=1"), (b"HTTPS://gw", "/"), (b"http://gw?x=1", "/?x=1"),
    (b"/v1/models", "/v1/models"), (b"ftp://gw/v1/models", "ftp://gw/v1/models")])
def test_absolute_form_target_is_reduced_to_its_path(target, path):
    conn = ServerConn(16384)
    conn.feed(b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert conn.next().target == path


def test_head_is_answered_without_a_body_and_the_connection_stays_usable():
    conn = ServerConn(16384)
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


@pytest.mark.parametrize("request_bytes", [b"GET /healthz HTTP/2.0\r\nHost: a\r\n\r\n",
                                           b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"])
def test_http2_is_505(request_bytes):
    conn = ServerConn(16384)
    conn.feed(request_bytes)
    with pytest.raises(GatewayError) as exc:
        conn.next()
    assert exc.value.status == 505
    assert conn.response_error(exc.value).startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")


def test_malformed_is_400_and_headers_over_limit_431():
    conn = ServerConn(16384)
    conn.feed(b"GARBAGE\r\n\r\n")
    with pytest.raises(BadRequest) as exc:
        conn.next()
    assert exc.value.status == 400
    conn = ServerConn(1024)
    conn.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 2000)
    with pytest.raises(HeadersTooLarge):
        conn.next()


def test_error_answer_closes_and_http10_not_keepalive():
    conn = ServerConn(16384)
    conn.feed(b"GET / HTTP/1.0\r\n\r\n")
    head = conn.next()
    assert head.keep_alive is False
    out = conn.response_error(BadRequest("no"))
    assert b"connection: close" in out.lower() and b'"message":"no"' in out


def test_peer_closed_between_requests():
    conn = ServerConn(16384)
    conn.feed(b"")
    assert conn.next() is PEER_CLOSED


@pytest.mark.parametrize("garbage", [b"\x00\x01\x02\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                                     b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                                     b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"])
def test_garbage_only_raises_our_errors(garbage):
    conn = ServerConn(16384)
    conn.feed(garbage)
    try:
        while conn.next() is not NEED_DATA:
            pass
    except BadRequest:
        pass
