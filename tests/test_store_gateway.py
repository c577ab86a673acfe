"""The store behind the running gateway: every API request recorded, store keys, two hosts
sharing PostgreSQL and Redis, a database outage mid-run, and the spool replayed after a restart."""

from __future__ import annotations

import sqlite3

import httpx
import psycopg
import pytest
import trio

from tests.conftest import AUTH, gateway_config, start_gateway
from tests.fakeupstream import FakeUpstream, Hang
from tests.test_store_support import new_pg_url  # noqa: F401  (fixture)

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def backends(up: FakeUpstream) -> str:
    return f"""
        [[backends]]
        name = "u"
        url = "{up.url}"
        [[models]]
        name = "m"
        backend = "u"
        input_cost_per_1k = 1.0
        [[models]]
        name = "e"
        backend = "u"
        kind = "embedding"
    """


async def test_every_api_request_is_recorded_in_sqlite(nursery, tmp_path, upstream):
    db = tmp_path / "state" / "hxgwd.db"
    gw = await start_gateway(nursery, gateway_config(backends(upstream), database=f"sqlite:///{db}"))
    assert (await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})).status_code == 200
    assert (await gw.post("/v1/chat/completions", {**CHAT, "model": "m", "stream": True})).status_code == 200
    assert (await gw.post("/v1/embeddings", {"model": "e", "input": "x"})).status_code == 200
    assert (await gw.get("/v1/models")).status_code == 200
    assert (await gw.post("/v1/chat/completions", {**CHAT, "model": "nope"})).status_code == 404
    assert (await gw.client.post("/v1/chat/completions", json=CHAT)).status_code == 401
    upstream.script(Hang())
    with trio.move_on_after(0.5):
        await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
    await gw.client.get("/healthz")                              # not an API request
    await gw.stop()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT endpoint, status, stream, key, cost_usd, prompt_tokens FROM usage"
                            " ORDER BY ts").fetchall()
    assert [r[1] for r in rows] == [200, 200, 200, 200, 404, 401, 499]
    assert rows[1][2] == 1 and rows[1][5] == 7                 # stream usage counted exactly
    assert rows[0][3] == "dev" and rows[0][4] == pytest.approx(0.007)
    assert rows[5][3] is None


async def test_store_keys_via_admin_api_and_revocation(nursery, tmp_path, upstream):
    db = tmp_path / "hxgwd.db"
    config = gateway_config(backends(upstream), '[limits]\ntimezone = "Europe/Berlin"\n',
                            database=f"sqlite:///{db}").replace("sha256 =", "admin = true\nsha256 =")
    gw = await start_gateway(nursery, config)
    r = await gw.post("/admin/keys", {"name": "team-a", "models": ["m"], "rpm": 100})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    team = {"Authorization": f"Bearer {key}"}
    r = await gw.client.post("/v1/chat/completions", json={**CHAT, "model": "m"}, headers=team)
    assert r.status_code == 200
    r = await gw.client.post("/v1/embeddings", json={"model": "e", "input": "x"}, headers=team)
    assert r.status_code == 403
    listed = (await gw.get("/admin/keys")).json()["data"]
    assert [k["name"] for k in listed] == ["team-a"] and key not in str(listed)
    assert (await gw.post("/admin/keys", {"name": "team-a"})).status_code == 409
    assert (await gw.post("/admin/keys", {"name": "dev"})).status_code == 409
    assert (await gw.client.delete("/admin/keys/team-a", headers=AUTH)).status_code == 200
    r = await gw.client.post("/v1/chat/completions", json={**CHAT, "model": "m"}, headers=team)
    assert r.status_code == 401
    with trio.fail_after(10):                   # records reach the database within the writer's linger
        while {row["key"] for row in (await gw.get("/admin/usage?by=key&since=1h")).json()["data"]} < {"team-a", "dev"}:
            await trio.sleep(0.05)
    by_day = (await gw.get("/admin/usage?by=day&since=2000-01-01")).json()
    assert by_day["timezone"] == "Europe/Berlin" and sum(row["requests"] for row in by_day["data"]) >= 4
    assert by_day["since"] == 946681200                      # midnight in Berlin, not in UTC
    stats = (await gw.get("/admin/stats")).json()
    assert stats["retention"] == {"days": 0, "pruned": 0, "last_error": None}
    assert stats["deferred"]["max_pending"] == 128 and stats["deferred"]["overflowed"] == 0
    await gw.stop()


def spooled(config: str, directory) -> str:
    return config.replace("key_refresh = 0.2", f'key_refresh = 0.2\nspool_dir = "{directory}"')


async def test_two_hosts_share_postgres_and_redis(nursery, tmp_path, new_pg_url, redis_server, upstream):  # noqa: F811
    url = new_pg_url()
    extra = f'[redis]\nurl = "{redis_server.url}"\n'
    cfg = gateway_config(backends(upstream), extra, database=url).replace("sha256 =", "admin = true\nsha256 =")
    from hxgwd.store import open_store
    from hxgwd.config.model import Database
    store = open_store(Database(url=url))
    await store.migrate()
    await store.aclose()
    a = await start_gateway(nursery, spooled(cfg, tmp_path / "a"))
    b = await start_gateway(nursery, spooled(cfg, tmp_path / "b"))
    r = await a.post("/admin/keys", {"name": "shared", "rpm": 3})
    key = {"Authorization": f"Bearer {r.json()['key']}"}
    with trio.fail_after(10):               # host b learns the key within key_refresh
        while (await b.client.get("/v1/models", headers=key)).status_code != 200:
            await trio.sleep(0.05)
    statuses = [(await gw.client.get("/v1/models", headers=key)).status_code for gw in (a, b, a)]
    assert statuses.count(429) >= 1          # 1 + 3 requests against rpm 3, counted across hosts
    assert (await a.client.delete("/admin/keys/shared", headers=AUTH)).status_code == 200
    with trio.fail_after(10):               # revocation reaches host b within key_refresh
        while (await b.client.get("/v1/models", headers=key)).status_code != 401:
            await trio.sleep(0.05)
    await a.stop()
    await b.stop()


async def test_postgres_outage_mid_run_loses_no_record(nursery, tmp_path, new_pg_url, pg_server, upstream):  # noqa: F811
    # acknowledged commits must survive `pg_ctl -m immediate`: the throwaway server defaults to
    # synchronous_commit=off, so this connection asks for it (production servers keep their own)
    url = new_pg_url() + "?options=-c%20synchronous_commit%3Don"
    from hxgwd.store import open_store
    from hxgwd.config.model import Database
    store = open_store(Database(url=url))
    await store.migrate()
    await store.aclose()
    gw = await start_gateway(nursery, spooled(gateway_config(backends(upstream), database=url), tmp_path))
    sent = 0
    for i in range(120):
        if i == 40:
            pg_server.stop()
        if i == 80:
            pg_server.restart()
        r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})
        assert r.status_code == 200                # serving never waits on the database
        sent += 1
    await gw.stop()
    with psycopg.connect(url.split("?")[0]) as conn:
        assert conn.execute("SELECT count(*) FROM usage").fetchone()[0] == sent


async def test_spool_replayed_after_gateway_restart(nursery, tmp_path, new_pg_url, pg_server, upstream):  # noqa: F811
    url = new_pg_url() + "?options=-c%20synchronous_commit%3Don"
    from hxgwd.store import open_store
    from hxgwd.config.model import Database
    store = open_store(Database(url=url))
    await store.migrate()
    await store.aclose()
    spool = tmp_path / "spool"
    cfg = gateway_config(backends(upstream), database=url).replace(
        "key_refresh = 0.2", f'key_refresh = 0.2\nspool_dir = "{spool}"\nconnect_timeout = 1.0')
    pg_server.stop()
    try:
        first = await start_gateway(nursery, cfg)
        for _ in range(25):
            assert (await first.post("/v1/chat/completions", {**CHAT, "model": "m"})).status_code == 200
        await first.stop()
        assert first.daemon.services.usage.statistics()["spooled"] == 25
    finally:
        pg_server.restart()
    second = await start_gateway(nursery, cfg)
    with trio.fail_after(20):
        while True:
            with psycopg.connect(url.split("?")[0]) as conn:
                if conn.execute("SELECT count(*) FROM usage").fetchone()[0] == 25:
                    break
            await trio.sleep(0.1)
    await second.stop()


async def test_daemon_refuses_unmigrated_postgres_with_exit_78(nursery, tmp_path, new_pg_url):  # noqa: F811
    from tests.daemon import DaemonProcess

    path = tmp_path / "c.toml"
    path.write_text(spooled(gateway_config('[[backends]]\nname = "e"\nkind = "echo"\n', database=new_pg_url()),
                            tmp_path / "spool"))
    daemon = DaemonProcess(str(path))
    await daemon.start(nursery, wait_listening=False)
    assert await daemon.wait() == 78
    line = await daemon.wait_for("cannot start: database schema")
    assert "hxgwd db migrate" in line["error"]


async def test_revocation_across_two_gateway_processes(nursery, tmp_path, new_pg_url, redis_server, upstream):  # noqa: F811
    import subprocess
    import sys

    from tests.daemon import DaemonProcess

    url = new_pg_url()
    base = gateway_config(backends(upstream), f'[redis]\nurl = "{redis_server.url}"\n', database=url)
    configs = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.toml"
        path.write_text(spooled(base, tmp_path / f"spool-{name}"))
        configs.append(str(path))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hxgwd", *args, "-c", configs[0]],
                              capture_output=True, text=True, timeout=60)

    assert cli("db", "migrate").returncode == 0
    daemons = [DaemonProcess(c) for c in configs]
    for daemon in daemons:
        await daemon.start(nursery)
    try:
        created = cli("keys", "create", "--name", "team-x", "--rpm", "4")
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip().splitlines()[0]
        h = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(timeout=10) as client:
            for daemon in daemons:             # both hosts pick the new key up within key_refresh
                with trio.fail_after(10):
                    while (await client.get(daemon.url + "/v1/models", headers=h)).status_code != 200:
                        await trio.sleep(0.05)
            codes = [(await client.get(d.url + "/v1/models", headers=h)).status_code for d in daemons * 2]
            assert codes.count(429) >= 2           # 2 + 4 requests against rpm 4, shared through Redis
            assert cli("keys", "revoke", "team-x").returncode == 0
            for daemon in daemons:             # and the revocation, within key_refresh
                with trio.fail_after(10):
                    while (await client.get(daemon.url + "/v1/models", headers=h)).status_code != 401:
                        await trio.sleep(0.05)
    finally:
        for daemon in daemons:
            daemon.kill()


async def test_sqlite_file_deleted_while_serving_loses_no_record(nursery, tmp_path, upstream):
    # open connections would go on writing to the deleted file: the rows would vanish with it
    db = tmp_path / "hx.db"
    cfg = spooled(gateway_config(backends(upstream), database=f"sqlite:///{db}"), tmp_path / "spool")
    first = await start_gateway(nursery, cfg)
    assert (await first.post("/v1/chat/completions", {**CHAT, "model": "m"})).status_code == 200
    usage = first.daemon.services.usage
    with trio.fail_after(10):
        while usage.statistics()["written"] < 1:
            await trio.sleep(0.05)
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"hx.db{suffix}").unlink(missing_ok=True)
    for _ in range(10):
        assert (await first.post("/v1/chat/completions", {**CHAT, "model": "m"})).status_code == 200
    await first.stop()
    assert usage.statistics()["written"] == 1 and usage.statistics()["spooled"] == 10
    second = await start_gateway(nursery, cfg)          # migrates the new file, replays the spool
    with trio.fail_after(20):
        while sqlite3.connect(db).execute("SELECT count(*) FROM usage").fetchone()[0] < 10:
            await trio.sleep(0.1)
    await second.stop()


async def test_admin_usage_tells_a_query_that_timed_out_from_an_unreachable_database(
        nursery, tmp_path, new_pg_url, upstream):  # noqa: F811
    url = new_pg_url()
    from hxgwd.config.model import Database
    from hxgwd.store import open_store
    store = open_store(Database(url=url))
    await store.migrate()
    await store.aclose()
    cfg = spooled(gateway_config(backends(upstream), database=url), tmp_path / "spool").replace(
        "key_refresh = 0.2", "key_refresh = 0.2\nstatement_timeout = 0.3\nconnect_timeout = 1.0").replace(
        "sha256 =", "admin = true\nsha256 =")
    gw = await start_gateway(nursery, cfg)
    assert (await gw.get("/admin/usage?since=1h")).status_code == 200
    with psycopg.connect(url) as locker:           # holds the table until the block ends
        locker.execute("LOCK TABLE usage IN ACCESS EXCLUSIVE MODE")
        with trio.fail_after(5):
            r = await gw.get("/admin/usage?since=1h")
    assert r.status_code == 504
    assert r.json() == {"error": {
        "message": "The usage query timed out: the database did not answer within 0.3 s "
                   "([database] statement_timeout).",
        "type": "upstream_error", "param": None, "code": "database_timeout"}}
    assert (await gw.get("/admin/usage?since=1h")).status_code == 200
    await gw.stop()

    from tests.servers import free_port
    gone = await start_gateway(nursery, cfg.replace(url, f"postgresql://nobody@127.0.0.1:{free_port()}/none"))
    r = await gone.get("/admin/usage?since=1h")
    assert (r.status_code, r.json()["error"]["code"]) == (503, "database_unavailable")
    assert r.json()["error"]["message"] == "The database is unreachable."
    await gone.stop()


async def test_a_slow_sqlite_usage_query_is_cut_at_the_database_bound(nursery, tmp_path, upstream):
    # SQLite has no statement timeout of its own: a report over a big table ran as long as it took
    db = tmp_path / "hxgwd.db"
    cfg = gateway_config(backends(upstream), database=f"sqlite:///{db}").replace(
        "key_refresh = 0.2", "key_refresh = 0.2\nstatement_timeout = 0.05\nconnect_timeout = 0.05").replace(
        "sha256 =", "admin = true\nsha256 =")
    gw = await start_gateway(nursery, cfg)
    assert (await gw.get("/admin/usage?since=1h")).json()["data"] == []      # schema in place
    with sqlite3.connect(db) as conn:     # 400,000 rows: a report takes ~0.45 s, 4x the bound
        conn.execute("""INSERT INTO usage (request_id, ts, key, endpoint, status, total_tokens)
                        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 400000)
                        SELECT 'r' || i, unixepoch() - i % 3000, 'k' || (i % 50), '/v1/chat/completions',
                               200, 15 FROM n""")
    with trio.fail_after(5):
        r = await gw.get("/admin/usage?since=1h&by=key")
    assert r.status_code == 504
    assert r.json()["error"] == {
        "message": "The usage query timed out: no answer within 0.1 s ([database] connect_timeout + "
                   "statement_timeout).", "type": "upstream_error", "param": None, "code": "database_timeout"}
    assert (await gw.get("/admin/keys")).status_code == 200   # the interrupted thread serves again
    await gw.stop()


EVERY_KIND = """
    [[backends]]
    name = "u"
    url = "{url}"
    [[models]]
    name = "chat"
    backend = "u"
    input_cost_per_1k = 1.0
    output_cost_per_1k = 2.0
    [[models]]
    name = "mod"
    backend = "u"
    kind = "moderation"
    [[models]]
    name = "rr"
    backend = "u"
    kind = "rerank"
    [[models]]
    name = "tts"
    backend = "u"
    kind = "speech"
    [[models]]
    name = "img"
    backend = "u"
    kind = "image"
    [[models]]
    name = "stt"
    backend = "u"
    kind = "transcription"
"""


async def test_every_new_endpoint_stores_a_usage_row_with_its_tokens(nursery, tmp_path):
    """Responses (plain and streamed), moderations, rerank, speech, images and transcriptions,
    against the fake upstream's own answers: one row each, with the usage the answer carried."""
    up = FakeUpstream()
    await nursery.start(up.serve)
    db = tmp_path / "hxgwd.db"
    gw = await start_gateway(nursery, gateway_config(EVERY_KIND.format(url=up.url), database=f"sqlite:///{db}"))
    calls = [("/v1/responses", {"model": "chat", "input": "one two three"}),
             ("/v1/responses", {"model": "chat", "input": "one two three", "stream": True}),
             ("/v1/moderations", {"model": "mod", "input": "fine"}),
             ("/v1/rerank", {"model": "rr", "query": "a b", "documents": ["a", "b c"]}),
             ("/v1/audio/speech", {"model": "tts", "input": "two words", "voice": "alloy"}),
             ("/v1/images/generations", {"model": "img", "prompt": "a cat"})]
    for path, body in calls:
        r = await gw.post(path, body)
        assert r.status_code == 200, (path, r.text)
    r = await gw.client.post("/v1/audio/transcriptions", headers=AUTH, data={"model": "stt"},
                             files={"file": ("a.wav", b"RIFF" + bytes(1000), "audio/wav")})
    assert r.status_code == 200, r.text
    await gw.stop()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT endpoint, model, status, stream, total_tokens, cost_usd FROM usage"
                            " ORDER BY ts").fetchall()
    assert [r[:4] for r in rows] == [
        ("/v1/responses", "chat", 200, 0), ("/v1/responses", "chat", 200, 1), ("/v1/moderations", "mod", 200, 0),
        ("/v1/rerank", "rr", 200, 0), ("/v1/audio/speech", "tts", 200, 0),
        ("/v1/images/generations", "img", 200, 0), ("/v1/audio/transcriptions", "stt", 200, 0)]
    tokens = {r[0] + ("+stream" if r[3] else ""): r[4] for r in rows}
    assert tokens["/v1/responses"] > 0 and tokens["/v1/responses+stream"] > 0
    assert rows[0][5] and rows[0][5] > 0                     # priced: the chat model has costs
    assert tokens["/v1/rerank"] and tokens["/v1/images/generations"]


async def test_limits_apply_to_the_new_endpoints(nursery):
    up = FakeUpstream()
    await nursery.start(up.serve)
    gw = await start_gateway(nursery, gateway_config(EVERY_KIND.format(url=up.url)).replace(
        'name = "dev"\n', 'name = "dev"\nrpm = 3\n', 1))
    statuses = []
    for path, body in [("/v1/moderations", {"model": "mod", "input": "x"}),
                       ("/v1/rerank", {"model": "rr", "query": "q", "documents": ["a"]}),
                       ("/v1/responses", {"model": "chat", "input": "x"}),
                       ("/v1/images/generations", {"model": "img", "prompt": "x"})]:
        statuses.append((await gw.post(path, body)).status_code)
    r = await gw.client.post("/v1/audio/transcriptions", headers=AUTH, data={"model": "stt"},
                             files={"file": ("a.wav", b"x")})
    assert statuses == [200, 200, 200, 429] and r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_rpm" and len(up.requests) == 3
