"""Usage records from the request path to the store: a journal on disk, one writer task.

    handler ── journal(values): one line copied into the spool's active (mapped) segment
    idle work ── hand(segment, record) ──> memory channel (queue_size) ──> writer ──> store.insert_usage
    (emit(record) does both at once)
    sealed segment: every record stored from memory -> deleted; any not (store down, slow,
    channel full, shutdown, an earlier run that died) -> replayed, oldest first

`journal` is called when a request ends, before anything awaits, and never blocks: one line,
encoded from the record's values, copied into the spool's active segment (a killed process
loses nothing copied so). The RequestRecord itself is built later, at the loop's next quiet
moment (idle.py), and handed over with `hand` (a `send_nowait`); meanwhile its segment counts
it as pending, so it is neither deleted nor replayed, and a crash replays it from the journal.
In process (bench/journal_micro.py) the synchronous part went from 12.0 to 4.9 us a request
(the record deferred; the write a copy into a mapping); bench/ab.py, CPU per request at 64
connections: 8e61fb5 (no journal) 391 us, dbe9ca0 (os.write journal) 415, mapped 406. The writer takes what is queued (up to batch_size), lingering
LINGER for company, writes each batch in one transaction in a worker thread (COPY on
PostgreSQL), and settles the batch's segments: stored, or marked for replay. Each attempt is
bounded (connect_timeout + statement_timeout) and really cancelled when it runs over; the store
is tried again with backoff (0.2 s doubling to 5 s) while the channel keeps draining. The active
segment is sealed every ROTATE_INTERVAL (or segment_bytes), so a healthy store keeps about a
second of records on disk. Replay goes in batch_size chunks interleaved with live batches; rows
are keyed by the gateway's own request id and inserts skip ids already stored, so replaying a
segment whose records were partly stored stores each once.

A batch the database refuses as data (RecordRejected: should not happen, records are sanitized
in schema.py) is bisected down to the offending records, which are set aside in
<spool_dir>/rejected.jsonl (never replayed), counted, and logged at most every 10 s: one bad
record cannot block the spool forever, and a systematic bug loses nothing.

What can be lost (README "Usage"): a process crash or SIGKILL, only the records of requests that
had not finished. A power cut, what the kernel had not written back, per `spool_fsync`:
    always  a helper task fsyncs the journal after every append (group commit): the records of
            the last few milliseconds
    batch   records the store did not take are fsynced once per batch; a healthy store's
            journal is not (its segments are deleted before the kernel writes them back: an
            fsync per batch cost ~8 % CPU per request): the records of the last seconds
    never   no fsync at all: the records of the last half minute or so
plus, in every mode, the last commits the database itself loses: none for PostgreSQL with
synchronous_commit on; SQLite (WAL, synchronous=NORMAL) may lose those since its last checkpoint.
The journal is bounded by spool_max_bytes: past it records are in memory only (counted as
dropped if the store does not take them). `aclose()` (SIGTERM) writes memory to the store within
the grace time, and leaves the rest to be replayed; a cancelled `run()` does the latter.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import trio

from hxgwd.config.model import Database
from hxgwd.pipeline.record import RequestRecord
from hxgwd.store import RecordRejected, Store, StoreUnavailable, adopted_spool_dirs, default_spool_dir
from hxgwd.store.replay import Replay
from hxgwd.store.schema import record_document, record_line, values_line
from hxgwd.store.spool import Spool

if TYPE_CHECKING:
    from hxgwd.logs import Logger

RETRY_MIN = 0.2
RETRY_MAX = 5.0
HURRY_TIMEOUT = 5.0      # after the close deadline: time left to put the rest in the spool
LINGER = 0.25            # seconds a first record waits for company before the batch is written:
                         # 0.05 -> 0.25 cut the CPU per request at 64 conns by ~3.5% (BEGIN/COMMIT
                         # per batch), and a record still reaches the database well within a second
REJECT_LOG_INTERVAL = 10.0
ROTATE_INTERVAL = 1.0    # seconds a journal segment stays active: sealed, it is deleted once its
                         # records are in the store, so a healthy store keeps ~1 s of them on disk

# what goes through the channel: the segment the record is journaled in (None: not journaled), the record
Item = tuple["str | None", RequestRecord]


class UsageSink:
    def __init__(self, store: Store, database: Database, log: Logger, *, spool_dir: str | None = None,
                 adopt: tuple[str, ...] = (), retry_min: float = RETRY_MIN, retry_max: float = RETRY_MAX) -> None:
        self._store = store
        self._log = log
        self._batch_size = database.batch_size
        self._fsync = database.spool_fsync
        self._attempt_timeout = database.connect_timeout + database.statement_timeout
        self._send, self._recv = trio.open_memory_channel[Item](database.queue_size)
        self._spool = Spool(spool_dir or default_spool_dir(database), database.spool_max_bytes, log,
                            adopt=adopt if spool_dir else adopted_spool_dirs(database))
        self._retry_min, self._retry_max = retry_min, retry_max
        self._backoff = retry_min
        self._retry_at = -math.inf
        self._healthy = True
        self._started = self._running = False
        self._finished = trio.Event()
        self._sync_wanted = trio.Event()
        self._deadline: float | None = None    # set by aclose()
        self._hurry = False                    # past the deadline: everything goes to the spool
        self._attempt: trio.CancelScope | None = None
        self._replay = Replay(self._spool, log, database.batch_size, database.spool_fsync != "never")
        self._rotate_at: float | None = None   # trio time the active journal segment is sealed at
        self.written = 0      # rows the store inserted from live records (ones it had already: not counted)
        self.spooled = 0      # records left on disk for replay: journaled ones that did not reach the store
                              # from memory, and unjournaled ones appended
        self.rejected = 0     # records the store refused as data: kept in <spool>/rejected.jsonl
        self._rejected_logged = -math.inf
        self.last_error: str | None = None

    # --- the request path --------------------------------------------------------------------------

    def emit(self, record: RequestRecord) -> None:
        """Journal a finished request's record and hand it over at once: `journal` + `hand`."""
        self.hand(self._journal_line(record_line(record)), record)

    def journal(self, values: tuple[Any, ...]) -> str | None:
        """Journal a finished request's record from its values (LINE_FIELDS order); never blocks,
        never awaits, never raises. Call it when the request ends, not later: once it returned,
        the record survives the death of the process. -> its segment, for `hand` (None: in
        memory only, over the bound or the spool unusable). Every call must be followed by a
        `hand` of the same record, or the segment stays pending until the process ends."""
        return self._journal_line(values_line(values))

    def _journal_line(self, line: bytes) -> str | None:
        segment = self._spool.journal(line)
        if segment is not None and self._fsync == "always" and self._running:
            self._sync_wanted.set()
        return segment

    def hand(self, segment: str | None, record: RequestRecord) -> None:
        """Hand over a record `journal` returned `segment` for, to the writer; never blocks, never
        raises. Late (the idle work): the segment keeps the record pending till the writer settles it."""
        try:
            self._send.send_nowait((segment, record))
            return
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass
        if segment is not None:     # on disk already: replayed from there
            self._spool.settle({segment: 1}, stored=False)
            self.spooled += 1
            return
        try:
            self.spooled += self._spool.append([record_line(record)])
        except Exception as exc:   # the spool directory is unusable: count, do not fail the request
            self._spool.dropped += 1
            self.last_error = f"spool: {exc}"
            return
        if self._fsync == "always":
            if self._running:
                self._sync_wanted.set()
            else:
                self._spool.sync_now()   # after shutdown: rare, and the process is ending

    def abandon(self, segment: str) -> None:
        """A journaled record that will never be handed over (a bug made it): replayed from disk."""
        self._spool.settle({segment: 1}, stored=False)
        self.spooled += 1

    def statistics(self) -> dict[str, Any]:
        return {"queued": self._send.statistics().current_buffer_used, "written": self.written,
                "spooled": self.spooled, "replayed": self._replay.replayed, "spool_bytes": self._spool.bytes,
                "spool_max_bytes": self._spool.max_bytes, "dropped": self._spool.dropped,
                "rejected": self.rejected, "corrupt": self._replay.corrupt, "store_ok": self._healthy,
                "last_error": self.last_error or self._spool.last_error}

    # --- the writer ----------------------------------------------------------------------------------

    async def open(self) -> None:
        """Take the spool directory (its lock): SpoolError if it is unusable or another process
        holds it. The daemon calls this before anything else is made (the SQLite file); run()
        does it too."""
        await trio.to_thread.run_sync(self._spool.open)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task. Raises SpoolError before started() if the spool directory cannot be
        opened (or another process holds it)."""
        await self.open()
        self._started = self._running = True
        if self._spool.bytes:
            self._log.info("usage spool holds records from an earlier run; replaying when the store answers",
                           spool_bytes=self._spool.bytes, directory=self._spool.directory)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                if self._fsync == "always":
                    nursery.start_soon(self._syncer)
                await self._write_loop()
                await self._final_replay()
                nursery.cancel_scope.cancel()
        finally:
            self._running = False
            with trio.CancelScope(shield=True):
                self._keep(self._drain_nowait())
                with trio.move_on_after(HURRY_TIMEOUT):
                    await trio.to_thread.run_sync(self._spool.close, self._fsync != "never")
                self._finished.set()

    async def aclose(self, timeout: float = 10.0) -> None:
        """Stop taking records and write out what is in memory: to the store within `timeout`
        seconds, then whatever is left to the spool. Returns when the writer is done (or after
        `timeout` + a few seconds at worst)."""
        if self._deadline is None:
            self._deadline = trio.current_time() + timeout
        await self._send.aclose()
        if not self._started:   # run() never ran (or failed to open the spool): drain it ourselves
            left = self._drain_nowait()
            try:
                self._keep(left)
                await trio.to_thread.run_sync(self._spool.close, self._fsync != "never")
            except Exception as exc:   # the spool directory is unusable: say so, do not raise at shutdown
                self._spool.dropped += len(left)
                self._log.error("usage records lost at shutdown: the spool is unusable",
                                records=len(left), error=str(exc))
            return
        with trio.move_on_at(self._deadline):
            await self._finished.wait()
            return
        self._hurry = True
        if self._attempt is not None:
            self._attempt.cancel()
        with trio.move_on_after(HURRY_TIMEOUT):
            await self._finished.wait()

    async def _write_loop(self) -> None:
        first: Item | None = None
        while True:
            if first is not None and not self._hurry:
                # Let a batch gather: one thread hop and one transaction per record cost a quarter
                # of the gateway's CPU at 1,000 requests/s (bench/usage). Bounded and short, so a
                # record reaches the database within LINGER (plus one insert), and closing is never
                # held up by it.
                try:
                    await trio.sleep(LINGER)
                except trio.Cancelled:   # run() is cancelled: the record in hand goes to disk
                    self._keep([first])
                    raise
            batch = self._take(first)
            first = None
            if batch is None:
                return
            if batch:
                await self._deliver(batch)
            await self._rotate_when_due()
            if self._replay_due():
                await self._replay.step(self._store_batch)
                continue
            if len(batch) >= self._batch_size:
                continue    # more may be waiting: at once, no linger
            # less than a batch was queued: wait for a record (or the next retry), then linger
            # again; going straight back for what came in during the insert made batches of 1-3
            # records, a thread hop and a transaction each (bench/usage: a third of the CPU)
            with trio.move_on_after(self._wait_time()):
                try:
                    first = await self._recv.receive()
                except trio.EndOfChannel:
                    return

    def _take(self, first: Item | None) -> list[Item] | None:
        """What is queued, up to batch_size, without waiting; None once the channel is closed and empty."""
        batch = [first] if first is not None else []
        while len(batch) < self._batch_size:
            try:
                batch.append(self._recv.receive_nowait())
            except trio.WouldBlock:
                break
            except trio.EndOfChannel:
                return batch or None
        return batch

    def _drain_nowait(self) -> list[Item]:
        left = []
        while True:
            try:
                left.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return left

    def _keep(self, items: list[Item]) -> None:
        """Records that will not reach the store from memory: a journaled one is on disk already
        (its segment is marked for replay), the others are appended now."""
        journaled: dict[str, int] = {}
        loose = []
        for segment, record in items:
            if segment is None:
                loose.append(record_line(record))
            else:
                journaled[segment] = journaled.get(segment, 0) + 1
        if journaled:
            self._spool.settle(journaled, stored=False)
            self.spooled += len(items) - len(loose)
        if loose:
            self.spooled += self._spool.append(loose)

    async def _deliver(self, batch: list[Item]) -> None:
        if self._healthy or trio.current_time() >= self._retry_at:
            try:
                inserted = await self._store_batch([record for _, record in batch])
            except trio.Cancelled:   # run() itself is cancelled: the batch in hand goes to disk
                self._keep(batch)
                raise
            if inserted is not None:
                self.written += inserted
                stored: dict[str, int] = {}
                for segment, _ in batch:
                    if segment is not None:
                        stored[segment] = stored.get(segment, 0) + 1
                self._spool.settle(stored, stored=True)
                return
        self._keep(batch)
        if self._fsync != "never":
            await self._spool.sync()

    async def _rotate_when_due(self) -> None:
        """Seal the active journal segment after ROTATE_INTERVAL or segment_bytes: a segment is
        deleted (or replayed) only once sealed, so this is what keeps the journal small."""
        if not self._spool.active_bytes:
            self._rotate_at = None
            return
        now = trio.current_time()
        if self._rotate_at is None:
            self._rotate_at = now + ROTATE_INTERVAL
        if now >= self._rotate_at or self._spool.active_bytes >= self._spool.segment_bytes:
            self._rotate_at = None
            await self._spool.seal(self._fsync != "never")

    async def _store_batch(self, records: list[RequestRecord]) -> int | None:
        """One bounded attempt -> rows inserted; None (the store marked unhealthy) if it failed or
        ran out of time."""
        timeout = self._attempt_timeout
        if self._deadline is not None:
            timeout = min(timeout, self._deadline - trio.current_time())
        if timeout <= 0:
            self._hurry = True     # the close deadline passed: the rest goes to the spool
        if self._hurry:
            return None
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            self._attempt = scope
            try:
                inserted = await self._insert(records)
            except StoreUnavailable as exc:
                self._failed(str(exc))
                return None
            except Exception as exc:   # a bug, not an outage: keep the records, say so
                self._log.exception("unexpected error writing usage records; spooling them", exc)
                self._failed(f"{type(exc).__name__}: {exc}")
                return None
            finally:
                self._attempt = None
            self._succeeded()
            return inserted
        if not self._hurry:   # (cancelled by aclose() at its deadline: not the store's fault)
            self._failed(f"the store did not answer within {timeout:.1f} s")
        return None

    async def _insert(self, records: list[RequestRecord]) -> int:
        try:
            return await self._store.insert_usage(records)
        except RecordRejected as exc:
            if len(records) > 1:
                mid = len(records) // 2
                return await self._insert(records[:mid]) + await self._insert(records[mid:])
            self._reject(records[0], str(exc))
            return 0

    def _reject(self, record: RequestRecord, error: str) -> None:
        """A record the store refuses: kept aside (rejected.jsonl), counted, logged at most every 10 s."""
        self.rejected += 1
        kept = self._spool.set_aside([record_document(record)])
        if not kept:
            self._spool.dropped += 1
        now = trio.current_time()
        if now - self._rejected_logged >= REJECT_LOG_INTERVAL:
            self._rejected_logged = now
            self._log.error("usage record rejected by the store; kept in rejected.jsonl, not retried",
                            request_id=record.request_id, error=error, rejected_total=self.rejected,
                            kept=kept, directory=self._spool.directory)

    def _failed(self, error: str) -> None:
        self.last_error = error
        if self._healthy:
            self._healthy = False
            # the spool starts taking the records here: one event says both
            self._log.warning("usage store unavailable; spooling usage records to disk", event="store_lost",
                              spooling=True, error=error, directory=self._spool.directory)
        self._retry_at = trio.current_time() + self._backoff
        self._backoff = min(self._backoff * 2, self._retry_max)

    def _succeeded(self) -> None:
        self.last_error = None    # /admin/stats tells what is wrong now, not what once was
        if not self._healthy:
            self._healthy = True
            self._log.info("usage store available again", event="store_back", spool_bytes=self._spool.bytes)
        self._backoff = self._retry_min

    async def _syncer(self) -> None:
        while True:
            await self._sync_wanted.wait()
            self._sync_wanted = trio.Event()
            await self._spool.sync()

    # --- replay ----------------------------------------------------------------------------------------

    def _replay_due(self) -> bool:
        if self._hurry or not self._replay.pending():
            return False
        return self._healthy or trio.current_time() >= self._retry_at

    def _wait_time(self) -> float:
        now = trio.current_time()
        wait = max(0.0, self._retry_at - now) if self._replay.pending() else math.inf
        if self._rotate_at is not None:
            wait = min(wait, max(0.0, self._rotate_at - now))
        return wait

    async def _final_replay(self) -> None:
        """At close, with time left and the store answering: empty the spool too."""
        while self._replay_due():
            if self._deadline is not None and trio.current_time() >= self._deadline:
                return
            await self._replay.step(self._store_batch)
