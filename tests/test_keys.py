"""Virtual keys: the `hxgwd keys` / `hxgwd db` commands as processes, and the gateway's KeyCache
(revocation seen by another host within key_refresh; a store that fails keeps the last table)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import trio

from hxgwd.runtime import Principal
from hxgwd.store import StoreUnavailable, open_store
from hxgwd.store.keys import KeyCache
from hxgwd.store.schema import expected_version
from tests.conftest import ROOT
from tests.test_store_support import ListLog, database, new_pg_url, sqlite_url, wait_until  # noqa: F401


def hxgwd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hxgwd", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)


def write_config(tmp_path, url: str, database_lines: str = "") -> str:
    path = tmp_path / "hxgwd.toml"
    path.write_text(textwrap.dedent(f"""
        [database]
        url = "{url}"
        key_refresh = 0.2
        {database_lines}
        [[keys]]
        name = "from-config"
        sha256 = "{'ab' * 32}"
        [[backends]]
        name = "e"
        kind = "echo"
        [[models]]
        name = "m1"
        backend = "e"
        [[models]]
        name = "m2"
        backend = "e"
        [groups.g1]
        models = ["m1", "m2"]
    """))
    return str(path)


def test_db_prune_through_the_cli(tmp_path):
    from tests.test_store_support import make_record

    url = sqlite_url(tmp_path)
    cfg = write_config(tmp_path, url)

    async def fill() -> None:
        store = open_store(database(url))
        await store.migrate()
        await store.insert_usage([make_record(i, ts=1_000_000.0 + i) for i in range(7)]
                                 + [make_record(i, prefix="new") for i in range(3)])
        await store.aclose()
    trio.run(fill)
    pruned = hxgwd("db", "prune", "-c", cfg, "--before", "2000-01-01")
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted 7 usage rows from before 2000-01-01T00:00:00Z" in pruned.stdout
    assert "deleted 0 usage rows" in hxgwd("db", "prune", "-c", cfg, "--before", "1d").stdout


def test_keys_lifecycle_through_the_cli(tmp_path):
    cfg = write_config(tmp_path, sqlite_url(tmp_path))
    made = hxgwd("keys", "create", "-c", cfg, "--name", "team-a", "--models", "m1,m2", "g1", "--rpm", "60",
                 "--budget-usd", "5", "--budget-period", "day", "--expires", "30d")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert re.fullmatch(r"sk-hx-[A-Za-z0-9_-]{43}", key)          # alone on stdout: scriptable
    assert "shown this once" in made.stderr and key not in made.stderr

    listed = hxgwd("keys", "list", "-c", cfg)
    assert listed.returncode == 0 and key not in listed.stdout and key[10:20] not in listed.stdout
    assert re.search(r"team-a\s+" + re.escape(key[:10]) + r"\.\.\.\s+store\s+active\s+m1,m2,g1\s+60", listed.stdout)
    assert re.search(r"from-config\s+-\s+config\s+active", listed.stdout)
    docs = json.loads(hxgwd("keys", "list", "--json", "-c", cfg).stdout)
    assert {d["name"]: d["source"] for d in docs} == {"team-a": "store", "from-config": "config"}
    assert key not in json.dumps(docs)
    shown = json.loads(hxgwd("keys", "show", "team-a", "--json", "-c", cfg).stdout)
    assert shown["models"] == ["m1", "m2", "g1"] and shown["budget_usd"] == 5.0 and shown["status"] == "active"
    assert shown["expires_at"] > time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 29 * 86400))

    again = hxgwd("keys", "create", "-c", cfg, "--name", "team-a")
    assert again.returncode == 1 and "exists" in again.stderr
    clash = hxgwd("keys", "create", "-c", cfg, "--name", "from-config")
    assert clash.returncode == 1 and "config file" in clash.stderr
    for bad in (["--name", 'x"\nadmin = true'], ["--name", "ok", "--budget-usd", "inf"],
                ["--name", "ok", "--budget-usd", "nan"], ["--name", "ok", "--models", "nosuch"]):
        refused = hxgwd("keys", "create", "-c", cfg, *bad)
        assert refused.returncode == 2 and refused.stderr.startswith("hxgwd: --"), bad   # usage errors

    revoked = hxgwd("-c", cfg, "keys", "revoke", "team-a")    # -c before the command works too
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert hxgwd("keys", "revoke", "team-a", "-c", cfg).returncode == 1
    assert "team-a" not in hxgwd("keys", "list", "-c", cfg).stdout
    assert re.search(r"team-a\s+\S+\s+store\s+revoked", hxgwd("keys", "list", "--all", "-c", cfg).stdout)

    async def active() -> list[Principal]:
        s = open_store(database(sqlite_url(tmp_path)))
        try:
            return await s.active_keys()
        finally:
            await s.aclose()

    assert trio.run(active) == []


def test_commands_that_only_read_or_change_rows_create_no_sqlite_database(tmp_path):
    cfg = write_config(tmp_path, sqlite_url(tmp_path))
    state = tmp_path / "state"
    for command in (["db", "status"], ["keys", "list"], ["keys", "show", "team-a"], ["usage"],
                    ["keys", "revoke", "team-a"], ["db", "prune", "--before", "1d"]):
        out = hxgwd(*command, "-c", cfg)
        assert out.returncode == 1, command
        assert out.stderr == (f"hxgwd: no database at {state}/hxgwd.db yet: `hxgwd db migrate`, "
                              "`hxgwd keys create` or the daemon's first start creates it\n"), command
        assert not state.exists(), command
    assert hxgwd("db", "migrate", "-c", cfg).returncode == 0
    assert hxgwd("db", "status", "-c", cfg).returncode == 0
    assert hxgwd("keys", "list", "-c", cfg).returncode == 0


def test_bad_time_flags_are_usage_errors(tmp_path):
    cfg = write_config(tmp_path, sqlite_url(tmp_path))
    for command, flag, value in ((["usage"], "--since", "yesterday-ish"), (["usage"], "--until", "soon"),
                                 (["keys", "create", "--name", "k"], "--expires", "3x"),
                                 (["db", "prune"], "--before", "yesterday")):
        out = hxgwd(*command, flag, value, "-c", cfg)
        assert out.returncode == 2, (flag, out.stderr)
        assert out.stderr.startswith(f"hxgwd: {flag} {value!r}: not a time; use YYYY-MM-DD"), out.stderr
        assert out.stderr.count("\n") == 1 and out.stdout == ""
    past = hxgwd("keys", "create", "--name", "k", "--expires", "2001-01-01", "-c", cfg)
    assert (past.returncode, past.stderr) == (2, "hxgwd: --expires 2001-01-01: that is in the past\n")
    assert not (tmp_path / "state").exists()          # refused before the store was opened


def test_db_commands_on_postgres(tmp_path, new_pg_url):
    cfg = write_config(tmp_path, new_pg_url())
    status = hxgwd("db", "status", "-c", cfg)
    assert status.returncode == 1 and "hxgwd db migrate" in status.stdout
    refused = hxgwd("keys", "list", "-c", cfg)                  # PostgreSQL is never migrated by surprise
    assert refused.returncode == 1 and "hxgwd db migrate" in refused.stderr
    migrated = hxgwd("db", "migrate", "-c", cfg)
    assert migrated.returncode == 0 and f"from version 0 to {expected_version('postgresql')}" in migrated.stdout
    assert hxgwd("db", "status", "-c", cfg).returncode == 0
    made = hxgwd("keys", "create", "--name", "pg-key", "-c", cfg)
    assert made.returncode == 0 and made.stdout.startswith("sk-hx-")


def test_cli_reports_missing_password_and_disabled_store(tmp_path):
    cfg = write_config(tmp_path, "postgresql://gw@127.0.0.1:1/hx", 'password_env = "HXGWD_TEST_NO_SUCH_VAR"')
    out = hxgwd("keys", "list", "-c", cfg)
    assert out.returncode == 1 and "HXGWD_TEST_NO_SUCH_VAR is not set" in out.stderr
    off = write_config(tmp_path, "")
    out = hxgwd("usage", "-c", off)
    assert out.returncode == 1 and "disabled" in out.stderr


async def test_revocation_reaches_another_gateway_within_key_refresh(new_pg_url):
    url = new_pg_url()
    admin_store, host_a, host_b = (open_store(database(url)) for _ in range(3))
    await admin_store.migrate()
    key, _ = await admin_store.create_key("team-a")
    digest = hashlib.sha256(key.encode()).digest()
    log = ListLog()
    caches = [KeyCache(host_a, log, refresh=0.2), KeyCache(host_b, log, refresh=0.2)]
    async with trio.open_nursery() as nursery:
        for cache in caches:
            await nursery.start(cache.run)
        assert all(c.lookup(digest).key_name == "team-a" for c in caches)   # loaded before started()

        await admin_store.revoke_key("team-a")
        revoked_at = time.monotonic()
        assert await wait_until(lambda: all(c.lookup(digest) is None for c in caches), timeout=3)
        assert time.monotonic() - revoked_at < 0.2 + 1.0       # key_refresh + one read (slack for busy CI)

        key2, _ = await admin_store.create_key("team-b")
        digest2 = hashlib.sha256(key2.encode()).digest()
        assert await wait_until(lambda: all(c.lookup(digest2) is not None for c in caches), timeout=3)
        nursery.cancel_scope.cancel()
    for s in (admin_store, host_a, host_b):
        await s.aclose()


class FlakyStore:
    """A stand-in store whose active_keys() fails (or hangs) while `down`."""

    def __init__(self, principals: list[Principal], down: bool = False, hang: bool = False) -> None:
        self.principals, self.down, self.hang, self.reads = principals, down, hang, 0

    async def active_keys(self) -> list[Principal]:
        self.reads += 1
        if self.hang:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        if self.down:
            raise StoreUnavailable("test: down")
        return list(self.principals)


def principal(name: str) -> Principal:
    return Principal(name, None, digest=hashlib.sha256(name.encode()).digest(), source="store")


async def test_key_cache_starts_without_a_store_and_keeps_the_last_table():
    store = FlakyStore([principal("a")], down=True)
    log = ListLog()
    cache = KeyCache(store, log, refresh=0.05, load_timeout=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)               # a failing store does not block the start
        assert len(cache) == 0 and cache.failures >= 1
        assert log.at("warning") == ["cannot read keys from the store; using the last keys read"]
        store.down = False
        assert await wait_until(lambda: cache.lookup(principal("a").digest) is not None, timeout=2)
        store.down = True                            # unreachable again: last good table stays
        assert await wait_until(lambda: cache.failures >= 3, timeout=2)
        assert cache.lookup(principal("a").digest) is not None
        assert len(log.at("warning")) == 2           # once per outage, not once per read
        store.down, store.principals = False, [principal("b")]
        assert await wait_until(lambda: cache.lookup(principal("a").digest) is None, timeout=2)
        assert cache.lookup(principal("b").digest) is not None and cache.statistics()["failures"] == 0
        nursery.cancel_scope.cancel()


async def test_key_cache_first_load_is_bounded_when_the_store_hangs():
    cache = KeyCache(FlakyStore([], hang=True), ListLog(), refresh=10, load_timeout=0.3)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        assert trio.current_time() - start < 1 and cache.failures == 1
        nursery.cancel_scope.cancel()


async def test_key_cache_on_sqlite_sees_keys_made_by_another_process(tmp_path):
    url = sqlite_url(tmp_path)
    writer, reader = open_store(database(url)), open_store(database(url))
    await writer.migrate()
    cache = KeyCache(reader, ListLog(), refresh=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        key, _ = await writer.create_key("late")
        digest = hashlib.sha256(key.encode()).digest()
        assert await wait_until(lambda: cache.lookup(digest) is not None, timeout=3)
        nursery.cancel_scope.cancel()
    await writer.aclose()
    await reader.aclose()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_store_commands_as_root_refuse_a_state_dir_owned_by_the_daemon_user(tmp_path):
    import pwd
    import subprocess
    import sys

    state = tmp_path / "state"
    state.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{state}/hxgwd.db"\n')
    out = subprocess.run([sys.executable, "-m", "hxgwd", "keys", "list", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "runuser -u nobody" in out.stderr
    assert not (state / "hxgwd.db").exists()


HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b31m\x7fend\u202e"   # window title, screen clear, C1 CSI, DEL, bidi override
SHOWN = r"\x1b]0;pwned\x07\x1b[2J\x9b31m\x7fend\u202e"   # what the operator sees instead


def test_tables_show_control_characters_from_the_database_escaped(tmp_path):
    """Model names are the client's choice and reach the usage table as sent; key names and
    models could be written by another tool. No table hands a terminal a control sequence."""
    from tests.test_store_support import make_record

    url = sqlite_url(tmp_path)
    cfg = write_config(tmp_path, url)

    async def fill() -> None:
        store = open_store(database(url))
        await store.migrate()
        await store.insert_usage([make_record(0, model=HOSTILE, key=HOSTILE, deployment=HOSTILE)])
        await store.create_key(HOSTILE, models=(HOSTILE,))
        await store.aclose()
    trio.run(fill)
    outputs = [hxgwd("usage", "--by", by, "-c", cfg) for by in ("model", "key", "deployment")]
    outputs += [hxgwd("keys", "list", "-c", cfg), hxgwd("keys", "show", HOSTILE, "-c", cfg)]
    for out in outputs:
        assert out.returncode == 0, out.stderr
        assert SHOWN in out.stdout, out.stdout
        assert not any(c in out.stdout for c in "\x1b\x07\x9b\x7f\u202e"), out.stdout
    docs = []
    for command in (["usage", "--by", "model"], ["keys", "list"], ["keys", "show", HOSTILE]):
        out = hxgwd(*command, "--json", "-c", cfg)
        assert out.returncode == 0 and "\x7f" not in out.stdout and "\x1b" not in out.stdout
        docs.append(json.loads(out.stdout))
    usage, listed, shown = docs          # the data itself, unchanged, for scripts
    assert usage["rows"][0]["model"] == HOSTILE
    assert HOSTILE in {d["name"] for d in listed} and shown["name"] == HOSTILE and shown["models"] == [HOSTILE]
