"""Compressed request bodies: `Content-Encoding: gzip` (or `x-gzip`, `deflate`) decoded, bounded.

Browser apps and SDKs may compress a large request (a long chat history, a batch of texts to
embed). The body is decoded before anything reads it; the upstream gets the gateway's own JSON
(transform.py), never the client's bytes, so it never sees the coding.

Bounded: 10 kB of gzip can hold 10 MB of zeros, so the compressed size bounds nothing. zlib is
asked for at most STEP bytes of output at a time (`max_length`), and decoding stops with a 413 the
moment the output would pass `server.max_body_bytes`, the limit an uncompressed body has: no more
than that is ever held, whatever the ratio.

Off the loop: the first OFF_LOOP_BYTES of output are decoded on the event loop's thread (1-2 ms,
as a parse below that size is); the rest, if any, in a worker thread (offload.py), where zlib lets
go of the GIL while it inflates.

Refused: any other coding (br, zstd, compress) and more than one (`gzip, gzip`), with a 415 that
names what is taken in Accept-Encoding (RFC 9110, 15.5.16), before the body is read; a body that is
not what its coding says (corrupt, truncated, bytes after its end), with a 400.
"""

from __future__ import annotations

import math
import zlib

from hxgwd.errors import BadRequest, PayloadTooLarge, UnsupportedEncoding
from hxgwd.http import Headers
from hxgwd.offload import OFF_LOOP_BYTES, Offload

ACCEPTED = ("gzip", "deflate")
CODINGS = {b"gzip": "gzip", b"x-gzip": "gzip", b"deflate": "deflate"}   # x-gzip: RFC 9110, 8.4.1.3
STEP = 256 * 1024            # most output asked of zlib at once
INPUT_STEP = 64 * 1024       # input given to zlib at once: what it does not take is copied each step
GZIP_WBITS = 16 + zlib.MAX_WBITS
ZLIB_WBITS = zlib.MAX_WBITS
RAW_WBITS = -zlib.MAX_WBITS


def coding(headers: Headers) -> str | None:
    """The coding of a request body from its Content-Encoding header lines: "gzip", "deflate" or
    None (none, or only `identity`). UnsupportedEncoding (415) for anything else."""
    values = [value for name, value in headers if name == b"content-encoding"]   # on every POST: kept cheap
    if not values:
        return None
    names = [n for n in (token.strip().lower() for value in values for token in value.split(b","))
             if n and n != b"identity"]
    if not names:
        return None
    if len(names) == 1 and names[0] in CODINGS:
        return CODINGS[names[0]]
    given = ", ".join(n.decode("latin-1") for n in names)[:64]
    raise UnsupportedEncoding(f"Content-Encoding '{given}' is not supported: send the body uncompressed, "
                              f"or in one of {', '.join(ACCEPTED)}.", ACCEPTED)


async def decoded(body: bytes, coding: str, max_bytes: int, offload: Offload) -> bytes:
    """`body` decoded from `coding`, at most `max_bytes` of it (PayloadTooLarge beyond; BadRequest
    when it is not valid)."""
    decoder = Decoder(body, coding, max_bytes)
    if not decoder.advance(OFF_LOOP_BYTES):
        # a megabyte of output and more to come: the rest in a worker thread (the size given is
        # what is known of it, enough for Offload to take it there)
        await offload.run(OFF_LOOP_BYTES, decoder.advance, math.inf)
    return decoder.result()


class Decoder:
    """Decodes one body a step at a time, never beyond `max_bytes` of output. Sans I/O."""

    __slots__ = ("_input", "_at", "_coding", "_max", "_out", "_size", "_stream")

    def __init__(self, body: bytes, coding: str, max_bytes: int) -> None:
        self._input = memoryview(body)
        self._at = 0                # input before this was given to zlib
        self._coding = coding
        self._max = max_bytes
        self._out: list[bytes] = []
        self._size = 0
        self._stream = zlib.decompressobj(GZIP_WBITS if coding == "gzip" else _deflate_wbits(body))

    def advance(self, budget: float) -> bool:
        """Decode about `budget` more bytes of output (a step more at most); True once the whole
        body is decoded."""
        goal = self._size + budget
        while self._size < goal:
            stream = self._stream
            if stream.eof:
                # zlib returns what it was given beyond the end: a gzip body may hold more members
                # (RFC 1952, 2.2), anything else after the end is not what the coding says
                self._at -= len(stream.unused_data)
                if self._at == len(self._input):
                    return True
                if self._coding != "gzip":
                    raise _invalid(self._coding)
                self._stream = zlib.decompressobj(GZIP_WBITS)
                continue
            if stream.unconsumed_tail:
                data: bytes | memoryview = stream.unconsumed_tail
            else:
                data = self._input[self._at:self._at + INPUT_STEP]
                self._at += len(data)
            try:
                piece = stream.decompress(data, min(STEP, self._max - self._size + 1))
            except zlib.error:
                raise _invalid(self._coding) from None
            if not piece and not data and not stream.eof:    # all given, and the end never came
                raise _invalid(self._coding)
            self._size += len(piece)
            if self._size > self._max:
                raise PayloadTooLarge(f"Request body is larger than {self._max} bytes once decoded "
                                      f"(Content-Encoding: {self._coding}).")
            self._out.append(piece)
        return False

    def result(self) -> bytes:
        return b"".join(self._out)


def _deflate_wbits(body: bytes) -> int:
    """HTTP's deflate is the zlib format (RFC 9110, 8.4.1.2), but some clients send the raw deflate
    stream under that name (as browsers' CompressionStream("deflate-raw") makes): taken too, told
    apart by the zlib header (RFC 1950, 2.2: method 8, header a multiple of 31)."""
    if len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0:
        return ZLIB_WBITS
    return RAW_WBITS


def _invalid(coding: str) -> BadRequest:
    return BadRequest(f"The request body is not valid {coding} data (Content-Encoding: {coding}): corrupt, "
                      "truncated or followed by other bytes.", code="invalid_content_encoding")
