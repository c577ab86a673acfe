"""systemd's notify protocol in a few lines of Python: one datagram to $NOTIFY_SOCKET.

Without NOTIFY_SOCKET (not under systemd, or Type=simple) every call does nothing. Under a
PyInstaller onefile binary the message comes from the child process, so the unit needs
NotifyAccess=all.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*lines: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":              # abstract namespace
        address = "\0" + address[1:]
    elif address[0] != "/":            # vsock and the like: not ours to handle
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError:
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000   # required by Type=notify-reload
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading configuration")


def stopping(status: str = "draining connections") -> bool:
    return notify("STOPPING=1", f"STATUS={status}")
