"""TLS termination for client connections: the server context built from `[server] tls_cert` and
`tls_key` (checked when the config is compiled, so `--check-config`, the start and every SIGHUP
refuse files that are unreadable, do not match or are not valid now), and `TLSStream`, a TLS
connection behind the calls of `SocketIO` that `HttpConnection` makes.

The context is part of the runtime snapshot: a reload reads the files again, new connections get
the new certificate, and a connection keeps the context it was accepted with.
"""

from __future__ import annotations

import math
import socket
import ssl
import time

import trio

from hxgwd.config.model import Server

# Mozilla's "intermediate" configuration (ssl-config.mozilla.org, version 5.7): TLS 1.2 and 1.3,
# these suites for TLS 1.2, OpenSSL's default suites for TLS 1.3 (which are Mozilla's list), and
# the client's preference among them: all are strong, and a client without AES hardware knows to
# put ChaCha20 first.
MOZILLA_INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305")
EXPIRY_WARNING_DAYS = 14
# The most a TLS write hands to trio's SSLStream at once: with a stall timeout, the deadline moves
# after each slice, as SocketIO moves it each time the peer takes some.
SEND_SLICE = 65536


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
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
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


def expiry_warnings(server: Server, now: float | None = None) -> list[str]:
    """A warning when the certificate expires within EXPIRY_WARNING_DAYS (--check-config, start)."""
    if not server.tls_cert:
        return []
    try:
        dates = certificate_dates(server.tls_cert)
    except (OSError, ssl.SSLError):     # an error of the config already
        return []
    now = time.time() if now is None else now
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


class TLSStream:
    """trio's SSLStream behind the calls of SocketIO (deadlines as numbers), for HttpConnection.

    The handshake happens in the first receive, the reader task's: so it falls under the deadline
    of the connection's first request head (header_timeout from the connect), and a client that
    connects and never finishes it holds its slot no longer than one that sends nothing.
    `socket` is the TCP socket under it (peer address, shutdown before a linger)."""

    __slots__ = ("tls", "socket")

    def __init__(self, tls: trio.SSLStream, sock: socket.socket) -> None:
        self.tls = tls
        self.socket = sock

    @classmethod
    def server(cls, sock: socket.socket, context: ssl.SSLContext) -> "TLSStream":
        """The server side of an accepted connection. https_compatible: clients close without
        TLS's close_notify as often as not, and HTTP/1.1 never needs it to find the end of a
        request, so such an end is an end (b""), not an error."""
        transport = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        return cls(trio.SSLStream(transport, context, server_side=True, https_compatible=True), sock)

    async def send_all(self, data: bytes, deadline: float = math.inf, *, stall_timeout: float | None = None) -> None:
        with trio.CancelScope(deadline=deadline) as scope:
            if stall_timeout is None or len(data) <= SEND_SLICE:
                await self.tls.send_all(data)
            else:
                view = memoryview(data)
                for start in range(0, len(view), SEND_SLICE):
                    await self.tls.send_all(view[start:start + SEND_SLICE])
                    scope.deadline = trio.current_time() + stall_timeout
        if scope.cancelled_caught:
            raise trio.TooSlowError()

    async def receive_some(self, max_bytes: int, deadline: float = math.inf, *, wait_first: bool = False) -> bytes:
        """`wait_first` is moot: SSLStream knows what it holds decrypted already."""
        if deadline == math.inf:
            return await self.tls.receive_some(max_bytes)
        with trio.CancelScope(deadline=deadline):
            return await self.tls.receive_some(max_bytes)
        raise trio.TooSlowError()

    def receive_now(self, max_bytes: int) -> None:
        """Always "nothing now": bytes must be decrypted through SSLStream, which may also have to
        send on the way and so is async; HttpConnection then lets its reader task take them."""
        return None

    def has_pending(self) -> bool:
        """Whether anything waits on the socket (bytes, the end, a reset), without taking it."""
        try:
            self.socket.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True

    def close(self) -> None:
        """At once, without awaiting, so without TLS's close_notify (as SocketIO.close)."""
        if self.socket.fileno() >= 0:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
