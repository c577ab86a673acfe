#!/usr/bin/env python3
"""Hostile and unlucky clients for bench/soak/run.sh, for SECONDS, plus a legitimate canary:

    clients.py PORT SECONDS [THREADS] [--only NAME,...] [--max-connections N]

Every attack runs in its own thread(s), loopback only, with a bounded number of connections and
of bytes, and stops by itself SECONDS after the start (a request still running then is cut and
counted as "cut at the end"). At the end one line per attack: its outcomes (HTTP status, or
reset / closed / timeout / refused) as JSON, and the canary's latencies. Attacks (NAME):

  chaos      THREADS (6) threads of the original mix: hang-ups mid-stream, resets while the
             upstream thinks (50 ms model), slow readers, slowloris heads, random bytes, a 50 MB
             Content-Length that never comes. Every socket has a 5 s timeout. Noise that does not
             start with a control byte (which the parser refuses at once) is a head that never
             ends, answered 408 after header_timeout (10 s): those count as "noise (TimeoutError)".
  fanout     embeddings on fake-embed-prompt (a backend with embeddings_input = "prompt": one
             upstream call per item): 20,000 one-letter items (80 KB body, over the 2,048 cap:
             400 after the fix), one started every 10 s, and 2,048 items (at the cap: 200, a
             28 MB answer), one started every 5 s; each kind on its own thread, one request at a
             time, 60 s allowed each.
  huge       10-15 MB chat bodies (fake-model-py) and 8 MB embeddings bodies (fake-embed-py, 16
             items of 512 KB), with the key, alternately, one at a time, one started every 2 s.
  bigname    a chat request whose "model" is 1 MB long, with the key, one every 2 s.
  slowbody   48 keyless connections declaring Content-Length 10,000,000 and sending one byte every
             3 s; one that gets an answer or is closed is reopened 1 s later (at most 2,000 opens).
  idleflood  N+64 keep-alive connections (N = --max-connections, the gateway's; 256): each sends one
             request (keyless GET /healthz, or GET /v1/models with the key, alternately), reads
             the answer and then stays idle; one closed by the gateway is reopened 1 s later (at
             most 5,000 opens). Starts 2 s in, once wrk's connections are up.
  (slowbody and idleflood count a connection as held from its connect, also while it waits in
  the kernel's accept backlog: from the client's side the two cannot be told apart.)
  canary     legitimate: GET /healthz on a new connection every 100 ms, 2 s allowed each; prints
             p50/p99/max latency, failures and the 3 worst probes with their time from the start
             (target: p99 < 50 ms, 0 failures). It sees both a stalled event loop and connections
             left unaccepted.
  canary-ka  the same on one keep-alive connection opened at the start (a new one after a
             failure): sees a stalled event loop alone.
"""

from __future__ import annotations

import argparse
import json
import random
import selectors
import socket
import struct
import threading
import time
from typing import Callable

KEY = "sk-hx-bench"
HOST = "127.0.0.1"
STREAM = {"model": "fake-model-py", "messages": [{"role": "user", "content": "hi"}], "stream": True}
SLOW = {"model": "fake-model-delay", "messages": [{"role": "user", "content": "hi"}]}
WORDS = b"the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing frogs "

START = time.monotonic()
END = START + 240.0           # set in main()
MAX_OPENS_SLOW, MAX_OPENS_IDLE = 2_000, 5_000


class Stopped(Exception):
    """The soak ended while this exchange was still running."""


class TimedOut(Exception):
    """The exchange's own time allowance ran out."""


class Tally:
    """Outcome counts and timings of one attack, shared by its threads."""

    def __init__(self, name: str, time_label: str = "time") -> None:
        self.name = name
        self.time_label = time_label
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.seconds: dict[str, list[float]] = {}     # by group (a request kind), "" for one kind
        self.extra: dict[str, float] = {}

    def add(self, outcome: str, seconds: float | None = None, group: str = "") -> None:
        with self.lock:
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            if seconds is not None:
                self.seconds.setdefault(group, []).append(seconds)

    def peak(self, name: str, value: float) -> None:
        with self.lock:
            self.extra[name] = max(self.extra.get(name, value), value)

    def line(self) -> str:
        out = f"{self.name}: {json.dumps(dict(sorted(self.counts.items())))}"
        for group, seconds in sorted(self.seconds.items()):
            s = sorted(seconds)
            label = f"{group} {self.time_label}" if group else self.time_label
            out += f" | {label} p50={pct(s, 50):.2f}s max={s[-1]:.2f}s"
        for k, v in sorted(self.extra.items()):
            out += f" {k}={v:,.0f}" if v >= 10_000 else f" {k}={v:g}"
        return out


def pct(ordered: list[float], p: float) -> float:
    return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * p // 100) - 1))] if ordered else 0.0


def running() -> bool:
    return time.monotonic() < END


def pause(seconds: float) -> None:
    time.sleep(max(0.0, min(seconds, END - time.monotonic())))


def request(body: dict | bytes, path: str = "/v1/chat/completions", key: str | None = KEY,
            method: str = "POST") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: soak\r\n"
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    if method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return head.encode() + b"\r\n" + (data if method == "POST" else b"")


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


# --- one exchange with a deadline, for the big-request attacks and the canary ---------------------

def _wait(sock: socket.socket, deadline: float, what: str) -> None:
    now = time.monotonic()
    if now >= END:
        raise Stopped(what)
    if now >= deadline:
        raise TimedOut(what)
    sock.settimeout(max(0.005, min(0.5, deadline - now, END - now)))


def send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        _wait(sock, deadline, "send")
        try:
            view = view[sock.send(view[:1 << 20]):]
        except socket.timeout:
            pass


def recv_some(sock: socket.socket, deadline: float) -> bytes:
    while True:
        _wait(sock, deadline, "receive")
        try:
            return sock.recv(1 << 20)
        except socket.timeout:
            pass


def head_of(buf: bytes) -> tuple[str, dict[bytes, bytes], int] | None:
    """(status, headers, body offset) once the head is complete, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    status = parts[1].decode(errors="replace") if len(parts) > 1 else "bad status line"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, end + 4


def read_response(sock: socket.socket, deadline: float, first: bytes = b"") -> tuple[str, int]:
    """Reads one whole response, discarding its body: (status, body bytes)."""
    buf = first
    while (head := head_of(buf)) is None:
        if len(buf) > 1 << 20:
            return "head over 1 MB", len(buf)
        piece = recv_some(sock, deadline)
        if not piece:
            return ("closed before answering" if not buf else "closed mid-head"), 0
        buf += piece
    status, headers, offset = head
    got = len(buf) - offset
    if b"content-length" in headers:
        want = int(headers[b"content-length"])
        while got < want:
            piece = recv_some(sock, deadline)
            if not piece:
                return status + " (cut short)", got
            got += len(piece)
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        tail = buf[offset:][-7:]
        while not tail.endswith(b"0\r\n\r\n"):
            piece = recv_some(sock, deadline)
            if not piece:
                return status + " (cut short)", got
            got += len(piece)
            tail = (tail + piece)[-7:]
    return status, got


def exchange(port: int, data: bytes, allowed: float) -> tuple[str, float, int]:
    """One request on a new connection: (outcome, seconds, response body bytes)."""
    t0 = time.monotonic()
    deadline = t0 + allowed
    size = 0
    try:
        with socket.create_connection((HOST, port), timeout=min(5.0, allowed)) as sock:
            try:
                send_all(sock, data, deadline)
            except (BrokenPipeError, ConnectionResetError):
                # answered (and closed) before the whole body went: the answer may still be there
                try:
                    status, size = read_response(sock, deadline)
                    return status + " (before the whole body)", time.monotonic() - t0, size
                except OSError:
                    return "reset while sending", time.monotonic() - t0, 0
            status, size = read_response(sock, deadline)
            return status, time.monotonic() - t0, size
    except Stopped:
        return "cut at the end", time.monotonic() - t0, size
    except (TimedOut, socket.timeout):
        return "timeout", time.monotonic() - t0, size
    except ConnectionRefusedError:
        return "refused", time.monotonic() - t0, 0
    except ConnectionResetError:
        return "reset", time.monotonic() - t0, size
    except OSError as exc:
        return type(exc).__name__, time.monotonic() - t0, size


def paced(tally: Tally, every: float, make: Callable[[int], tuple[str, bytes, float]], port: int,
          max_requests: int = 10_000) -> None:
    """One request at a time, one started every `every` seconds (or when the last one ends)."""
    for i in range(max_requests):
        if not running():
            return
        t0 = time.monotonic()
        label, data, allowed = make(i)
        outcome, seconds, size = exchange(port, data, allowed)
        tally.add(f"{label} {outcome}", seconds if outcome[:1].isdigit() else None, label)
        tally.peak(f"{label}_max_answer_bytes", size)
        pause(t0 + every - time.monotonic())


# --- chaos: the original six ------------------------------------------------------------------------

def hang_up_mid_stream(sock: socket.socket) -> None:
    sock.sendall(request(STREAM))
    sock.recv(200)


def reset_while_waiting(sock: socket.socket) -> None:
    sock.sendall(request(SLOW))
    time.sleep(0.01)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST on close


def slow_reader(sock: socket.socket) -> None:
    sock.sendall(request(STREAM))
    for _ in range(5):
        sock.recv(64)
        time.sleep(0.05)


def slowloris(sock: socket.socket) -> None:
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\n")
    time.sleep(0.3)


def noise(sock: socket.socket) -> None:
    sock.sendall(random.randbytes(random.randint(1, 3000)))
    sock.recv(1000)


def body_that_never_comes(sock: socket.socket) -> None:
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Length: 50000000\r\n\r\n" + b"x" * 100_000)
    sock.recv(1000)


ACTS = [hang_up_mid_stream, reset_while_waiting, slow_reader, slowloris, noise, body_that_never_comes]


def chaos(port: int, tally: Tally) -> None:
    while running():
        act = random.choice(ACTS)
        name = act.__name__
        try:
            with connect(port) as sock:
                act(sock)
        except OSError as exc:      # the gateway closing on us is often the point
            name += f" ({type(exc).__name__})"
        tally.add(name)


# --- big requests: fan-out, huge bodies, a 1 MB model name -------------------------------------------

def fanout(port: int, tally: Tally) -> None:
    letters = "abcdefghijklmnopqrstuvwxyz"
    over = request({"model": "fake-embed-prompt", "input": [letters[i % 26] for i in range(20_000)]},
                   "/v1/embeddings")
    at_cap = request({"model": "fake-embed-prompt", "input": [f"item {i}" for i in range(2_048)]},
                     "/v1/embeddings")
    # two threads, so that a slow over-cap request cannot keep the at-cap ones from being tried
    legit = threading.Thread(target=paced, args=(tally, 5.0, lambda i: ("at-cap", at_cap, 60.0), port),
                             name="fanout at-cap", daemon=True)
    legit.start()
    paced(tally, 10.0, lambda i: ("over-cap", over, 60.0), port)
    legit.join(max(0.1, END + 10.0 - time.monotonic()))


def huge(port: int, tally: Tally) -> None:
    text = (WORDS * (15_000_000 // len(WORDS) + 1)).decode()
    item = text[:512 * 1024]
    embed = request({"model": "fake-embed-py", "input": [item] * 16}, "/v1/embeddings")   # 8 MB

    def make(i: int) -> tuple[str, bytes, float]:
        if i % 2:
            return "embed-8MB", embed, 60.0
        size = random.randint(10_000_000, 14_900_000)
        body = {"model": "fake-model-py", "max_tokens": 16,
                "messages": [{"role": "user", "content": text[:size]}]}
        return "chat-10-15MB", request(body), 60.0

    paced(tally, 2.0, make, port)


def bigname(port: int, tally: Tally) -> None:
    data = request({"model": "m" * (1 << 20), "messages": [{"role": "user", "content": "hi"}]})
    paced(tally, 2.0, lambda i: ("1MB-name", data, 30.0), port)


# --- connection holders: keyless slow bodies and the idle flood (one selector thread each) ---------

class Holder:
    """Keeps up to `slots` connections in a given state, on one thread, until the soak ends.

    A slot connects, sends `opening`, then: `drip` bytes every `drip_every` seconds (slow body), or
    waits for the answer to its request and then holds the connection idle (idle flood). An answer,
    a close or a reset ends the slot's connection (counted), and the slot reopens 1 s later, up to
    `max_opens` connections in all. At the end the connections still held are counted and closed.
    """

    def __init__(self, port: int, tally: Tally, slots: int, openings: list[bytes], max_opens: int,
                 drip_every: float | None, start_at: float) -> None:
        self.port, self.tally, self.slots = port, tally, slots
        self.openings, self.max_opens, self.drip_every = openings, max_opens, drip_every
        self.start_at = start_at
        self.opens = 0
        self.sel = selectors.DefaultSelector()
        self.conns: dict[socket.socket, dict] = {}
        self.reopen_at: list[float] = [start_at + i * 0.005 for i in range(slots)]

    def open_one(self) -> None:
        self.opens += 1
        t0 = time.monotonic()
        try:
            sock = socket.create_connection((HOST, self.port), timeout=2.0)
            sock.sendall(self.openings[self.opens % len(self.openings)])
            sock.setblocking(False)
        except OSError as exc:
            self.tally.add(f"open failed ({type(exc).__name__})")
            self.reopen_at.append(time.monotonic() + 1.0)
            return
        self.conns[sock] = {"t0": t0, "buf": b"", "answered": None, "next_drip": t0 + (self.drip_every or 0)}
        self.sel.register(sock, selectors.EVENT_READ)

    def finish(self, sock: socket.socket, outcome: str) -> None:
        state = self.conns.pop(sock)
        self.sel.unregister(sock)
        sock.close()
        held = time.monotonic() - (state["answered"] or state["t0"])
        self.tally.add(outcome, held)
        if running():
            self.reopen_at.append(time.monotonic() + 1.0)

    def readable(self, sock: socket.socket) -> None:
        state = self.conns[sock]
        try:
            piece = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            self.finish(sock, "reset" if state["answered"] is None else "reset while idle")
            return
        if not piece:
            self.finish(sock, "closed unanswered" if state["answered"] is None else "closed while idle")
            return
        if state["answered"] is not None:
            self.tally.add("bytes while idle")
            return
        state["buf"] += piece
        head = head_of(state["buf"])
        if head is None:
            return
        status, headers, offset = head
        want = int(headers.get(b"content-length", b"0"))
        if len(state["buf"]) - offset < want:
            return
        waited = time.monotonic() - state["t0"]
        self.tally.peak("max_wait_for_answer_s", round(waited, 3))
        if self.drip_every is not None:          # slow body: any answer ends it
            self.finish(sock, f"{status} after")
        else:                                    # idle flood: answered, now hold it
            self.tally.add(f"{status} answered")
            state["answered"] = time.monotonic()
            state["buf"] = b""
            if headers.get(b"connection", b"").lower() == b"close":
                self.finish(sock, "closed after answering (Connection: close)")

    def run(self) -> None:
        while running():
            now = time.monotonic()
            due = [t for t in self.reopen_at if t <= now]
            self.reopen_at = [t for t in self.reopen_at if t > now]
            for _ in due:
                if self.opens < self.max_opens and len(self.conns) < self.slots and running():
                    self.open_one()
            if self.drip_every is not None:
                for sock, state in list(self.conns.items()):
                    if state["next_drip"] <= now:
                        state["next_drip"] = now + self.drip_every
                        try:
                            sock.send(b"x")
                        except (BlockingIOError, InterruptedError):
                            pass
                        except OSError as exc:
                            self.finish(sock, f"{type(exc).__name__} while dripping")
            for key, _ in self.sel.select(timeout=max(0.0, min(0.1, END - time.monotonic()))):
                if key.fileobj in self.conns:
                    self.readable(key.fileobj)        # type: ignore[arg-type]
            self.tally.peak("max_held", len(self.conns))
        for sock, state in list(self.conns.items()):
            held = time.monotonic() - (state["answered"] or state["t0"])
            answered = state["answered"] is not None or self.drip_every
            self.tally.add("held to the end" if answered else "unanswered at the end", held)
            self.sel.unregister(sock)
            sock.close()
        self.conns.clear()
        self.tally.peak("opened", self.opens)


def slowbody(port: int, tally: Tally) -> None:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\n\r\n{")
    Holder(port, tally, 48, [head], MAX_OPENS_SLOW, 3.0, time.monotonic()).run()


def idleflood(port: int, tally: Tally, max_connections: int) -> None:
    openings = [request(b"", "/healthz", key=None, method="GET"), request(b"", "/v1/models", method="GET")]
    Holder(port, tally, max_connections + 64, openings, MAX_OPENS_IDLE, None, time.monotonic() + 2.0).run()


# --- the canary --------------------------------------------------------------------------------------

HEALTHZ = request(b"", "/healthz", key=None, method="GET")


def canary(port: int, tally: Tally) -> None:
    """A new client every 100 ms: sees both a stalled event loop and connections not accepted."""
    tick = time.monotonic()
    while running():
        outcome, seconds, _ = exchange(port, HEALTHZ, 2.0)
        if outcome == "cut at the end":
            break
        tally.add(outcome, seconds, group=f"{time.monotonic() - seconds - START:.1f}")
        tick = max(tick + 0.1, time.monotonic())
        pause(tick - time.monotonic())


def canary_keepalive(port: int, tally: Tally) -> None:
    """One keep-alive connection, opened before the floods, asking every 100 ms: sees a stalled
    event loop alone. A failed probe closes the connection and the next one opens a new one."""
    sock: socket.socket | None = None
    tick = time.monotonic()
    while running():
        t0 = time.monotonic()
        try:
            if sock is None:
                sock = socket.create_connection((HOST, port), timeout=2.0)
                tally.peak("connections", tally.extra.get("connections", 0) + 1)
            send_all(sock, HEALTHZ, t0 + 2.0)
            outcome, _ = read_response(sock, t0 + 2.0)
        except Stopped:
            break
        except (TimedOut, socket.timeout):
            outcome = "timeout"
        except OSError as exc:
            outcome = type(exc).__name__
        if outcome != "200" and sock is not None:
            sock.close()
            sock = None
        tally.add(outcome, time.monotonic() - t0, group=f"{t0 - START:.1f}")
        tick = max(tick + 0.1, time.monotonic())
        pause(tick - time.monotonic())
    if sock is not None:
        sock.close()


def canary_line(tally: Tally, what: str) -> str:
    samples = [(sec, float(at)) for at, secs in tally.seconds.items() for sec in secs]
    s = sorted(sec for sec, _ in samples)
    failures = {k: v for k, v in sorted(tally.counts.items()) if k != "200"}
    worst = ", ".join(f"{sec * 1000:.0f}ms@{at:.0f}s" for sec, at in sorted(samples, reverse=True)[:3])
    extra = "".join(f" {k}={v:g}" for k, v in sorted(tally.extra.items()))
    return (f"{tally.name} /healthz ({what}, 2 s allowed): n={len(s)} failures={sum(failures.values())}"
            f" {json.dumps(failures)} p50={pct(s, 50) * 1000:.1f}ms p99={pct(s, 99) * 1000:.1f}ms"
            f" max={(s[-1] if s else 0) * 1000:.1f}ms; worst at (s from start): {worst or '-'}{extra}")


ATTACKS = ("chaos", "fanout", "huge", "bigname", "slowbody", "idleflood", "canary", "canary-ka")


def main() -> None:
    global END
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("port", type=int)
    ap.add_argument("seconds", type=float)
    ap.add_argument("threads", type=int, nargs="?", default=6, help="chaos threads (6)")
    ap.add_argument("--only", default=",".join(ATTACKS),
                    help="comma-separated attacks to run (default: all)")
    ap.add_argument("--max-connections", type=int, default=256, help="the gateway's max_connections")
    a = ap.parse_args()
    END = time.monotonic() + a.seconds
    wanted = a.only.split(",")
    unknown = set(wanted) - set(ATTACKS)
    if unknown:
        ap.error(f"unknown attack(s): {', '.join(sorted(unknown))}")
    plan: list[tuple[str, Callable[..., None], tuple, int]] = [
        ("chaos", chaos, (), a.threads), ("fanout", fanout, (), 1), ("huge", huge, (), 1),
        ("bigname", bigname, (), 1), ("slowbody", slowbody, (), 1),
        ("idleflood", idleflood, (a.max_connections,), 1), ("canary", canary, (), 1),
        ("canary-ka", canary_keepalive, (), 1)]
    tallies = {name: Tally(name, "held" if name in ("slowbody", "idleflood") else "time")
               for name, *_ in plan}
    pool = [threading.Thread(target=fn, args=(a.port, tallies[name], *args), name=name, daemon=True)
            for name, fn, args, n in plan if name in wanted for _ in range(n)]
    for t in pool:
        t.start()
    for t in pool:     # every thread ends by itself by END + a few seconds; never wait for long
        t.join(max(0.1, END + 15.0 - time.monotonic()))
    stuck = [t.name for t in pool if t.is_alive()]
    for name in [n for n in tallies if n in wanted]:
        print(canary_line(tallies[name], "a new connection every 100 ms") if name == "canary"
              else canary_line(tallies[name], "one keep-alive connection, every 100 ms") if name == "canary-ka"
              else tallies[name].line())
    if stuck:
        print(f"still running after the end + 15 s (abandoned): {', '.join(stuck)}")


if __name__ == "__main__":
    main()
