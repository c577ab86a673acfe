#!/usr/bin/env python3
"""How evenly two processes share the connections of one port: one inherited listening socket
(what hxgwd's supervisor and workers do) against one SO_REUSEPORT socket per process.

    listen_balance.py [--port 18613] [--conns 64,8] [--reps 3] [--duration 3] [--json FILE]
                      [--modes inherit-burst,inherit-one,reuseport] [--no-death]

Two bare trio processes answer every request with a fixed keep-alive response (no parsing beyond
counting request heads). Modes:

  inherit-burst  the parent binds and listens, the children inherit the socket and accept on it
                 the way hxgwd's accept loop does (http/listen.py): one readiness wait, then up to
                 64 non-blocking accept() calls without yielding
  inherit-one    the same socket, accepted by trio.serve_listeners: one accept per scheduler pass
  reuseport      each child binds its own SO_REUSEPORT socket; the kernel picks the socket by a
                 hash of the connection's addresses

For each mode, connection count (--conns) and repetition, wrk -t1 keeps that many keep-alive
connections busy for --duration seconds; then each child is stopped with SIGTERM and prints the
connections it accepted and the requests it answered. Then (unless --no-death) what happens to
connections queued in the kernel when one process dies: both children are stopped (SIGSTOP),
32 clients connect and send a request, child 0 is killed (SIGKILL), child 1 continued (SIGCONT),
and each client reports whether it got an answer, a reset or nothing. With one inherited socket
the queue belongs to the socket, which the parent (the supervisor) still holds; with reuseport,
a socket's queue dies with the last process holding it (unless net.ipv4.tcp_migrate_req = 1).

Every process this starts is stopped by pid before it exits; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys

RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
ACCEPT_BURST = 64          # as hxgwd/http/listen.py
BACKLOG = 1024
DEATH_CLIENTS = 32
MODES = ("inherit-burst", "inherit-one", "reuseport")


# --- the child: a bare keep-alive server that counts --------------------------------------------

def child_main(a: argparse.Namespace) -> int:
    import trio

    counts = {"conns": 0, "requests": 0}

    async def handle(stream) -> None:
        counts["conns"] += 1
        tail = b""
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                tail += data
                heads = tail.count(b"\r\n\r\n")     # wrk sends bodiless GETs: one head, one request
                if heads:
                    tail = tail[tail.rfind(b"\r\n\r\n") + 4:]
                    counts["requests"] += heads
                    await stream.send_all(RESPONSE * heads)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def accept_burst(sock: socket.socket, nursery) -> None:
        """hxgwd's accept loop, without its connection cap."""
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(ACCEPT_BURST):
                try:
                    conn, _addr = sock.accept()
                except BlockingIOError:
                    break
                nursery.start_soon(handle, trio.SocketStream(trio.socket.from_stdlib_socket(conn)))

    async def main() -> None:
        if a.fd is not None:
            sock = socket.socket(fileno=a.fd)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", a.port))
            sock.listen(BACKLOG)
        sock.setblocking(False)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                if a.accept == "one":
                    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                    nursery.start_soon(trio.serve_listeners, handle, [listener])
                else:
                    nursery.start_soon(accept_burst, sock, nursery)
                print("ready", flush=True)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
        print(json.dumps({"index": a.index, "pid": os.getpid(), **counts}), flush=True)

    trio.run(main)
    return 0


# --- the driver --------------------------------------------------------------------------------

def read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"pid {proc.pid}: no output within {timeout} s")
    return proc.stdout.readline().strip()


class Pair:
    """Two child servers on `port` in `mode`; the inherited socket, if any, stays open here, as the
    supervisor keeps its listeners."""

    def __init__(self, mode: str, port: int) -> None:
        self.listener: socket.socket | None = None
        self.procs: list[subprocess.Popen] = []
        base = [sys.executable, os.path.abspath(__file__), "--child", "--port", str(port),
                "--accept", "one" if mode == "inherit-one" else "burst"]
        if mode.startswith("inherit"):
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(("127.0.0.1", port))
            self.listener.listen(BACKLOG)
        try:
            for index in range(2):
                extra = ["--fd", str(self.listener.fileno())] if self.listener else []
                self.procs.append(subprocess.Popen(base + ["--index", str(index)] + extra, stdout=subprocess.PIPE,
                                                   text=True, pass_fds=[self.listener.fileno()] if self.listener else []))
            for proc in self.procs:
                if read_line(proc, 10) != "ready":
                    raise RuntimeError(f"child {proc.pid} did not start")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> list[dict]:
        """SIGTERM each child still running; -> the counts each printed."""
        counts = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)     # a stopped child would not see SIGTERM
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate(timeout=5)
            counts += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if self.listener is not None:
            self.listener.close()
        return counts


def wrk_get(port: int, conns: int, seconds: float) -> float:
    """wrk's req/s (plain keep-alive GETs)."""
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("Requests/sec:")))


def balance_run(mode: str, port: int, conns: int, seconds: float) -> dict:
    pair = Pair(mode, port)
    try:
        rps = wrk_get(port, conns, seconds)
    finally:
        counts = sorted(pair.stop(), key=lambda c: c["index"])
    return {"test": "balance", "mode": mode, "conns": conns, "rps": round(rps),
            "per_process": [{"conns": c["conns"], "requests": c["requests"]} for c in counts]}


def death_run(mode: str, port: int) -> dict:
    """Connections queued while both children are stopped; child 0 dies; what do the clients get?"""
    pair = Pair(mode, port)
    clients: list[socket.socket] = []
    outcome = {"answered": 0, "reset": 0, "closed": 0, "timeout": 0}
    try:
        for proc in pair.procs:
            proc.send_signal(signal.SIGSTOP)
        for _ in range(DEATH_CLIENTS):
            c = socket.create_connection(("127.0.0.1", port), timeout=2)   # the kernel completes it
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(c)
        pair.procs[0].kill()
        pair.procs[0].wait(timeout=5)
        pair.procs[1].send_signal(signal.SIGCONT)
        for c in clients:
            c.settimeout(3)
            try:
                data = c.recv(4096)
                outcome["answered" if data.startswith(b"HTTP/1.1 200") else "closed"] += 1
            except ConnectionResetError:
                outcome["reset"] += 1
            except socket.timeout:
                outcome["timeout"] += 1
    finally:
        for c in clients:
            c.close()
        survivor = pair.stop()
    return {"test": "death", "mode": mode, "clients": DEATH_CLIENTS, **outcome,
            "survivor_conns": sum(c["conns"] for c in survivor)}


def sysctl(name: str) -> str:
    try:
        return open("/proc/sys/" + name.replace(".", "/")).read().strip()
    except OSError:
        return "?"


def share_text(per: list[dict], what: str) -> str:
    values = [p[what] for p in per]
    total = sum(values) or 1
    return "/".join(str(v) for v in values) + f" ({max(values) / total:.0%} max)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--accept", choices=("burst", "one"), default="burst", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=int(os.environ.get("BENCH_BALANCE_PORT", "18613")))
    ap.add_argument("--conns", default="64,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-death", action="store_true")
    ap.add_argument("--json", help="append one JSON line per run to this file")
    a = ap.parse_args()
    if a.child:
        return child_main(a)
    probe = socket.socket()
    if probe.connect_ex(("127.0.0.1", a.port)) == 0:
        raise SystemExit(f"port {a.port} is in use (--port)")
    probe.close()
    modes = [m for m in a.modes.split(",") if m]
    conns = [int(c) for c in a.conns.split(",")]
    print(f"# listen_balance: 2 processes, wrk -t1 keep-alive {a.duration:g} s per run; "
          f"net.ipv4.tcp_migrate_req = {sysctl('net.ipv4.tcp_migrate_req')}", flush=True)
    results = []
    for n in conns:
        for rep in range(a.reps):
            for mode in modes:          # modes alternate, so drift hits each the same
                r = balance_run(mode, a.port, n, a.duration)
                r["rep"] = rep + 1
                results.append(r)
                print(f"balance {mode:13s} -c{n:<3d} rep {rep + 1}: {r['rps']:6d} req/s  connections "
                      f"{share_text(r['per_process'], 'conns'):16s} requests {share_text(r['per_process'], 'requests')}",
                      flush=True)
    if not a.no_death:
        for mode in modes:
            r = death_run(mode, a.port)
            results.append(r)
            print(f"death   {mode:13s} {r['clients']} queued, child 0 killed: answered {r['answered']}, "
                  f"reset {r['reset']}, closed {r['closed']}, timeout {r['timeout']}", flush=True)
    if a.json:
        with open(a.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
