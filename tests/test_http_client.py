"""The sans-I/O client protocol, both backends: answers fed as bytes, whole and a byte at a time."""

from __future__ import annotations

import pytest

from hxgwd.http import client_protocol
from hxgwd.http.client import END_OF_MESSAGE, NEED_DATA, ResponseError, ResponseHead

PARSERS = ["httptools", "h11"]
HEAD_LIMIT = 1024


def exchange(parser: str, *pieces: bytes, whole: bool = True):
    """What next() gives for `pieces` fed in turn (b"": the upstream closed), as a list of
    events; a ResponseError as the last item. With whole=False every byte is fed alone."""
    proto = client_protocol(parser, HEAD_LIMIT)
    proto.request(b"POST", b"/v1/x", [(b"host", b"u")], b"{}")
    if not whole:
        pieces = tuple(bytes([b]) for piece in pieces for b in piece) + tuple(p for p in pieces if p == b"")
    out: list = []
    try:
        for piece in pieces:
            proto.feed(piece)
            while (event := proto.next()) is not NEED_DATA:
                out.append(event)
    except ResponseError as exc:
        out.append(exc)
    return proto, out


def body_of(events) -> bytes:
    return b"".join(e for e in events if isinstance(e, bytes))


@pytest.fixture(params=PARSERS)
def parser(request):
    return request.param


@pytest.mark.parametrize("whole", [True, False])
def test_a_content_length_answer_and_reuse(parser, whole):
    proto, events = exchange(parser, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b \r\n\r\nhello", whole=whole)
    assert events[0] == ResponseHead(200, [(b"content-length", b"5"), (b"x-a", b"b")])
    assert body_of(events) == b"hello" and events[-1] is END_OF_MESSAGE
    assert proto.reusable
    proto.start_next()
    proto.request(b"GET", b"/health", [(b"host", b"u")], b"")
    proto.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert proto.next() == ResponseHead(204, []) and proto.next() is END_OF_MESSAGE and proto.reusable


@pytest.mark.parametrize("whole", [True, False])
def test_a_chunked_answer(parser, whole):
    proto, events = exchange(parser, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                     b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n", whole=whole)
    assert events[0].headers == [(b"transfer-encoding", b"chunked")]
    assert body_of(events) == b"hello world" and events[-1] is END_OF_MESSAGE and proto.reusable


@pytest.mark.parametrize("whole", [True, False])
def test_an_answer_delimited_by_the_close_ends_at_eof_and_is_not_reusable(parser, whole):
    proto, events = exchange(parser, b"HTTP/1.1 200 OK\r\n\r\nall of it", b"", whole=whole)
    assert body_of(events) == b"all of it" and events[-1] is END_OF_MESSAGE
    assert not proto.reusable


def test_a_close_before_the_end_is_an_error(parser):
    for answer in (b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel",
                   b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"):
        proto, events = exchange(parser, answer, b"")
        assert isinstance(events[-1], ResponseError), answer


def test_informational_answers_are_skipped(parser):
    proto, events = exchange(parser, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
                                     b"\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    assert events == [ResponseHead(200, [(b"content-length", b"2")]), b"ok", END_OF_MESSAGE]
    assert proto.reusable


@pytest.mark.parametrize("stray", [b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL", b"X", b"okay"])
def test_bytes_after_an_answer_make_it_unreusable(parser, stray):
    # in the same read, or a later one: never taken for the next answer
    for pieces in ((b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" + stray,),
                   (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", stray)):
        proto, events = exchange(parser, *pieces)
        assert events[:3] == [ResponseHead(200, [(b"content-length", b"2")]), b"ok", END_OF_MESSAGE]
        assert isinstance(events[3], ResponseError) and not proto.reusable


def test_newlines_after_an_answer_are_let_be(parser):
    proto, events = exchange(parser, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok\r\n", b"\r\n")
    assert events[-1] is END_OF_MESSAGE and proto.reusable
    proto.start_next()
    proto.request(b"POST", b"/", [(b"host", b"u")], b"")
    proto.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert proto.next().status == 200 and proto.next() is END_OF_MESSAGE


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 099 Low\r\ncontent-length: 0\r\n\r\n", b"http/1.1 200 OK\r\n\r\n",
    b"HTTP/2.0 200 OK\r\ncontent-length: 0\r\n\r\n", b"HTTP/1.1 200 OK\ncontent-length: 0\n\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabX0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\na",
    b"HTTP/1.1 200 OK\r\ncontent-length: 1, 1\r\n\r\na",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\nabc",
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nx: a\r\n b\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nx: a\x01b\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nx: a\x7fb\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nx : a\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\na",
    b"HTTP/1.1 200 OK\rcontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\nx-trailer: t\r\n\r\n",
    b"HTTP/1.1 200 \x00OK\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 2000 + b"\r\n\r\n",              # one header over the limit
    b"HTTP/1.1 200 OK\r\n" + b"x-h: 0123456789\r\n" * 100 + b"\r\n",         # many headers over it
])
@pytest.mark.parametrize("whole", [True, False])
def test_malformed_answers_are_refused_by_both(parser, answer, whole):
    proto, events = exchange(parser, answer, whole=whole)
    assert isinstance(events[-1], ResponseError), events
    assert not proto.reusable


def test_an_incomplete_head_over_the_limit_is_refused_before_it_ends(parser):
    proto, events = exchange(parser, b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 2000)
    assert isinstance(events[-1], ResponseError)


def test_a_body_longer_than_its_length_is_stray_bytes(parser):
    proto, events = exchange(parser, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokMORE")
    assert events[1:3] == [b"ok", END_OF_MESSAGE] and isinstance(events[3], ResponseError)
    assert not proto.reusable


def test_connection_close_and_http_1_0_answers_are_not_reusable(parser):
    for answer in (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
                   b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n"):
        proto, events = exchange(parser, answer)
        assert events[-1] is END_OF_MESSAGE and not proto.reusable


def test_bodiless_statuses_have_no_body(parser):
    for status in (204, 304):
        proto, events = exchange(parser, b"HTTP/1.1 %d X\r\ncontent-length: 5\r\n\r\n" % status)
        assert events[-1] is END_OF_MESSAGE and body_of(events) == b"" and proto.reusable


def test_requests_are_written_by_the_checked_head_writer(parser):
    proto = client_protocol(parser, HEAD_LIMIT)
    assert proto.request(b"POST", b"/v1/x", [(b"host", b"u:1"), (b"x-a", b"b")], b"{}") == (
        b"POST /v1/x HTTP/1.1\r\nhost: u:1\r\nx-a: b\r\ncontent-length: 2\r\n\r\n{}")
    proto = client_protocol(parser, HEAD_LIMIT)
    assert proto.request(b"GET", b"/health", [(b"host", b"u")], b"") == b"GET /health HTTP/1.1\r\nhost: u\r\n\r\n"
    from hxgwd.http.heads import BadHeader
    with pytest.raises(BadHeader):
        client_protocol(parser, HEAD_LIMIT).request(b"POST", b"/", [(b"x", b"a\r\nb: c")], b"")
    with pytest.raises(ValueError):
        client_protocol(parser, HEAD_LIMIT).request(b"HEAD", b"/", [(b"host", b"u")], b"")


def test_lenient_alike(parser):
    """What both take though one parser alone would not (client.STRICTNESS)."""
    for answer in (b"\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                   b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2 \r\nab\r\n0\r\n\r\n",
                   b"HTTP/1.1 200\r\ncontent-length: 0\r\n\r\n",
                   b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked \r\n\r\n0\r\n\r\n"):
        proto, events = exchange(parser, answer)
        assert events[-1] is END_OF_MESSAGE, (answer, events)


def test_a_second_request_waits_for_start_next(parser):
    proto, events = exchange(parser, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    with pytest.raises(RuntimeError):
        proto.request(b"POST", b"/", [(b"host", b"u")], b"")
    proto.start_next()
    proto.request(b"POST", b"/", [(b"host", b"u")], b"")
    with pytest.raises(RuntimeError):
        proto.request(b"POST", b"/", [(b"host", b"u")], b"")
