"""Listen addresses as written in a config: parsed without trio, for `--check-config` too."""

from __future__ import annotations

import ipaddress
import re


def parse_listen(addr: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (all interfaces) -> (host, port)."""
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{addr!r}: expected HOST:PORT")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{addr!r}: port must be 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif host and not re.match(r"^[A-Za-z0-9.-]+$", host):
        raise ValueError(f"{addr!r}: bad host")
    return host or "0.0.0.0", port
