"""What the upstream pool (upstream/pool.py) still writes its requests with: h11, with the headers
that do not frame the message spliced in after h11's. Goes when the client side of hxgwd.http
(heads.request_head) replaces it."""

from __future__ import annotations

import h11

END_OF_MESSAGE = h11.EndOfMessage()   # h11 events are immutable: one serves every message


def splice_headers(head: bytes, rest: list[tuple[bytes, bytes]]) -> bytes:
    """Insert header lines before the blank line that ends `head`."""
    if not rest:
        return head
    return head[:-2] + b"".join([name + b": " + value + b"\r\n" for name, value in rest]) + b"\r\n"
