"""TLS termination for client connections: the server context built from `[server] tls_cert` and
`tls_key` (checked when the config is compiled, so `--check-config`, the start and every SIGHUP
refuse files that are unreadable, do not match or are not valid now). The connections themselves
are `tls_stream.TLSStream`s; this module imports no trio, for `--check-config`'s sake.

The context is part of the runtime snapshot: a reload reads the files again, new connections get
the new certificate, and a connection keeps the context it was accepted with.
"""

from __future__ import annotations

import ssl
import time
from typing import Protocol


class Server(Protocol):
    """The settings TLS termination reads (the gateway's `[server]` table has them)."""

    @property
    def tls_cert(self) -> str | None: ...
    @property
    def tls_key(self) -> str | None: ...
    @property
    def tls_listen(self) -> tuple[str, ...]: ...


# Mozilla's "intermediate" configuration (ssl-config.mozilla.org): TLS 1.2 and 1.3, these suites
# for TLS 1.2, OpenSSL's default suites for TLS 1.3 (which are Mozilla's list), and the client's
# preference among them: all are strong, and a client without AES hardware knows to put ChaCha20
# first. The DHE suites stay unused: the ssl module loads DH parameters only from a file of the
# operator's (Mozilla's ffdhe2048), and a client with DHE but not ECDHE is hard to find.
MOZILLA_INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305")
EXPIRY_WARNING_DAYS = 14


class _EncryptedKey(Exception):
    """Raised by the password callback: hxgwd has no passphrase to give, and must not ask for one
    on a terminal (OpenSSL's default) or block the reload on it."""


def _refuse_password() -> bytes:
    raise _EncryptedKey()


def server_context(server: Server) -> tuple[ssl.SSLContext | None, list[str]]:
    """The context for TLS listeners, or None without tls_cert/tls_key; and every problem found,
    each naming its key path. Reads files: call it off the event loop."""
    if not server.tls_cert or not server.tls_key:   # one without the other is validate.py's problem
        return None, []
    problems = []
    for name in ("tls_cert", "tls_key"):
        path = getattr(server, name)
        try:
            with open(path, "rb"):    # load_cert_chain's OSError does not say which file it was
                pass
        except OSError as exc:
            problems.append(f"server.{name}: cannot read {path}: {exc.strerror}")
    if problems:
        return None, problems
    try:
        dates = certificate_dates(server.tls_cert)
    except ssl.SSLError:
        return None, [f"server.tls_cert: no PEM certificate in {server.tls_cert}"]
    if dates is not None:
        not_before, not_after = dates
        now = time.time()
        if now < not_before:
            problems.append(f"server.tls_cert: {server.tls_cert} is not valid before {_utc(not_before)}")
        if now > not_after:
            problems.append(f"server.tls_cert: {server.tls_cert} expired on {_utc(not_after)}")
    # as create_default_context(Purpose.CLIENT_AUTH) but for the system CAs it loads (9 ms), which
    # only serve to verify client certificates, and hxgwd asks for none
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(MOZILLA_INTERMEDIATE_CIPHERS)
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE      # Python sets it; Mozilla says off
    # OP_NO_COMPRESSION (CRIME) is among the defaults already; renegotiation asked for by a client
    # costs us a handshake each time and serves HTTP/1.1 nothing
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key, password=_refuse_password)
    except _EncryptedKey:
        problems.append(f"server.tls_key: {server.tls_key} is encrypted with a passphrase; hxgwd needs it "
                        "unencrypted (protect it with file permissions instead)")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problems.append(f"server.tls_key: {server.tls_key} is not the key of the certificate in {server.tls_cert}")
        else:
            problems.append(f"server.tls_key: cannot load {server.tls_key} with {server.tls_cert} "
                            f"({exc.reason or exc})")
    return (None if problems else context), problems


def certificate_dates(path: str) -> tuple[float, float] | None:
    """(notBefore, notAfter) of the first certificate in a PEM file, as Unix times; None where this
    Python cannot tell. ssl.SSLError if the file holds no certificate.

    The ssl module decodes a certificate file only through `_ssl._test_decode_cert`, private but
    present since Python 3.2 (the test suite uses it); `cryptography` is not a dependency, and
    running `openssl x509` is no option in a frozen binary. Should it go, the date checks are
    skipped and the rest (readable, a certificate, matching its key) still holds."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    decoded = decode(path)
    try:
        return ssl.cert_time_to_seconds(decoded["notBefore"]), ssl.cert_time_to_seconds(decoded["notAfter"])
    except (KeyError, ValueError):
        return None


def expiry_warnings(server: Server) -> list[str]:
    """A warning when the certificate expires within EXPIRY_WARNING_DAYS (--check-config, start)."""
    if not server.tls_cert:
        return []
    try:
        dates = certificate_dates(server.tls_cert)
    except (OSError, ssl.SSLError):     # an error of the config already
        return []
    now = time.time()
    if dates is None or not now < dates[1] < now + EXPIRY_WARNING_DAYS * 86400:
        return []
    days = int((dates[1] - now) // 86400)
    return [f"TLS certificate {server.tls_cert} (server.tls_cert) expires in {days} day(s), on "
            f"{_utc(dates[1])}: renew it and reload"]


def context_for(tls: ssl.SSLContext | None, server: Server, listen: str) -> ssl.SSLContext | None:
    """The context for a connection accepted on the listener bound for `listen` (an entry of
    server.listen), or None if that listener speaks plain HTTP."""
    if tls is None or (server.tls_listen and listen not in server.tls_listen):
        return None
    return tls


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
