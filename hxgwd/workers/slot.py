"""A worker slot as the supervisor keeps it: the process in it now, its deaths and backoff
(RESTART_MIN doubling to RESTART_MAX, back to RESTART_MIN after STABLE_AFTER of serving; CRASH_LOOP
deaths within CRASH_WINDOW are a crash loop), and how a worker is started and its end described.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import deque
from typing import Any

import attrs
import trio

from hxgwd.workers.channel import Peer, PeerGone

RESTART_MIN = 0.5
RESTART_MAX = 30.0
STABLE_AFTER = 60.0        # a worker that served this long starts the backoff over
CRASH_LOOP = 5             # deaths within CRASH_WINDOW seconds: a crash loop
CRASH_WINDOW = 60.0


@attrs.define(eq=False)
class Slot:
    index: int
    pid: int | None = None
    peer: Peer | None = None
    generation: int = 0
    serving: bool = False
    serving_since: float = 0.0
    restarts: int = 0
    last_exit: str | None = None
    backoff: float = RESTART_MIN
    deaths: deque[float] = attrs.field(factory=lambda: deque(maxlen=CRASH_LOOP))
    looping: bool = False

    def died(self, cause: str, now: float) -> float:
        """Count a death at `now` (monotonic seconds); -> how long to wait before the restart."""
        self.last_exit, self.serving = cause, False
        if self.serving_since and now - self.serving_since >= STABLE_AFTER:
            self.backoff = RESTART_MIN
        self.deaths.append(now)
        self.looping = len(self.deaths) == CRASH_LOOP and now - self.deaths[0] <= CRASH_WINDOW
        self.restarts += 1
        wait, self.backoff = self.backoff, min(RESTART_MAX, self.backoff * 2)
        return wait

    def crash_looping(self) -> bool:
        """From CRASH_LOOP deaths within CRASH_WINDOW until it has served STABLE_AFTER again
        (`looping` is only worked out when it dies)."""
        return self.looping and not (self.serving and time.monotonic() - self.serving_since >= STABLE_AFTER)

    def summary(self) -> dict[str, Any]:
        return {"worker": self.index, "pid": self.pid, "serving": self.serving, "generation": self.generation,
                "restarts": self.restarts, "last_exit": self.last_exit, "crash_loop": self.crash_looping()}


class StartFailed(Exception):
    def __init__(self, index: int, status: int) -> None:
        super().__init__(f"worker {index} exited with status {status} before serving")
        self.status = status


def worker_command(config_path: str, index: int, control_fd: int) -> list[str]:
    """The same program as this one (the PyInstaller binary, or this Python with -m hxgwd)."""
    program = [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "hxgwd"]
    return program + ["--config", config_path, "--worker", f"{index}:{control_fd}"]


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def describe_error(exc: Any) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "no answer in time"
    if isinstance(exc, PeerGone):
        return "it stopped"
    return f"{type(exc).__name__}: {exc}"[:300]
