"""Shared fixtures: a fake upstream and the gateway itself, both on real loopback sockets, port 0."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import textwrap
from typing import Any

import attrs
import httpx
import pytest
import trio

from hxgwd.config import load
from hxgwd.lifecycle import Daemon, Lifecycle, serve
from hxgwd.logs import Logger
from hxgwd.pipeline.route import Router
from hxgwd.runtime import RuntimeHolder, compile_config
from tests.fakeupstream import FakeUpstream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV_KEY = "sk-hx-dev-1234"
DEV_SHA = hashlib.sha256(DEV_KEY.encode()).hexdigest()
AUTH = {"Authorization": f"Bearer {DEV_KEY}"}


class CapturedLog(io.BytesIO):
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.getvalue().splitlines() if line.strip()]

    def requests(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("msg") == "request"]


@attrs.define
class RunningGateway:
    url: str
    daemon: Daemon
    life: Lifecycle
    log: CapturedLog
    client: httpx.AsyncClient
    stopped: trio.Event

    async def stop(self) -> None:
        """SIGTERM's path: drain, flush usage, close; returns once serve() has returned."""
        self.life.begin_shutdown()
        with trio.fail_after(30):
            await self.stopped.wait()

    async def post(self, path: str, body: Any, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        return await self.client.post(path, json=body, headers={**AUTH, **(headers or {})}, **kw)

    async def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.client.get(path, headers={**AUTH, **(headers or {})})


# The HTTP parser every gateway in the run uses: .ci/run runs the HTTP and gateway tests once more
# with HXGWD_TEST_HTTP_PARSER=h11 (the default, "auto", is httptools where it is installed).
HTTP_PARSER = os.environ.get("HXGWD_TEST_HTTP_PARSER", "auto")


def gateway_config(backends: str, extra: str = "", database: str = "") -> str:
    """A config with the dev key, listening on a free port, plus the given tables."""
    return textwrap.dedent(f"""
        [server]
        listen = ["127.0.0.1:0"]
        http_parser = "{HTTP_PARSER}"
        [database]
        url = "{database}"
        key_refresh = 0.2
        [[keys]]
        name = "dev"
        sha256 = "{DEV_SHA}"
    """) + textwrap.dedent(backends) + textwrap.dedent(extra)


async def start_gateway(nursery: trio.Nursery, toml_text: str, *, environ: dict[str, str] | None = None,
                        router: Router | None = None) -> RunningGateway:
    config = load.loads(toml_text)
    runtime = compile_config(config, 1, environ=environ or {})
    log = CapturedLog()
    daemon = Daemon(RuntimeHolder(runtime), Logger(out=log), router=router or Router())
    life = Lifecycle(daemon.log)
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await serve(daemon, life=life, handle_signals=False, task_status=task_status)
        finally:
            stopped.set()

    addresses = await nursery.start(run)
    url = f"http://{addresses[0]}"
    client = httpx.AsyncClient(base_url=url, timeout=30)
    return RunningGateway(url, daemon, life, log, client, stopped)


@pytest.fixture(scope="session", autouse=True)
def no_default_state_directory():
    """A test that runs the daemon on the default [database] or spool (/var/lib/hxgwd) leaves root's
    files there, and `make deb-check` refuses a machine where that directory exists without the
    package: every test must give its daemon a temporary place."""
    default = "/var/lib/hxgwd"
    existed = os.path.exists(default)
    yield
    assert existed or not os.path.exists(default), f"a test created {default}: give its daemon a spool_dir"


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    up = FakeUpstream()
    await nursery.start(up.serve)
    return up


def python_cmd() -> list[str]:
    return [sys.executable, "-m", "hxgwd"]


@pytest.fixture(scope="session")
def pg_server():
    from tests.servers import PostgresServer

    if not PostgresServer.available():
        pytest.skip("PostgreSQL server binaries are not installed")
    server = PostgresServer.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_server():
    from tests.servers import RedisServer

    if not RedisServer.available():
        pytest.skip("redis-server is not installed")
    server = RedisServer.start()
    yield server
    server.close()
