"""PyInstaller entry point of the hxgwd binary.

PyInstaller runs this file as a script, so it cannot be hxgwd/__main__.py (relative imports):
it imports `main` absolutely. The frozen binary must behave exactly like the console script.

HXGWD_FROZEN_SELFTEST=1 (used by packaging/build-deb.sh, never by the daemon) imports the modules
that hxgwd only loads lazily (SQLite, PostgreSQL and Redis drivers, the httptools parser), which
static analysis cannot see, parses a request and a response with httptools' C parser, and exits: a
missing hidden import then fails the build instead of a production start.
"""

import os
import sys


def selftest() -> int:
    import importlib

    import pkgutil

    import hxgwd

    # every module of hxgwd (a new third-party import missing from the build venv fails here),
    # then the libraries it loads lazily
    modules = [m.name for m in pkgutil.walk_packages(hxgwd.__path__, "hxgwd.")]
    modules += ["trio", "h11", "httptools", "httptools.parser.parser", "httptools.parser.url_parser",
                "httpx", "attrs", "tomli_w", "certifi", "sqlite3", "psycopg", "psycopg_pool", "coredis"]
    for name in modules:
        importlib.import_module(name)
    import certifi
    import httptools
    import psycopg
    import ssl

    # hxgwd verifies backends with ssl.create_default_context(): the bundled OpenSSL must find
    # the system's CA store (/usr/lib/ssl -> /etc/ssl/certs on Debian), not a build-host path.
    paths = ssl.get_default_verify_paths()
    cas = ssl.create_default_context().cert_store_stats()["x509_ca"]
    if not cas:
        print(f"selftest: no CA certificates found at {paths.openssl_cafile} / {paths.openssl_capath}",
              file=sys.stderr)
        return 1

    # the default HTTP parser is the bundled llhttp (httptools), not the h11 fallback
    from hxgwd.http import resolve_parser
    if resolve_parser("auto") != "httptools":
        print(f"selftest: [server] http_parser = auto resolves to {resolve_parser('auto')!r}, want "
              "'httptools' (httptools not bundled?)", file=sys.stderr)
        return 1
    parsed = _parse_with_httptools()
    if parsed != ("POST", b"/v1/chat/completions", b"{}", 200, b"ok"):
        print(f"selftest: httptools parsed {parsed!r}", file=sys.stderr)
        return 1

    if psycopg.pq.__impl__ != "binary":          # the bundled libpq, not a system one via ctypes
        print(f"selftest: psycopg implementation is {psycopg.pq.__impl__!r}, want 'binary'", file=sys.stderr)
        return 1
    if not os.path.isfile(certifi.where()):
        print(f"selftest: CA bundle missing: {certifi.where()}", file=sys.stderr)
        return 1
    print(f"selftest: ok: {len(modules)} modules, libpq {psycopg.pq.version()}, "
          f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), httptools {httptools.__version__} "
          f"(llhttp), {ssl.OPENSSL_VERSION}, {cas} CAs from {paths.openssl_cafile}")
    return 0


def _parse_with_httptools() -> tuple:
    """A request and a response through httptools' C parsers (llhttp), as hxgwd uses them."""
    import httptools

    class Sink:
        def __init__(self) -> None:
            self.url, self.body, self.done = b"", b"", False

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.done = True

    req, resp = Sink(), Sink()
    p = httptools.HttpRequestParser(req)
    p.feed_data(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    method = p.get_method().decode()
    r = httptools.HttpResponseParser(resp)
    r.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    if not (req.done and resp.done):
        return ("incomplete", req.done, resp.done)
    return (method, req.url, req.body, r.get_status_code(), resp.body)


if os.environ.get("HXGWD_FROZEN_SELFTEST") == "1" and getattr(sys, "frozen", False):
    sys.exit(selftest())

from hxgwd.__main__ import main  # noqa: E402

sys.exit(main())
