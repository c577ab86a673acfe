#!/usr/bin/env python3
"""Hostile and unlucky clients for bench/soak/run.sh, for SECONDS, on THREADS threads:

    clients.py PORT SECONDS [THREADS]

hang-ups mid-stream, resets while the upstream is still thinking (50 ms model), slow readers of
a stream, slowloris heads, random bytes, a 50 MB Content-Length that never comes. Prints how many
of each ran, as JSON. Loopback only; every socket has a 5 s timeout. Noise that does not start
with a control byte (which h11 refuses at once) is a head that never ends, answered 408 after
header_timeout (10 s): those count as "noise (TimeoutError)".
"""

from __future__ import annotations

import json
import random
import socket
import struct
import sys
import threading
import time

KEY = "sk-hx-bench"
STREAM = {"model": "fake-model-py", "messages": [{"role": "user", "content": "hi"}], "stream": True}
SLOW = {"model": "fake-model-delay", "messages": [{"role": "user", "content": "hi"}]}


def request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(data)).encode()
            + b"\r\n\r\n" + data)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(5)
    return sock


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


def main() -> None:
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    end = time.monotonic() + seconds
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def worker() -> None:
        while time.monotonic() < end:
            act = random.choice(ACTS)
            name = act.__name__
            try:
                with connect(port) as sock:
                    act(sock)
            except OSError as exc:      # the gateway closing on us is often the point
                name += f" ({type(exc).__name__})"
            with lock:
                counts[name] = counts.get(name, 0) + 1

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    print(json.dumps(dict(sorted(counts.items()))))


if __name__ == "__main__":
    main()
