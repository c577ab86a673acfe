"""The journal's mapped segments (store/spool.py): appends are copies into a preallocated, shared
mapping; a segment is cut to its data when sealed or closed, and one a killed process left
(data, then the preallocated NULs) is read up to its data, old lines and torn ones included."""

from __future__ import annotations

import os

import pytest
import trio

from hxgwd.errors import BadRequest, GatewayError
from hxgwd.pipeline import exchange, record
from hxgwd.store import open_store
from hxgwd.store.schema import (LINE_FIELDS, record_document, record_from_line, record_from_values, record_line,
                                values_line)
from hxgwd.store.spool import Spool
from hxgwd.store.usage import UsageSink
from tests.test_store_support import ListLog, database, make_record, sqlite_url, wait_until


def lines(n: int, prefix: str = "r") -> list[bytes]:
    return [record_line(make_record(i, prefix=prefix)) for i in range(n)]


async def test_the_active_segment_is_preallocated_and_cut_to_its_data_when_sealed(tmp_path):
    spool = Spool(str(tmp_path), 1 << 30, ListLog(), segment_bytes=64 * 1024)
    spool.open()
    data = lines(10)
    segment = spool.journal(data[0])
    for line in data[1:]:
        assert spool.journal(line) == segment
    size = sum(map(len, data))
    assert os.path.getsize(segment) == 64 * 1024            # preallocated: the rest reads as NULs
    with open(segment, "rb") as f:                           # another reader sees the copies at once
        assert f.read(size) == b"".join(data) and f.read(1) == b"\0"
    assert spool.active_bytes == spool.bytes == size
    await spool.seal(fsync=True)
    assert os.path.getsize(segment) == size and Spool.read(segment) == [line.rstrip(b"\n") for line in data]
    spool.close(fsync=True)


async def test_a_segment_grows_when_more_comes_than_it_holds(tmp_path):
    spool = Spool(str(tmp_path), 1 << 30, ListLog(), segment_bytes=4096)
    spool.open()
    data = lines(200)                                        # ~40 KiB: several doublings
    assert spool.append(data) == 200
    segment = spool.journal(data[0])
    assert spool.active_bytes == sum(map(len, data)) + len(data[0]) <= os.path.getsize(segment)
    spool.close(fsync=False)         # kept (it holds records to replay): cut to its data
    assert os.path.getsize(segment) == spool.bytes
    assert len(Spool.read(segment)) == 201


def test_a_segment_killed_mid_write_reads_up_to_its_data(tmp_path):
    """What kill -9 leaves: whole lines, a torn one (the copy of a request that had not finished),
    then the preallocated NULs; also a page written back after an earlier one that was not."""
    data = lines(5)
    path = tmp_path / "usage-0000000003.jsonl"
    path.write_bytes(b"".join(data) + data[0][:40] + bytes(8192) + data[1] + bytes(100))
    assert Spool.read(str(path)) == [*(line.rstrip(b"\n") for line in data), data[0][:40], data[1].rstrip(b"\n")]
    spool = Spool(str(tmp_path), 1 << 30, ListLog())
    spool.open()                     # cut at open: the bound counts data, not preallocation
    assert spool.bytes == os.path.getsize(path) == sum(map(len, data)) + 40 + 8192 + len(data[1])
    assert spool.sealed() == [str(path)]
    spool.close(fsync=False)


async def test_replay_reads_a_preallocated_segment_cut_off_by_a_crash(tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    old = [record_document(make_record(i, prefix="old")) for i in range(3)]    # lines of an hxgwd before 14
    new = lines(20, prefix="new")
    (spool_dir / "usage-0000000001.jsonl").write_bytes(b"".join(old))
    (spool_dir / "usage-0000000002.jsonl").write_bytes(b"".join(new) + new[0][:50] + bytes(256 * 1024))
    cfg = database(sqlite_url(tmp_path), spool_dir=str(spool_dir))
    store = open_store(cfg)
    await store.migrate()
    sink = UsageSink(store, cfg, ListLog())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        assert await wait_until(lambda: sink.statistics()["replayed"] == 23, timeout=10)
        await sink.aclose(timeout=5)
    assert await store.count_usage() == 23 and sink.statistics()["corrupt"] == 1      # the torn line
    assert not list(spool_dir.glob("usage-*.jsonl"))
    await store.aclose()


def test_a_full_disk_fails_the_segment_not_the_request(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path), 1 << 30, ListLog())
    spool.open()

    def full(fd, offset, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert spool.journal(lines(1)[0]) is None and "No space left" in spool.last_error
    assert not list(tmp_path.glob("usage-*.jsonl")) and spool.bytes == 0
    monkeypatch.undo()
    assert spool.journal(lines(1)[0]) is not None
    spool.close(fsync=False)



# --- the request path: values journaled at once, the RequestRecord made and handed over later ---

def _exchange(**kw):
    ex = exchange.Exchange(request_id="0193a4b5c6d000001a1b2c3d4", started=100.0, ts=1733450000.25,
                        endpoint="/v1/chat/completions", client_request_id="cli-1")
    for name, value in {"key": "team-a", "model": "m", "deployment": "m@b", "backend": "b", "status": 200,
                        "usage": {"prompt_tokens": 3, "completion_tokens": 4}, "bytes_in": 10, "bytes_out": 20,
                        "upstream_time": 0.002, "ttfb": 0.001, "attempts": 1, "route": "m", **kw}.items():
        setattr(ex, name, value)
    return ex


def _old_record(ex, cost, ended, generation):
    """What Gateway._record made before the values path (dbe9ca0), field by field."""
    err = ex.error
    status = record.STATUS_CLIENT_CLOSED if ex.client_gone else ex.status
    return record.RequestRecord(
        ts=ex.ts, request_id=ex.request_id, client_request_id=ex.client_request_id, key=ex.key,
        endpoint=ex.endpoint, model=ex.model, group=ex.group, deployment=ex.deployment, backend=ex.backend,
        status=status, error_type=err.type if err else ("client_closed" if ex.client_gone else None),
        fault=err.fault if err else ("client" if ex.client_gone else exchange.upstream_fault(status)),
        stream=ex.stream, **dict(zip(("prompt_tokens", "completion_tokens", "total_tokens"), record.usage_tokens(ex.usage))), cost_usd=cost, bytes_in=ex.bytes_in,
        bytes_out=ex.bytes_out, total_ms=(ended - ex.started) * 1000, upstream_ms=ex.upstream_time * 1000,
        ttfb_ms=ex.ttfb * 1000 if ex.ttfb is not None else None, attempts=ex.attempts, route=ex.route,
        generation=generation)


@pytest.mark.parametrize("kw", [
    {},
    {"usage": None, "ttfb": None, "status": 503},
    {"usage": {}, "status": 404, "stream": True, "group": "g"},
    {"usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 99}},
    {"client_gone": True},
    {"client_gone": True, "error": BadRequest("no")},
    {"error": GatewayError("Internal error."), "status": 500},
])
def test_the_journaled_values_are_the_record_field_by_field(kw):
    ex = _exchange(**kw)
    values = ex.record_values(7, 0.25, 100.5)
    assert len(values) == len(LINE_FIELDS)
    assert record_from_values(values) == _old_record(ex, 0.25, 100.5, 7)
    assert values_line(values) == record_line(_old_record(ex, 0.25, 100.5, 7))
    assert record_from_line(values_line(values)) == _old_record(ex, 0.25, 100.5, 7)


async def test_a_record_handed_over_late_keeps_its_segment_pending_and_survives_a_crash(tmp_path):
    spool_dir = tmp_path / "spool"
    cfg = database(sqlite_url(tmp_path), spool_dir=str(spool_dir))
    store = open_store(cfg)
    await store.migrate()
    sink = UsageSink(store, cfg, ListLog())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        recs = [make_record(i, prefix="late") for i in range(3)]
        segments = [sink.journal(tuple(getattr(r, f) for f in LINE_FIELDS))
                    for r in recs]
        await sink._spool.seal(fsync=False)          # as the writer does every second
        assert os.path.exists(segments[0])            # pending: neither deleted nor replayed
        assert sink._spool.sealed() == []
        for segment, r in zip(segments, recs):       # the idle work, later
            sink.hand(segment, r)
        assert await wait_until(lambda: sink.statistics()["written"] == 3, timeout=10)
        assert await wait_until(lambda: not os.path.exists(segments[0]), timeout=10)
        dead = [make_record(i, prefix="dead") for i in range(4)]
        for r in dead:                                 # journaled, never handed over: the process dies
            sink.journal(tuple(getattr(r, f) for f in LINE_FIELDS))
        bug = make_record(9, prefix="dead")
        sink.abandon(sink.journal(tuple(getattr(bug, f) for f in LINE_FIELDS)))   # a bug in _finish
        await sink.aclose(timeout=5)
    assert await store.count_usage() == 3
    sink = UsageSink(store, cfg, ListLog())           # the next start replays the journal
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        assert await wait_until(lambda: sink.statistics()["replayed"] == 5, timeout=10)
        await sink.aclose(timeout=5)
    assert await store.count_usage() == 8 and not list(spool_dir.glob("usage-*.jsonl"))
    await store.aclose()


def test_a_journal_racing_the_close_at_shutdown_fails_softly(tmp_path):
    spool = Spool(str(tmp_path), 1 << 30, ListLog())
    spool.open()
    assert spool.journal(lines(1)[0]) is not None
    spool._map.close()               # what close() in the writer's worker thread does, mid-journal
    assert spool.journal(lines(1)[0]) is None and "closed" in spool.last_error
    spool.close(fsync=False)      # closing a closed mapping is harmless
