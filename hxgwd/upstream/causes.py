"""Why an upstream exchange failed, in words an operator greps for: `connect refused (ECONNREFUSED)`,
`connect timeout`, `tls: wrong version number`, `reset after 1234 bytes (ECONNRESET)`.

The client's answer never carries these (it gets a fixed message, errors.py); they go to the
access line's `cause` and to the breaker's events. Only the gateway's own words and errno or
OpenSSL reason names are used: a library's free text could quote anything, and is not kept.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl

_TLS_REASON = re.compile(r"TLS: ([A-Z0-9_]{3,})\b")
_ERRNO_NAME = re.compile(r"\b(E[A-Z0-9]{2,})\b")


def errno_name(number: int | None) -> str | None:
    return errno.errorcode.get(number) if number is not None and number > 0 else None


def connect_cause(exc: BaseException) -> str:
    """The cause of a failed connect (TCP, name lookup or TLS handshake)."""
    if isinstance(exc, socket.gaierror):
        return f"dns: {exc.strerror or 'lookup failed'}"
    if isinstance(exc, ssl.SSLError):
        return tls_cause(exc.reason or type(exc).__name__)
    if isinstance(exc, OSError):
        name = errno_name(exc.errno)
        if exc.errno == errno.ECONNREFUSED:
            return "connect refused (ECONNREFUSED)"
        return f"connect failed ({name or exc.strerror or type(exc).__name__})"
    # trio.BrokenResourceError from the TLS stream: "TLS: WRONG_VERSION_NUMBER"
    text = str(exc)
    match = _TLS_REASON.search(text)
    if match:
        return tls_cause(match.group(1))
    if text.startswith("TLS: "):      # no reason: OpenSSL saw the TCP end mid-handshake
        return "tls: closed during handshake"
    return f"connect failed ({broken_detail(exc) or 'connection broke'})"


def tls_cause(reason: str) -> str:
    """OpenSSL's reason name as text: WRONG_VERSION_NUMBER -> "tls: wrong version number"
    (what an https:// URL pointed at a plain-HTTP port gives)."""
    return "tls: " + reason.lower().replace("_", " ")


def broken_detail(exc: BaseException) -> str | None:
    """The errno name or TLS reason in a broken stream's message, if it has one."""
    text = str(exc)
    match = _TLS_REASON.search(text)
    if match:
        return tls_cause(match.group(1))
    match = _ERRNO_NAME.search(text)
    return match.group(1) if match else None


def reset_cause(received: int, exc: BaseException | None = None) -> str:
    detail = broken_detail(exc) if exc is not None else None
    return f"reset after {received} bytes" + (f" ({detail})" if detail else "")
