"""hxgwd.http: a generic HTTP/1.1 layer. It knows nothing of OpenAI, keys or models.

Two parser backends sit behind one small sans-I/O interface, on both sides of the gateway:
`httptools` (llhttp, Node.js's parser, in C: the hot path) and `h11` (pure Python: the reference).
`[server] http_parser` chooses: "auto" takes httptools when it can be imported. Measured on the
2-core bench machine, a bare trio pass-through does ~5,100 req/s parsing both sides with h11 and
~20,800 with httptools, so the parser was three quarters of a gateway's floor.

Whichever parser reads, the heads we send are written by our own code from checked values
(header names are tokens; no CR, LF or NUL in a name or value), never copied raw from a peer.

The client side (upstreams) is `client_protocol(parser, max_head_bytes)`, see `client.py`; both
backends there accept the same answers and refuse the same ones (`client.STRICTNESS`).

This module answers which backend is in use and exports the server protocol's names
(protocol.py); it imports neither parser, so `hxgwd --version` stays fast.
"""

from __future__ import annotations

import functools
import importlib.util

from hxgwd.http.heads import Headers
from hxgwd.http.protocol import (END_OF_BODY, NEED_DATA, PEER_CLOSED, Errors, HttpError, PlainErrors, ProtocolError,
                                 RequestHead, ServerProtocol, server_protocol)

__all__ = ["END_OF_BODY", "NEED_DATA", "PEER_CLOSED", "PARSERS", "Errors", "Headers", "HttpError", "PlainErrors",
           "ProtocolError", "RequestHead", "ServerProtocol", "httptools_available", "resolve_parser",
           "server_protocol"]

PARSERS = ("httptools", "h11")


@functools.cache     # a fact of the installation: asked once
def httptools_available() -> bool:
    return importlib.util.find_spec("httptools") is not None


def resolve_parser(setting: str) -> str:
    """The backend a `[server] http_parser` setting ("auto", "httptools", "h11") runs with."""
    if setting == "auto":
        return "httptools" if httptools_available() else "h11"
    if setting not in PARSERS:
        raise ValueError(f"unknown HTTP parser {setting!r}")
    return setting


def client_protocol(parser: str, max_head_bytes: int):
    """The sans-I/O client side of one connection with the named backend (see http/client.py)."""
    from hxgwd.http.client import client_protocol as make

    return make(parser, max_head_bytes)
