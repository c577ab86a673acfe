"""Heads we send, written by our code from checked values, on both sides and with either parser.

A peer's header passes through the gateway (a client's to the upstream, an upstream's to the
client) only as a value we write again here: a name that is not a token, or a CR, LF or NUL
anywhere, would let one header become two, or a head end early (response splitting, request
smuggling). The check is one regular-expression pass over the whole block, not one call per
header: re-validating each header on every send was a fifth of the CPU per request in profiles.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Iterable, Sequence

Headers = list[tuple[bytes, bytes]]

# RFC 9110 5.6.2: token = 1*tchar. A value: any byte but CR, LF and NUL (obs-text included).
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_BLOCK = re.compile(rb"(?:" + _TCHAR + rb"+: [^\r\n\x00]*\r\n)*\Z")
_TOKEN = re.compile(_TCHAR + rb"+\Z")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")     # visible ASCII, no space: origin, absolute or * form
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class BadHeader(ValueError):
    """A header we were asked to send is not one HTTP can carry as it is."""


def header_block(headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """`name: value\\r\\n` lines for `headers`, checked; BadHeader if any cannot be sent."""
    block = b"".join([name + b": " + value + b"\r\n" for name, value in headers])
    # well formed, and one line per header: a CRLF inside a value can make a well-formed block
    if not _BLOCK.match(block) or block.count(b"\n") != len(headers):
        raise BadHeader(_first_bad(headers))
    return block


def response_head(status: int, headers: Sequence[tuple[bytes, bytes]], version: bytes = b"1.1") -> bytes:
    if not 100 <= status <= 999:
        raise BadHeader(f"status {status} is not three digits")
    return b"HTTP/%s %d %s\r\n%s\r\n" % (version, status, REASONS.get(status, b""), header_block(headers))


def request_head(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    if not _TOKEN.match(method):
        raise BadHeader("the method is not a token")
    if not _TARGET.match(target):
        raise BadHeader("the request target holds a space or a control character")
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, header_block(headers))


def _first_bad(headers: Iterable[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if not _TOKEN.match(name):
            return f"header name {name[:64]!r} is not a token"
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            return f"the value of header {name.decode('latin-1')!r} holds CR, LF or NUL"
    return "malformed header"
