"""Who sent a request, for the access line and the usage row: `client` (an address) and
`user_agent`, and the prefix of a key that was refused.

`client` is the TCP peer's address. Behind a reverse proxy that is the proxy, so a peer listed in
`[server] trusted_proxies` is believed about `X-Forwarded-For`: the client is the nearest address
in it (from the right) that is not itself a trusted proxy. Anyone else's X-Forwarded-For is
ignored: a client could write any address there, and a leaked key's traces would lie.

The usual request (no trusted proxies) costs one string split; the networks are parsed once per
config snapshot's tuple (a small cache keyed by it), not per request.
"""

from __future__ import annotations

import functools
import ipaddress

from hxgwd.errors import MAX_ECHOED, capped
from hxgwd.http import Headers

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PREFIX_CHARS = 8          # of a refused key: enough to tell "sk-hx-ab" from "sk-proj-" and look one up
PREFIX_MIN_KEY = 24       # ... and only of a key at least 3x that long, so most of it stays unsaid


def peer_host(peer: str) -> str:
    """"127.0.0.1:5678" or "::1:5678" (as connection.py writes it) -> the address."""
    host, sep, _port = peer.rpartition(":")
    return host if sep else peer


@functools.lru_cache(maxsize=8)
def networks(trusted: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in trusted)


def _trusted(address: str, nets: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in nets)


def client_address(peer: str, headers: Headers, trusted: tuple[str, ...]) -> str:
    host = peer_host(peer)
    if not trusted:
        return host
    nets = networks(trusted)
    if not _trusted(host, nets):
        return host
    forwarded = [value for name, value in headers if name == b"x-forwarded-for"]
    if not forwarded:
        return host
    hops = [hop.strip() for hop in b",".join(forwarded).decode("latin-1").split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, nets):
            try:
                return str(ipaddress.ip_address(hop))   # an address, not whatever text was there
            except ValueError:
                return capped(hop[:MAX_ECHOED])
    return hops[0] if hops else host      # every hop a trusted proxy: the first one


def user_agent(headers: Headers) -> str | None:
    for name, value in headers:
        if name == b"user-agent":
            text = value.decode("latin-1")
            return text if len(text) <= MAX_ECHOED else capped(text)
    return None


def key_prefix(key: str | None) -> str | None:
    """What a refused key starts with, for the 401's access line: the first PREFIX_CHARS
    characters of a key at least PREFIX_MIN_KEY long, else nothing (a short key's prefix would be
    most of it). Store keys' prefixes are in `hxgwd keys list`, so a match names the key."""
    if key is None or len(key) < PREFIX_MIN_KEY:
        return None
    return key[:PREFIX_CHARS]
