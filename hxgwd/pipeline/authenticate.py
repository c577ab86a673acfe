"""Stage 3, authenticate: the client's key -> a `Principal`, or 401. Pure: no I/O.

Keys are looked up by their SHA-256 digest, so the table never holds a usable key and the lookup
time depends only on a digest an attacker cannot steer; the final equality is still checked with
`hmac.compare_digest`. Clients send keys as `Authorization: Bearer`, or as `api-key` (Azure
clients) or `x-api-key`.

Read-only monitoring pages (`access = "monitor"`: /status) also take an admin key as the password
of HTTP Basic auth (any user name): browsers ask for it after a 401 with a Basic challenge, and
Prometheus sends it so (`basic_auth`). Only there: a browser resends Basic credentials by itself,
to any request of the origin, so a page elsewhere could make it call what changes state
(`POST /admin/keys`, `DELETE /admin/keys/NAME`); reads it cannot see cross-origin are harmless.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Callable, Iterable

from hxgwd.errors import Forbidden, Unauthorized
from hxgwd.http import Headers
from hxgwd.runtime import Principal

KeyLookup = Callable[[bytes], "Principal | None"]

# RFC 7617: a browser shows a password prompt for it; charset says the password is sent in UTF-8
BASIC_CHALLENGE = (b"www-authenticate", b'Basic realm="hxgwd", charset="UTF-8"')


def presented_key(headers: Headers) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip().decode("latin-1")
        elif name in (b"api-key", b"x-api-key") and value.strip():
            return value.strip().decode("latin-1")
    return None


def basic_password(headers: Headers) -> str | None:
    """The password of `Authorization: Basic base64(user:password)`, or None: no such header, not
    base64, no colon, or an empty password. The user name is not read."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"basic":
                return None
            try:
                decoded = base64.b64decode(token.strip(), validate=True)
            except (binascii.Error, ValueError):
                return None
            _user, colon, password = decoded.partition(b":")
            return password.decode("latin-1") if colon and password else None
    return None


class BasicUnauthorized(Unauthorized):
    """401 that a browser answers with its password prompt: Basic first, Bearer beside it."""

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [BASIC_CHALLENGE, *super().headers()]


def authenticate(headers: Headers, lookups: Iterable[KeyLookup]) -> tuple[Principal, bytes]:
    """The principal of the presented key, and the key's digest; Unauthorized if none matches."""
    key = presented_key(headers)
    if key is None:
        raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key")
    return _lookup(key, lookups, Unauthorized)


def monitor_key(headers: Headers) -> str | None:
    """The key a monitoring page is sent: Basic's password, or as `authenticate` takes one."""
    return basic_password(headers) or presented_key(headers)


def authenticate_monitor(headers: Headers, lookups: Iterable[KeyLookup]) -> Principal:
    """For `access = "monitor"` endpoints: the admin principal of a key sent as Basic's password,
    or as `authenticate` takes one. BasicUnauthorized (401 with a Basic challenge) without a key
    or with an unknown one; Forbidden for a key that is not an admin's."""
    key = monitor_key(headers)
    if key is None:
        raise BasicUnauthorized("Send an admin key as the password of HTTP Basic auth (any user name) or as "
                                "'Authorization: Bearer <key>'.", code="missing_api_key")
    principal, _digest = _lookup(key, lookups, BasicUnauthorized)
    require_admin(principal)
    return principal


def _lookup(key: str, lookups: Iterable[KeyLookup], refusal: type[Unauthorized]) -> tuple[Principal, bytes]:
    digest = hashlib.sha256(key.encode("latin-1")).digest()
    for lookup in lookups:
        principal = lookup(digest)
        if principal is not None and hmac.compare_digest(principal.digest or digest, digest):
            return principal, digest
    raise refusal("Invalid API key.")


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise Forbidden("This key is not an admin key.", code="admin_required")
