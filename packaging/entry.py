"""PyInstaller entry point of the hxgwd binary.

PyInstaller runs this file as a script, so it cannot be hxgwd/__main__.py (relative imports):
it imports `main` absolutely. The frozen binary must behave exactly like the console script.

HXGWD_FROZEN_SELFTEST=1 (used by packaging/build-deb.sh, never by the daemon) imports the modules
that hxgwd only loads lazily (SQLite, PostgreSQL and Redis drivers), which static analysis cannot see,
and exits: a missing hidden import then fails the build instead of a production start.
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
    modules += ["trio", "h11", "httpx", "attrs", "tomli_w", "certifi", "sqlite3", "psycopg",
                "psycopg_pool", "coredis"]
    for name in modules:
        importlib.import_module(name)
    import certifi
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

    if psycopg.pq.__impl__ != "binary":          # the bundled libpq, not a system one via ctypes
        print(f"selftest: psycopg implementation is {psycopg.pq.__impl__!r}, want 'binary'", file=sys.stderr)
        return 1
    if not os.path.isfile(certifi.where()):
        print(f"selftest: CA bundle missing: {certifi.where()}", file=sys.stderr)
        return 1
    print(f"selftest: ok: {len(modules)} modules, libpq {psycopg.pq.version()}, "
          f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), {ssl.OPENSSL_VERSION}, "
          f"{cas} CAs from {paths.openssl_cafile}")
    return 0


if os.environ.get("HXGWD_FROZEN_SELFTEST") == "1" and getattr(sys, "frozen", False):
    sys.exit(selftest())

from hxgwd.__main__ import main  # noqa: E402

sys.exit(main())
