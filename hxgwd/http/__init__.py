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

Which backend is in use, and the factories, are parsers.py's; this module exports the layer's
names and imports neither parser, so `hxgwd --version` stays fast.
"""

from __future__ import annotations

from hxgwd.http.heads import Headers
from hxgwd.http.parsers import PARSERS, client_protocol, httptools_available, resolve_parser, server_protocol
from hxgwd.http.protocol import (END_OF_BODY, NEED_DATA, PEER_CLOSED, Errors, HttpError, PlainErrors, ProtocolError,
                                 RequestHead, ServerProtocol)

__all__ = ["END_OF_BODY", "NEED_DATA", "PEER_CLOSED", "PARSERS", "Errors", "Headers", "HttpError", "PlainErrors",
           "ProtocolError", "RequestHead", "ServerProtocol", "httptools_available", "resolve_parser",
           "client_protocol", "server_protocol"]
