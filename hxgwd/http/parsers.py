"""Which parser backend reads HTTP, and the factories of each side's protocol state.

The backends are imported only when a protocol is made: `hxgwd --version` imports neither, and
each backend imports the shared part of its side (protocol.py, client.py), never this module.
"""

from __future__ import annotations

import functools
import importlib.util

from hxgwd.http.client import ClientProtocol
from hxgwd.http.protocol import ServerProtocol

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


def server_protocol(parser: str, max_header_bytes: int) -> ServerProtocol:
    """The server side of one connection, read by `parser` ("httptools" or "h11")."""
    if parser == "httptools":
        from hxgwd.http.server_llhttp import LlhttpServerProtocol
        return LlhttpServerProtocol(max_header_bytes)
    if parser == "h11":
        from hxgwd.http.server_h11 import H11ServerProtocol
        return H11ServerProtocol(max_header_bytes)
    raise ValueError(f"unknown HTTP parser {parser!r}")


def client_protocol(parser: str, max_head_bytes: int) -> ClientProtocol:
    """A client connection's protocol state with the named backend ("httptools" or "h11")."""
    if parser == "httptools":
        from hxgwd.http.client_llhttp import LlhttpClient
        return LlhttpClient(max_head_bytes)
    if parser == "h11":
        from hxgwd.http.client_h11 import H11Client
        return H11Client(max_head_bytes)
    raise ValueError(f"unknown HTTP parser {parser!r}")
