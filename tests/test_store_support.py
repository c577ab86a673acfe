"""Shared by the store, keys and usage tests: stores on real SQLite files and on fresh databases
of the throwaway PostgreSQL server, records, a log that keeps its lines. (No tests here.)"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import attrs
import pytest
import trio

from hxgwd.config.model import Database
from hxgwd.pipeline.record import RequestRecord
from hxgwd.store import StoreUnavailable, open_store

_names = itertools.count()


@pytest.fixture(scope="session")
def new_pg_url(pg_server):
    """A factory: each call creates an empty database on the session's PostgreSQL server, so
    tests (and modules) never see each other's rows."""
    import psycopg

    def make() -> str:
        name = f"hxgwd_{os.getpid()}_{next(_names)}"
        with psycopg.connect(pg_server.dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return pg_server.dsn.rsplit("/", 1)[0] + "/" + name

    return make


def database(url: str, **overrides: Any) -> Database:
    settings = {"connect_timeout": 2.0, "statement_timeout": 5.0, "key_refresh": 0.2, **overrides}
    return Database(url=url, **settings)


def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/state/hxgwd.db"   # tmp_path is absolute: four slashes


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """A new, empty database of each engine."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    return request.getfixturevalue("new_pg_url")()


@pytest.fixture
async def store(store_url):
    """A migrated store of each engine."""
    s = open_store(database(store_url))
    await s.migrate()
    yield s
    await s.aclose()


def make_record(i: int, *, prefix: str = "r", key: str | None = "team-a", model: str = "m1",
                deployment: str = "m1@b", ts: float | None = None, status: int = 200, **kw: Any) -> RequestRecord:
    fields = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30, "cost_usd": 0.001,
              "total_ms": 12.5, "upstream_ms": 10.0, **kw}
    return RequestRecord(ts=time.time() if ts is None else ts, request_id=f"{prefix}-{i}", key=key,
                         endpoint="/chat/completions", model=model, group=None, deployment=deployment,
                         backend="b", status=status, **fields)


@attrs.define
class ListLog:
    lines: list[tuple[str, str, dict]] = attrs.field(factory=list)

    def info(self, msg: str, **fields: Any) -> None:
        self.lines.append(("info", msg, fields))

    def warning(self, msg: str, **fields: Any) -> None:
        self.lines.append(("warning", msg, fields))

    def error(self, msg: str, **fields: Any) -> None:
        self.lines.append(("error", msg, fields))

    def exception(self, msg: str, exc: BaseException) -> None:
        self.lines.append(("error", msg, {"exception": repr(exc)}))

    def at(self, level: str) -> list[str]:
        return [msg for lv, msg, _ in self.lines if lv == level]


class DownStore:
    """A store whose database never answers: every insert fails as an outage would."""

    def __init__(self) -> None:
        self.calls = 0

    async def insert_usage(self, records: list) -> int:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        raise StoreUnavailable("test: the database is down")


async def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    """Poll predicate until true, at most timeout seconds (real time)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await trio.sleep(interval)
    return True
