"""The local spool: the journal of usage records, on disk, append-only, until the store has them.

    <spool_dir>/usage-0000000042.jsonl    one record per line; the highest number is active
    <spool_dir>/.lock                     flock: one gateway process per spool directory

Every finished request's record is appended to the active segment (`journal`), and the segment
counts it as pending until the writer `settle`s it: stored, or not (then the segment is marked
for replay). Records the store did not get from memory and that were not journaled (over the
bound when they came) are appended too, marking the segment for replay. The writer seals the
active segment (fsync, close) every second or `segment_bytes`; a sealed segment with nothing
pending is deleted if its records are all stored, else replayed, oldest first, and deleted once
all its records are in the store. Segments found at open (an earlier run's, or the old default
directory's, taken over) are replayed whole: the store ignores request ids it already has.

The active segment is a preallocated file (`posix_fallocate`, segment_bytes, grown by doubling
if a second's records overflow it) mapped shared into memory, and an append is a copy into the
mapping from the event loop thread: the page cache, no system call per record (`os.write` on an
O_APPEND fd cost ~7.5 µs per request in a running daemon, the copy well under one). The kernel
owns the dirty pages, so a killed process loses nothing already copied. Preallocated rather than
sparse: a full disk then fails the segment's creation (an OSError: records stay in memory), not
a page fault of the copy (SIGBUS). JSON lines never hold a raw NUL, and the preallocated rest of
a segment reads as NULs: a segment is cut to its data when sealed or closed, and one an earlier
run left unsealed (killed) at open; `read` takes NULs as line ends too, so a segment written
back only in part before a power cut still yields every whole line. `fsync` of the fd (the slow
part; on Linux it writes back pages dirtied through a shared mapping as any others) always runs
in a worker thread, under a trio lock so that a segment is never closed while its fsync runs.
How often is the caller's policy (usage.py). A torn line (a power cut, or a process killed
mid-copy: a request that had not finished) fails to parse on replay and is counted as corrupt,
not retried.

The spool is bounded by `max_bytes`: beyond it records are not journaled, and dropped and counted
if they must be appended, with a warning at 80% and an error at the bound (repeated at most every
10 s while dropping), so the disk of a host whose database is gone for days does not fill up.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import time
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from hxgwd.logs import Logger


_NAME = re.compile(r"^usage-(\d{10})\.jsonl$")
_LINE_ENDS = re.compile(rb"[\n\x00]+")
WARN_FRACTION = 0.8
FULL_LOG_INTERVAL = 10.0


class SpoolError(Exception):
    pass


class Spool:
    def __init__(self, directory: str, max_bytes: int, log: Logger, segment_bytes: int | None = None,
                 adopt: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.adopt = adopt         # spool directories no process uses any more, whose segments become ours at open
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or min(16 * 1024 * 1024, max(64 * 1024, max_bytes // 16))
        self.log = log
        self.bytes = 0             # all segments, the active one included
        self.dropped = 0           # records refused: over max_bytes, or a failed write
        self.last_error: str | None = None
        self._sizes: dict[str, int] = {}   # segment path -> bytes
        self._pending: dict[str, int] = {}  # segment path -> journaled records not yet settled
        self._replay: set[str] = set()      # segments holding records the store has not got
        self._to_sync: set[str] = set()     # sealed segments marked for replay since: fsync them
        self._warn_bytes = max_bytes * WARN_FRACTION
        self._seq = 0
        self._active: str | None = None
        self._fd: int | None = None
        self._map: mmap.mmap | None = None   # the active segment, mapped: its first _sizes[_active] bytes are data
        self._cap = 0                        # ... and its file's (preallocated) size
        self._lock_fd: int | None = None
        self._unsynced = False
        self._new_file = False     # the directory entry of a new segment needs an fsync too
        self._sync_lock = trio.Lock()
        self._level = "ok"         # ok / warn / full: log on transitions only
        self._full_logged = 0.0

    # --- opening and closing (blocking: from a worker thread, or at shutdown) -------------------

    @property
    def opened(self) -> bool:
        return self._lock_fd is not None

    def open(self) -> None:
        """Create the directory (0750), take its lock, and account for segments left by earlier runs."""
        if self.opened:
            return
        try:
            os.makedirs(self.directory, mode=0o750, exist_ok=True)
            lock_fd = os.open(os.path.join(self.directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            raise SpoolError(f"spool directory {self.directory} is unusable: {exc.strerror or exc}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise SpoolError(f"spool directory {self.directory} is in use by another hxgwd process") from None
        self._lock_fd = lock_fd
        for name in os.listdir(self.directory):
            match = _NAME.match(name)
            if match:
                path = os.path.join(self.directory, name)
                self._sizes[path] = _cut_to_data(path)
                self._replay.add(path)   # an earlier run's: replayed whole (the store skips what it has)
                self._seq = max(self._seq, int(match.group(1)))
        for old in self.adopt:
            if os.path.isdir(old) and os.path.abspath(old) != os.path.abspath(self.directory):
                self._adopt(old)
        self.bytes = sum(self._sizes.values())
        self._check_level(0)

    def _adopt(self, old: str) -> None:
        """Move the segments of an old spool directory into this one, to be replayed, unless a
        process (an hxgwd not yet upgraded) holds it. Blocking, at open."""
        try:
            lock_fd = os.open(os.path.join(old, ".lock"), os.O_RDWR)
        except OSError:
            lock_fd = None      # no lock file: no hxgwd ever ran there, or it is not ours to take
        try:
            if lock_fd is not None:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            names = sorted(n for n in os.listdir(old) if _NAME.match(n))
            for name in names:
                self._seq += 1
                path = os.path.join(self.directory, f"usage-{self._seq:010d}.jsonl")
                os.rename(os.path.join(old, name), path)
                self._sizes[path] = _cut_to_data(path)
                self._replay.add(path)
            if names:
                self.log.info("usage spool of the old default directory taken over, to be replayed",
                              old_directory=old, directory=self.directory, segments=len(names))
        except BlockingIOError:
            self.log.warning("old default usage spool directory is in use by another process; left alone",
                             old_directory=old)
        except OSError as exc:
            self.log.error("cannot take over the old default usage spool directory", old_directory=old,
                           error=exc.strerror or str(exc))
        finally:
            if lock_fd is not None:
                os.close(lock_fd)

    def close(self, fsync: bool) -> None:
        if self._fd is not None:
            active = self._segment()[0]
            clean = self._settled_clean(active)
            if fsync and self._unsynced and not clean:
                self._fsync()
            self._unmap(cut=not clean)
            self._fd, self._active = None, None
            if clean:
                self.remove(active)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- the journal (event loop thread, on the request path) -----------------------------------

    def journal(self, line: bytes) -> str | None:
        """Write one finished request's record: -> the segment it is in, to `settle` once the
        record's fate is known; None if it could not be written (over max_bytes, the spool not
        opened, a failed write): the record then lives in memory only, as before the journal."""
        if self.bytes + len(line) > self.max_bytes or self._lock_fd is None:
            return None
        try:
            active = self._write(line)
        except OSError as exc:
            self.last_error = f"spool write failed: {exc.strerror}"
            return None
        except (ValueError, TypeError):   # the mapping closed under us (close() in a worker thread at shutdown)
            self.last_error = "spool write failed: the segment was closed"
            return None
        self._pending[active] = self._pending.get(active, 0) + 1
        if self.bytes >= self._warn_bytes:
            self._check_level(0)
        return active

    def settle(self, counts: dict[str, int], stored: bool) -> None:
        """Journaled records have reached the store (stored) or will not from memory (not stored:
        their segment is replayed). A sealed segment with nothing pending and nothing to replay
        is deleted."""
        for path, n in counts.items():
            left = self._pending.get(path, 0) - n
            if left > 0:
                self._pending[path] = left
            else:
                self._pending.pop(path, None)
            if not stored:
                self._replay.add(path)
                if path != self._active:
                    self._to_sync.add(path)
            if path != self._active and self._settled_clean(path):
                self.remove(path)

    def _settled_clean(self, path: str | None) -> bool:
        return path is not None and path not in self._pending and path not in self._replay

    def replay_waiting(self) -> bool:
        """Are there records the store has not got: in a sealed, settled segment (replay it now) or
        in the active one (replayed once it is sealed)."""
        return bool(self._replay) and (self._active in self._replay or bool(self.sealed()))

    # --- appending (event loop thread) ------------------------------------------------------------

    def append(self, lines: list[bytes]) -> int:
        """Write lines to the active segment; -> how many were written. The rest are dropped and
        counted: over max_bytes, or the write failed (disk full)."""
        if not self.opened:
            self.open()    # only when a record overflows before the writer ran: rare, small
        room, n = self.max_bytes - self.bytes, 0
        for line in lines:
            if len(line) > room:
                break
            room -= len(line)
            n += 1
        written = 0
        if n:
            data = b"".join(lines[:n]) if n > 1 else lines[0]
            try:
                segment = self._write(data)
                written = n
                self.last_error = None
                self._replay.add(segment)
            except (OSError, ValueError, TypeError) as exc:   # the last two: the mapping closed under us
                error = getattr(exc, "strerror", None) or str(exc)
                self.last_error = f"spool write failed: {error}"
                self.log.error("cannot write the usage spool", directory=self.directory, error=error)
        dropped = len(lines) - written
        self.dropped += dropped
        self._check_level(dropped)
        return written

    def _write(self, data: bytes) -> str:
        """-> the segment written to."""
        if self._fd is None:
            self._new_segment(max(self.segment_bytes, len(data)))
        active, fd, mapped = self._segment()
        start = self._sizes[active]
        end = start + len(data)
        if end > self._cap:
            self._grow(fd, mapped, end)
        mapped[start:end] = data        # into the page cache: the kernel owns it from here
        self._sizes[active] = end
        self.bytes += len(data)
        self._unsynced = True
        return active

    def _segment(self) -> tuple[str, int, mmap.mmap]:
        """The active segment: its path, descriptor and mapping. ValueError if there is none (as
        for a closed mapping: close() runs in a worker thread at shutdown)."""
        if self._active is None or self._fd is None or self._map is None:
            raise ValueError("no active spool segment")
        return self._active, self._fd, self._map

    def _new_segment(self, size: int) -> None:
        self._seq += 1
        path = os.path.join(self.directory, f"usage-{self._seq:010d}.jsonl")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.posix_fallocate(fd, 0, size)
            mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        self._fd, self._map, self._cap, self._active = fd, mapped, size, path
        self._sizes[path] = 0
        self._new_file = True

    def _grow(self, fd: int, mapped: mmap.mmap, end: int) -> None:
        """More records than a segment holds came before the writer sealed it: twice the room."""
        size = max(end, 2 * self._cap)
        os.posix_fallocate(fd, 0, size)
        mapped.resize(size)
        self._cap = size

    def _unmap(self, cut: bool) -> None:
        """Close the active segment, cut to its data if it is kept (a deleted one need not be)."""
        active, fd, mapped = self._segment()
        mapped.close()
        try:
            if cut:
                os.ftruncate(fd, self._sizes[active])
        except OSError as exc:   # replay reads up to the NULs anyway
            self.last_error = f"spool truncate failed: {exc.strerror}"
        finally:
            os.close(fd)
            self._map, self._cap = None, 0

    @property
    def active_bytes(self) -> int:
        return self._sizes.get(self._active, 0) if self._active else 0

    # --- durability ----------------------------------------------------------------------------------

    async def sync(self) -> None:
        """fsync what was appended so far, in a worker thread; concurrent calls coalesce."""
        async with self._sync_lock:
            sealed, self._to_sync = self._to_sync, set()
            if sealed:
                await trio.to_thread.run_sync(self._fsync_sealed, sealed)
            if self._fd is None or not self._unsynced:
                return
            self._unsynced = False
            try:
                await trio.to_thread.run_sync(self._fsync)
            except OSError as exc:
                self.last_error = f"spool fsync failed: {exc.strerror}"
                self.log.error("cannot fsync the usage spool", directory=self.directory, error=exc.strerror)

    def sync_now(self) -> None:
        """fsync on the calling thread: only where nothing else can run (after the writer ended)."""
        if self._fd is not None and self._unsynced:
            self._unsynced = False
            try:
                self._fsync()
            except OSError as exc:   # as sync() does: a lost fsync is the operator's to know
                self.last_error = f"spool fsync failed: {exc.strerror}"
                self.log.error("cannot fsync the usage spool", directory=self.directory, error=exc.strerror)

    def _fsync_sealed(self, paths: set[str]) -> None:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except FileNotFoundError:
                pass     # replayed and deleted meanwhile
            except OSError as exc:
                self.last_error = f"spool fsync failed: {exc.strerror}"
                self.log.error("cannot fsync the usage spool", path=path, error=exc.strerror)

    def _fsync(self) -> None:
        os.fsync(self._segment()[1])
        if self._new_file:
            self._new_file = False
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    async def seal(self, fsync: bool = True) -> None:
        """Close the active segment so replay may read it; the next append starts a new one. It
        is fsynced first only if it holds records to replay: the records of a healthy store's
        journal are in the store (or on their way) and their segment is deleted unwritten. A
        segment whose records are all in the store is deleted."""
        async with self._sync_lock:
            if self._fd is None:
                return
            # emit() may append while the fsync runs: sync that too
            while fsync and self._unsynced and self._active in self._replay:
                self._unsynced = False
                try:
                    await trio.to_thread.run_sync(self._fsync)
                except OSError as exc:
                    self.log.error("cannot fsync the usage spool", directory=self.directory, error=exc.strerror)
                    break
            self._unsynced = False
            sealed = self._segment()[0]
            clean = self._settled_clean(sealed)
            self._unmap(cut=not clean)
            self._fd, self._active = None, None
            if clean:
                self.remove(sealed)

    # --- replay (reads run in worker threads) ------------------------------------------------------

    def sealed(self) -> list[str]:
        """Sealed segments with no record pending in memory, oldest first: the ones to replay."""
        return sorted(p for p in self._replay if p != self._active and p not in self._pending)

    @staticmethod
    def read(path: str) -> list[bytes]:
        """The segment's non-empty lines; NULs (the unwritten rest of a preallocated segment, or a
        page not written back before a power cut) end lines too. Blocking: from a worker thread."""
        with open(path, "rb") as f:
            return [line for line in _LINE_ENDS.split(f.read()) if line.strip()]

    def remove(self, path: str) -> None:
        """A segment whose records are all in the store."""
        self._forget(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.log.error("cannot delete a replayed usage spool segment; its records would be replayed "
                           "again at the next start", path=path, error=exc.strerror)

    def quarantine(self, path: str, error: str) -> None:
        """A segment that cannot be read: set aside as *.bad for the operator, out of the bound."""
        self._forget(path)
        self.log.error("cannot read a usage spool segment; set aside as .bad", path=path, error=error)
        try:
            os.rename(path, path + ".bad")
        except OSError:
            pass

    def _forget(self, path: str) -> None:
        self._pending.pop(path, None)
        self._replay.discard(path)
        self.bytes -= self._sizes.pop(path, 0)
        self._check_level(0)

    # --- records the store refused ---------------------------------------------------------------------

    def set_aside(self, lines: list[bytes]) -> bool:
        """Keep records the store refused in rejected.jsonl, never replayed, for the operator to
        look at; capped at max_bytes of its own. False if they could not be kept."""
        path = os.path.join(self.directory, "rejected.jsonl")
        data = b"".join(lines)
        try:
            if os.path.exists(path) and os.path.getsize(path) + len(data) > self.max_bytes:
                return False
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError:
            return False
        return True

    # --- the bound ---------------------------------------------------------------------------------

    def _check_level(self, dropped_now: int) -> None:
        fields = {"directory": self.directory, "spool_bytes": self.bytes, "spool_max_bytes": self.max_bytes}
        high = self.bytes >= self.max_bytes * WARN_FRACTION
        if high and self._level == "ok":
            self._level = "warn"
            self.log.warning("usage spool is over 80% of its bound; records will be dropped at the bound", **fields)
        if high and dropped_now:
            now = time.monotonic()
            if self._level != "full" or now - self._full_logged >= FULL_LOG_INTERVAL:
                self._level, self._full_logged = "full", now
                self.log.error("usage spool is full: usage records are being dropped",
                               dropped_total=self.dropped, **fields)
        elif not high and self._level != "ok":
            self._level = "ok"
            self.log.info("usage spool is below 80% of its bound again", **fields)


def _cut_to_data(path: str) -> int:
    """A segment found at open: a killed process leaves its preallocated NULs after the data. Cut
    them off (the records are all before) and -> the data's size. Blocking: at open."""
    size = os.path.getsize(path)
    if not size:
        return 0
    with open(path, "r+b") as f:
        f.seek(size - 1)
        if f.read(1) != b"\x00":
            return size            # sealed: cut already, or written by an hxgwd before the mapping
        f.seek(0)
        data = f.read()
        size = len(data.rstrip(b"\x00"))
        f.truncate(size)
    return size
