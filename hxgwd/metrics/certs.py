"""The served certificate's expiry, for an alert before it lapses. The standard library has no
certificate parser for a file (ssl only decodes a peer's), so this walks the DER just far enough:
Certificate -> TBSCertificate -> Validity -> notAfter. Read once per config generation, since the
certificate is re-read only on a reload."""

from __future__ import annotations

import base64
import calendar
import re
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hxgwd.runtime import Runtime

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
_cache: dict[str, tuple[int, float | None]] = {}     # tls_cert path -> (generation, expiry)


def expiry(rt: Runtime) -> float | None:
    """Unix time the leaf certificate of `[server] tls_cert` expires; None without TLS or when unreadable."""
    path = rt.config.server.tls_cert
    if path is None or rt.tls is None:
        return None
    cached = _cache.get(path)
    if cached is not None and cached[0] == rt.generation:
        return cached[1]
    try:
        with open(path, "rb") as f:
            found = _PEM.search(f.read())
        value = not_after(base64.b64decode(found.group(1))) if found else None
    except (OSError, ValueError, IndexError):
        value = None
    _cache[path] = (rt.generation, value)
    return value


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at `at`."""
    tag, size = der[at], der[at + 1]
    at += 2
    if size & 0x80:
        n = size & 0x7F
        size = int.from_bytes(der[at:at + n], "big")
        at += n
    return tag, at, at + size


def not_after(der: bytes) -> float:
    _, cert, _ = _tlv(der, 0)
    _, at, _ = _tlv(der, cert)            # TBSCertificate
    tag, _, end = _tlv(der, at)
    if tag == 0xA0:                       # [0] version
        at = end
    for _ in range(3):                    # serialNumber, signature, issuer
        at = _tlv(der, at)[2]
    _, validity, _ = _tlv(der, at)
    at = _tlv(der, validity)[2]           # notBefore
    tag, start, end = _tlv(der, at)
    text = der[start:end].decode("ascii")
    if tag == 0x17:                       # UTCTime: YYMMDDHHMMSSZ, 1950-2049
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:                     # GeneralizedTime: YYYYMMDDHHMMSSZ
        raise ValueError("not a time")
    return float(calendar.timegm(time.strptime(text[:14], "%Y%m%d%H%M%S")))
