"""Throwaway PostgreSQL and Redis servers on free loopback ports, started by the tests themselves.

    pg = PostgresServer.start(); pg.dsn; pg.stop(); pg.restart(); pg.close()
    rd = RedisServer.start(); rd.url; rd.stop(); rd.restart(); rd.close()

`stop()` / `restart()` keep the data directory and the port, for outage tests. Session fixtures
`pg_server` and `redis_server` (conftest.py) skip their tests when the server binaries are missing;
.ci/run installs them (postgresql, redis-server).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bindir() -> str | None:
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(bindir, "initdb")):
            return bindir
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


class PostgresServer:
    def __init__(self, bindir: str, base: str, port: int, as_user: list[str]) -> None:
        self.bindir, self.base, self.port, self._as_user = bindir, base, port, as_user

    @classmethod
    def available(cls) -> bool:
        return _pg_bindir() is not None

    @classmethod
    def start(cls) -> "PostgresServer":
        bindir = _pg_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        base = tempfile.mkdtemp(prefix="hxgwd-pg-")   # not under /tmp/pytest-of-root: that is 0700
        as_user: list[str] = []
        if os.geteuid() == 0:                        # initdb and postgres refuse to run as root
            pw = pwd.getpwnam("postgres")
            os.chown(base, pw.pw_uid, pw.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        server = cls(bindir, base, free_port(), as_user)
        subprocess.run(as_user + [f"{bindir}/initdb", "-D", f"{base}/data", "-A", "trust", "-U", "postgres",
                                  "-E", "UTF8", "--no-sync", "--no-instructions"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server._ctl("start")
        return server

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, action: str) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        args = [f"{self.bindir}/pg_ctl", "-D", f"{self.base}/data", "-l", f"{self.base}/server.log", "-w",
                "-t", "30"]
        if action == "start":
            args += ["-o", opts, "start"]
        else:
            args += ["-m", "immediate", "stop"]
        subprocess.run(self._as_user + args, check=action == "start",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        self._ctl("stop")

    def restart(self) -> None:
        self._ctl("start")

    def close(self) -> None:
        self._ctl("stop")
        shutil.rmtree(self.base, ignore_errors=True)


class RedisServer:
    def __init__(self, base: str, port: int) -> None:
        self.base, self.port = base, port
        self.proc: subprocess.Popen | None = None

    @classmethod
    def available(cls) -> bool:
        return shutil.which("redis-server") is not None

    @classmethod
    def start(cls) -> "RedisServer":
        server = cls(tempfile.mkdtemp(prefix="hxgwd-redis-"), free_port())
        server.restart()
        return server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def restart(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.base, "--logfile", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited at start")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
