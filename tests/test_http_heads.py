"""The head writer refuses anything that could split a header or end a head early."""

from __future__ import annotations

import pytest

from hxgwd.http.heads import BadHeader, header_block, request_head, response_head


def test_heads_are_written_as_given():
    assert response_head(200, [(b"content-length", b"2"), (b"x-a", b"b\tc \x80")]) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: b\tc \x80\r\n\r\n")
    assert request_head(b"POST", b"/v1/chat/completions", [(b"host", b"u:1")]) == (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: u:1\r\n\r\n")
    assert response_head(599, []) == b"HTTP/1.1 599 \r\n\r\n"
    assert header_block([]) == b""


@pytest.mark.parametrize("name, value", [
    (b"x-a", b"b\r\nx-injected: 1"), (b"x-a", b"b\nc"), (b"x-a", b"b\rc"), (b"x-a", b"b\x00"),
    (b"x a", b"b"), (b"x:a", b"b"), (b"", b"b"), (b"x\r\n", b"b"), (b"x-\xe9", b"b"), (b"x(a)", b"b"),
])
def test_a_header_that_could_split_the_head_is_refused(name, value):
    with pytest.raises(BadHeader):
        header_block([(b"ok", b"1"), (name, value)])
    with pytest.raises(BadHeader):
        response_head(200, [(name, value)])


@pytest.mark.parametrize("method, target", [(b"PO ST", b"/"), (b"GET", b"/a b"), (b"GET", b"/\r\n"),
                                            (b"GET", b""), (b"", b"/"), (b"GET", b"/\x00")])
def test_a_request_line_that_is_not_one_is_refused(method, target):
    with pytest.raises(BadHeader):
        request_head(method, target, [])


def test_status_must_be_three_digits():
    for status in (0, 99, 1000):
        with pytest.raises(BadHeader):
            response_head(status, [])
