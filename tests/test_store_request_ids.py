"""Request ids and usage rows: the gateway keys every row by an id it makes, so a client that
reuses its X-Request-ID cannot hide requests from billing (issue 14.1), and `/admin/stats`
counts rows actually inserted."""

from __future__ import annotations

import json
import sqlite3

import trio

from hxgwd.store import open_store
from hxgwd.store.schema import RECORD_FIELDS
from hxgwd.store.usage import UsageSink
from tests.conftest import gateway_config, start_gateway
from tests.test_store_gateway import CHAT, backends
from tests.test_store_support import ListLog, database, make_record, sqlite_url, wait_until


async def test_a_reused_client_request_id_still_stores_one_row_per_request(nursery, tmp_path, upstream):
    db = tmp_path / "hx.db"
    admin = gateway_config(backends(upstream), database=f"sqlite:///{db}").replace("sha256 =", "admin = true\nsha256 =")
    gw = await start_gateway(nursery, admin)
    gateway_ids = []
    for _ in range(20):
        answer = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"}, headers={"X-Request-ID": "same-1"})
        assert answer.status_code == 200
        assert answer.headers["x-request-id"] == "same-1"          # the client's id, echoed
        gateway_ids.append(answer.headers["x-hx-request-id"])
    assert len(set(gateway_ids)) == 20
    assert [r.headers["x-request-id"] for r in upstream.requests] == ["same-1"] * 20
    own = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
    assert own.headers["x-request-id"] == own.headers["x-hx-request-id"]   # no client id: ours, twice
    refused = await gw.client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "same-1"})
    assert refused.status_code == 401 and refused.headers["x-hx-request-id"] not in gateway_ids
    usage = gw.daemon.services.usage
    assert await wait_until(lambda: usage.statistics()["written"] >= 22, timeout=10)
    stats = (await gw.get("/admin/stats")).json()["usage"]
    await gw.stop()
    with sqlite3.connect(db) as conn:
        rows = dict(conn.execute("SELECT request_id, client_request_id FROM usage WHERE endpoint != '/admin/stats'"))
    assert len(rows) == 22 and stats["written"] == 22
    assert all(rows[g] == "same-1" for g in gateway_ids) and rows[own.headers["x-hx-request-id"]] is None
    access = [line for line in gw.log.requests() if line.get("client_request_id") == "same-1" and line["status"] == 200]
    assert len(access) == 20 and {line["request_id"] for line in access} == set(gateway_ids)


async def test_written_counts_rows_inserted_not_records_sent(tmp_path):
    cfg = database(sqlite_url(tmp_path), spool_dir=str(tmp_path / "spool"))
    store = open_store(cfg)
    await store.migrate()
    await store.insert_usage([make_record(i) for i in range(5)])    # already there: not written again
    sink = UsageSink(store, cfg, ListLog())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(10):
            sink.emit(make_record(i))
        await sink.aclose(timeout=5)
    assert await store.count_usage() == 10
    assert sink.statistics()["written"] == 5
    await store.aclose()


async def test_spool_lines_of_an_older_hxgwd_replay(tmp_path):
    cfg = database(sqlite_url(tmp_path), spool_dir=str(tmp_path / "spool"))
    (tmp_path / "spool").mkdir()
    record = make_record(1, prefix="old")
    line = {name: getattr(record, name) for name in RECORD_FIELDS if name != "client_request_id"}
    (tmp_path / "spool" / "usage-0000000001.jsonl").write_text(json.dumps(line) + "\n")
    store = open_store(cfg)
    await store.migrate()
    sink = UsageSink(store, cfg, ListLog())
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        assert await wait_until(lambda: sink.statistics()["replayed"] == 1, timeout=5)
        await sink.aclose(timeout=5)
    with sqlite3.connect(tmp_path / "state" / "hxgwd.db") as conn:
        assert conn.execute("SELECT request_id, client_request_id FROM usage").fetchall() == [("old-1", None)]
    await store.aclose()
