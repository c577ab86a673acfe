"""Stage 3, authenticate: the client's key -> a `Principal`, or 401. Pure: no I/O.

Keys are looked up by their SHA-256 digest, so the table never holds a usable key and the lookup
time depends only on a digest an attacker cannot steer; the final equality is still checked with
`hmac.compare_digest`. Clients send keys as `Authorization: Bearer`, or as `api-key` (Azure
clients) or `x-api-key`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Callable, Iterable

from hxgwd.errors import Forbidden, Unauthorized
from hxgwd.http import Headers
from hxgwd.runtime import Principal

KeyLookup = Callable[[bytes], "Principal | None"]


def presented_key(headers: Headers) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip().decode("latin-1")
        elif name in (b"api-key", b"x-api-key") and value.strip():
            return value.strip().decode("latin-1")
    return None


def authenticate(headers: Headers, lookups: Iterable[KeyLookup]) -> tuple[Principal, bytes]:
    """The principal of the presented key, and the key's digest; Unauthorized if none matches."""
    key = presented_key(headers)
    if key is None:
        raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key")
    digest = hashlib.sha256(key.encode("latin-1")).digest()
    for lookup in lookups:
        principal = lookup(digest)
        if principal is not None and hmac.compare_digest(principal.digest or digest, digest):
            return principal, digest
    raise Unauthorized("Invalid API key.")


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise Forbidden("This key is not an admin key.", code="admin_required")
