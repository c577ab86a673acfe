"""JSON lines on stderr: one per request (the access log) and one per operational event.

journald stamps time itself, but files and pipes do not, so every line carries `time`. Access lines
are held and written together by `flush()`, which the idle work calls after each batch of deferred
bookkeeping (where they are made): one write() per batch instead of one per request (stderr is
unbuffered). An operational line is written at once, with any access lines held before it. Nothing
that could hold a secret is ever passed in: keys are logged by name, and neither headers nor
bodies are logged. Strings a client chose (its model name, its path) are cut to a fixed length.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any, BinaryIO

from hxgwd.errors import MAX_ECHOED, capped
from hxgwd.pipeline.record import RequestRecord, log_line

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# Operational events of one name (breaker_open, ...): a burst of this many lines, then one every
# EVENT_REFILL seconds; the lines held back are counted in the next one (`suppressed`). A storm
# (a backend of 200 deployments going down at once, a flapping breaker) cannot flood the journal.
EVENT_BURST = 20
EVENT_REFILL = 2.0
MAX_HELD = 256      # access lines held at most, should nothing call flush() for a while


class Logger:
    def __init__(self, out: BinaryIO | None = None, level: str = "info", access_log: bool = True) -> None:
        self._out = out if out is not None else sys.stderr.buffer
        self.level = LEVELS[level]
        self.access_log = access_log
        self.write_errors = 0
        self._stamp = _Stamps()
        self._held: list[bytes] = []     # access lines not yet written
        self._buckets: dict[str, list[float]] = {}   # event name -> [tokens, at, suppressed]
        self.tags: dict[str, Any] = {}   # in every line: a worker's {"worker": 1}

    def configure(self, level: str, access_log: bool) -> None:
        self.level = LEVELS[level]
        self.access_log = access_log

    def event(self, level: str, msg: str, **fields: Any) -> None:
        if LEVELS[level] < self.level:
            return
        self._write({"time": self._stamp(time.time()), "level": level, "msg": msg, **self.tags, **fields})

    def info(self, msg: str, **fields: Any) -> None:
        self.event("info", msg, **fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self.event("warning", msg, **fields)

    def error(self, msg: str, **fields: Any) -> None:
        self.event("error", msg, **fields)

    def limited(self, event: str, level: str, msg: str, **fields: Any) -> bool:
        """An operational event named `event`, within its rate (EVENT_BURST, EVENT_REFILL);
        False when held back (counted, and said in the next line of that name)."""
        now = time.monotonic()
        bucket = self._buckets.get(event)
        if bucket is None:
            bucket = self._buckets[event] = [float(EVENT_BURST), now, 0.0]
        bucket[0] = min(float(EVENT_BURST), bucket[0] + (now - bucket[1]) / EVENT_REFILL)
        bucket[1] = now
        if bucket[0] < 1.0:
            bucket[2] += 1
            return False
        bucket[0] -= 1.0
        if bucket[2]:
            fields["suppressed"] = int(bucket[2])
            bucket[2] = 0.0
        self.event(level, msg, event=event, **fields)
        return True

    def exception(self, msg: str, exc: BaseException) -> None:
        # the traceback goes to the operator's log only; clients get a fixed message
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.event("error", msg, exception=type(exc).__name__, traceback=tb)

    def access(self, record: RequestRecord) -> None:
        if self.access_log:
            fields = record.log_fields({"time": self._stamp(record.ts), "level": "info", "msg": "request", **self.tags})
            # The path and the model (body or X-HX-Model-Group) are as long as the client made them;
            # the request id is checked to 128 characters, the other strings come from the config.
            if len(record.endpoint) > MAX_ECHOED:
                fields["endpoint"] = capped(record.endpoint)
            if record.model is not None and len(record.model) > MAX_ECHOED:
                fields["model"] = capped(record.model)
            self._held.append(log_line(fields))
            if len(self._held) >= MAX_HELD:
                self.flush()

    def flush(self) -> None:
        """Write the access lines held so far."""
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            try:
                self._out.write(data)
                self._out.flush()
            except (OSError, ValueError):
                self.write_errors += 1   # a closed or full stderr must not take requests down

    def _write(self, fields: dict[str, Any]) -> None:
        self._held.append(log_line(fields))
        self.flush()


class _Stamps:
    """ISO times for log lines; strftime once a second, not once a line."""

    __slots__ = ("_whole", "_text")

    def __init__(self) -> None:
        self._whole, self._text = -1, ""

    def __call__(self, ts: float) -> str:
        whole = int(ts)
        if whole != self._whole:
            self._whole, self._text = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        return f"{self._text}.{int((ts - whole) * 1000):03d}Z"


def stderr_is_journal() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))
