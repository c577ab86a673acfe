"""GET /status: the on-call page. Its access (an admin key as Bearer or as HTTP Basic's password),
what it shows (a breaker the test opened, recent failures with causes, the last reload), that every
value is escaped, and a look at it in headless Chromium with a screenshot kept."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import shutil

import httpx
import pytest
import trio

from hxgwd.errors import Forbidden, Unauthorized
from hxgwd.pipeline import authenticate
from hxgwd.pipeline.record import RequestRecord
from hxgwd.pipeline.route import Router
from hxgwd.runtime import Principal
from tests.conftest import DEV_KEY, ROOT, gateway_config, start_gateway
from tests.fakeupstream import FakeUpstream

ADMIN_KEY = "sk-hx-admin-status-0123456789"
ADMIN_SHA = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def basic(password: str, user: str = "oncall") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# --- the credential, as a function --------------------------------------------------------------

def test_basic_password_reads_the_password_of_any_user():
    assert authenticate.basic_password([(b"authorization", b"Basic " + base64.b64encode(b"x:sk-1"))]) == "sk-1"
    assert authenticate.basic_password([(b"authorization", b"basic  " + base64.b64encode(b":sk:with:colons"))]) \
        == "sk:with:colons"
    for value in (b"Bearer sk-1", b"Basic", b"Basic !!!", b"Basic " + base64.b64encode(b"no-colon"),
                  b"Basic " + base64.b64encode(b"user:")):
        assert authenticate.basic_password([(b"authorization", value)]) is None, value
    assert authenticate.basic_password([(b"x-api-key", b"sk-1")]) is None


def test_authenticate_monitor_takes_basic_or_bearer_and_only_admin_keys():
    admin = Principal("ops", None, admin=True, digest=hashlib.sha256(b"sk-admin").digest())
    user = Principal("app", None, digest=hashlib.sha256(b"sk-user").digest())
    table = {p.digest: p for p in (admin, user)}
    lookups = (table.get,)
    as_basic = [(b"authorization", b"Basic " + base64.b64encode(b"anyone:sk-admin"))]
    assert authenticate.authenticate_monitor(as_basic, lookups) is admin
    assert authenticate.authenticate_monitor([(b"authorization", b"Bearer sk-admin")], lookups) is admin
    with pytest.raises(Forbidden):
        authenticate.authenticate_monitor([(b"authorization", b"Basic " + base64.b64encode(b"u:sk-user"))], lookups)
    for headers in ([], [(b"authorization", b"Basic " + base64.b64encode(b"u:sk-nope"))]):
        with pytest.raises(Unauthorized) as refused:
            authenticate.authenticate_monitor(headers, lookups)
        assert refused.value.headers()[0] == (b"www-authenticate", b'Basic realm="hxgwd", charset="UTF-8"')
    # the API's own authentication never reads Basic
    with pytest.raises(Unauthorized) as refused:
        authenticate.authenticate(as_basic, lookups)
    assert (b"www-authenticate", b"Bearer") in refused.value.headers()
    assert not any(b"Basic" in v for _, v in refused.value.headers())


# --- through the gateway ----------------------------------------------------------------------------

def config(ups: list[FakeUpstream], routing: str = "breaker_failures = 2\nbreaker_cooldown = 60.0") -> str:
    text = "".join(f"""
        [[backends]]
        name = "{u.name}"
        url = "{u.url}"
        [[models]]
        name = "m-{u.name}"
        backend = "{u.name}"
        """ for u in ups)
    names = ", ".join(f'"m-{u.name}"' for u in ups)
    return gateway_config(text + f"""
        [groups.g]
        models = [{names}]
        strategy = "priority"
        [routing]
        {routing}
        [[keys]]
        name = "ops"
        admin = true
        sha256 = "{ADMIN_SHA}"
        """)


async def opened_breaker(nursery) -> tuple:
    """Two backends in a priority group; a's connects are refused until its breaker opens."""
    a, b = FakeUpstream(name="a"), FakeUpstream(name="b")
    for u in (a, b):
        await nursery.start(u.serve)
    gw = await start_gateway(nursery, config([a, b]), router=Router(rng=random.Random(0)))
    await a.refuse()
    for _ in range(2):
        r = await gw.post("/v1/chat/completions", CHAT, headers={"X-HX-Model-Group": "g"})
        assert r.status_code == 200 and r.headers["x-hx-deployment"] == "m-b@b"     # failed over
    table = gw.daemon.router.table(gw.daemon.holder.current, trio.current_time())
    assert {d["deployment"]: d["breaker"] for d in table["g"]["deployments"]} == {"m-a@a": "open", "m-b@b": "closed"}
    return gw, a, b


async def wait_for_failures(gw, n: int) -> None:
    """The failure ring is fed from idle work, after the answers."""
    with trio.fail_after(5):
        while True:
            page = await gw.client.get("/status", headers=basic(ADMIN_KEY))
            if page.text.count('class="cause"') >= n:
                return
            await trio.sleep(0.02)


async def test_without_credentials_the_browser_is_asked_for_a_password(nursery, upstream):
    gw = await start_gateway(nursery, config([upstream]))
    r = await gw.client.get("/status")
    assert r.status_code == 401
    assert r.headers.get_list("www-authenticate")[0] == 'Basic realm="hxgwd", charset="UTF-8"'
    assert r.json()["error"]["code"] == "missing_api_key"
    assert "hxgwd status" not in r.text
    for bad in (basic("sk-not-a-key-at-all-0000"), {"Authorization": "Bearer sk-not-a-key-at-all-0000"}):
        r = await gw.client.get("/status", headers=bad)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith('Basic realm="hxgwd"')
    r = await gw.client.get("/status", headers=basic(DEV_KEY))          # a key, not an admin's
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    await trio.sleep(0.1)
    refused = [line for line in gw.log.lines() if line.get("event") == "monitor_refused"]
    # the missing key (a browser's first request) is not logged; the wrong ones are, by prefix only
    assert [line["status"] for line in refused] == [401, 401, 403]
    assert all("sk-not-a-key-at-all" not in str(line) for line in refused)
    assert refused[0]["key_prefix"] and refused[0]["client"] == "127.0.0.1"


async def test_an_admin_key_as_basic_or_bearer_opens_the_page_and_nothing_else(nursery, upstream):
    gw = await start_gateway(nursery, config([upstream]))
    for headers in (basic(ADMIN_KEY), basic(ADMIN_KEY, user=""), {"Authorization": f"Bearer {ADMIN_KEY}"},
                    {"x-api-key": ADMIN_KEY}):
        r = await gw.client.get("/status", headers=headers)
        assert r.status_code == 200, headers
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert r.headers["cache-control"] == "no-store"
        assert "script-src" not in r.headers["content-security-policy"]      # default-src 'none': no script
        assert r.headers["x-frame-options"] == "DENY"
    # Basic is for the read-only page: the admin API and the API refuse it
    for path in ("/admin/routing", "/admin/keys", "/v1/models"):
        r = await gw.client.get(path, headers=basic(ADMIN_KEY))
        assert r.status_code == 401 and "Basic" not in r.headers["www-authenticate"], path
    r = await gw.client.post("/status", headers=basic(ADMIN_KEY))
    assert r.status_code == 405
    r = await gw.client.head("/status", headers=basic(ADMIN_KEY))
    assert r.status_code == 200 and r.content == b""
    await trio.sleep(0.1)
    # not an API request: no access line (nor usage record) for the page, however often it refreshes
    assert not [line for line in gw.log.requests() if line["endpoint"] == "/status"]


async def test_page_shows_the_open_breaker_its_cause_and_the_failures(nursery):
    gw, a, b = await opened_breaker(nursery)
    await wait_for_failures(gw, 2)
    r = await gw.client.get("/status", headers=basic(ADMIN_KEY))
    page = r.text
    assert '<meta http-equiv="refresh" content="5">' in page
    assert "<script" not in page and "http://" not in page.split("<main>")[0].replace('http-equiv', '')
    # the deployments: a open (first, with why and the cause), b closed
    deployments = page.split('id="deployments"')[1].split("</section>")[0]
    row_a = deployments.split("<tr>")[2]
    assert "m-a@a" in row_a and '<span class="badge bad">open</span>' in row_a
    assert "2 consecutive failures" in row_a and "connect refused" in row_a and "half-open in" in row_a
    assert '<span class="badge ok">closed</span>' in deployments.split("<tr>")[3]
    # models and groups: g has 1 of 2 usable
    targets = page.split('id="targets"')[1].split("</section>")[0]
    assert re.search(r"<strong>g</strong>.*?1/2", targets)
    # recent failures: the two requests, rescued (200) with a's cause
    failures = page.split('id="failures"')[1].split("</section>")[0]
    assert failures.count("<tr>") == 3 and "m-a@a: connect refused" in failures and ">200, failed over<" in failures
    assert "breakers not closed" in page and '<span class="badge bad">1</span>' in page
    assert "generation 1" in page and "none since start" in page


def test_every_value_is_escaped():
    """What reaches the page from outside the config: a failed request's model and endpoint (the
    client's), causes and store errors (an upstream's or a database's words), reload problems."""
    import io
    import json

    from hxgwd.config import load
    from hxgwd.idle import IdleWork
    from hxgwd.limits.limiter import HostLimiter
    from hxgwd.logs import Logger
    from hxgwd.pipeline.context import GatewayContext
    from hxgwd.pipeline.route import BreakerChange
    from hxgwd.runtime import RuntimeHolder, compile_config
    from hxgwd.services import Services
    from hxgwd.status_document import status_document
    from hxgwd.status_page import render
    from hxgwd.upstream.gates import Gates
    from hxgwd.upstream.transports import Transports

    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    upstream = FakeUpstream(name="a")
    upstream.port = 9                    # never started: the page reads no socket
    rt = compile_config(load.loads(config([upstream])), 1, environ={})
    holder = RuntimeHolder(rt)
    ctx = GatewayContext(holder, Router(), Transports(), Gates(), Services(HostLimiter(rt.config.limits)),
                         Logger(out=io.BytesIO()), IdleWork(lambda where, exc: None))
    ctx.failures.add(RequestRecord(ts=1.0, request_id="r1", key=None, endpoint="/v1/" + hostile, model=hostile,
                                   group=None, deployment=None, backend=None, status=502,
                                   error_type="upstream_error", cause="m@b: " + hostile))
    ctx.router.last_change["m-a@a"] = BreakerChange("m-a@a", "a", "closed", "open", hostile, hostile)
    holder.reloaded("rejected", [hostile])
    doc = status_document(ctx, rt, 0.0, 100.0)
    page = render(json.loads(json.dumps(doc)), 5, 100.0)        # as it crosses the control channel
    assert "<script" not in page and "<img" not in page
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") == 6   # model, endpoint, cause; why, cause; problem


async def test_last_reload_result_is_shown(nursery, upstream, tmp_path):
    gw = await start_gateway(nursery, config([upstream]))
    path = tmp_path / "hxgwd.toml"
    path.write_text("[server]\nlisten = 5\n")
    gw.daemon.config_path = str(path)
    assert not await gw.daemon.reload()
    page = (await gw.client.get("/status", headers=basic(ADMIN_KEY))).text
    assert '<span class="badge bad">rejected, 0 s ago</span>' in page
    assert "server.listen" in page and "serving generation 1" in page
    path.write_text(config([upstream]))
    assert await gw.daemon.reload()
    page = (await gw.client.get("/status?refresh=0", headers=basic(ADMIN_KEY))).text
    assert '<span class="badge ok">ok, 0 s ago</span>' in page and "generation 2" in page
    assert "http-equiv" not in page and 'href="?refresh=5"' in page


# --- in a browser -------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
async def test_in_headless_chromium(nursery, tmp_path):
    gw, a, b = await opened_breaker(nursery)
    await wait_for_failures(gw, 2)
    host = gw.url.removeprefix("http://")
    url = f"http://oncall:{ADMIN_KEY}@{host}/status?refresh=0"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1600"]

    async def chromium(*args: str) -> bytes:
        with trio.fail_after(90):
            done = await trio.run_process([*common, *args, url], capture_stdout=True, capture_stderr=True,
                                          check=False)
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        return done.stdout

    dom = (await chromium("--dump-dom")).decode()
    assert "<h1>hxgwd status</h1>" in dom
    deployments = dom.split('id="deployments"')[1].split("</section>")[0]
    assert "m-a@a" in deployments and '<span class="badge bad">open</span>' in deployments
    assert "connect refused" in deployments
    shot = tmp_path / "status.png"
    await chromium(f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept = os.path.join(ROOT, "test-artifacts", "status.png")     # git-ignored
    os.makedirs(os.path.dirname(kept), exist_ok=True)
    shutil.copyfile(shot, kept)
    print(f"status page screenshot: {kept}")
    # and on a phone's width
    phone = tmp_path / "status-phone.png"
    common[-1] = "--window-size=390,1400"
    await chromium(f"--screenshot={phone}")
    shutil.copyfile(phone, os.path.join(ROOT, "test-artifacts", "status-phone.png"))


async def test_store_and_redis_are_shown_without_their_passwords(nursery, upstream, tmp_path):
    text = config([upstream]).replace('url = ""', f'url = "sqlite:///{tmp_path}/usage.db?password=hunter2-db"', 1)
    text += '\n[redis]\nurl = "redis://:hunter2-redis@127.0.0.1:1/0"\n'
    gw = await start_gateway(nursery, text)
    r = await gw.post("/v1/chat/completions", CHAT, headers={"X-HX-Model-Group": "g"})
    assert r.status_code == 200
    page = (await gw.client.get("/status", headers=basic(ADMIN_KEY))).text
    assert "hunter2" not in page
    usage = page.split('id="usage"')[1].split("</section>")[0]
    assert "sqlite" in usage and "spool" in usage and "store keys cached" in usage
    limits = page.split('id="limits"')[1].split("</section>")[0]
    assert "redis://***@127.0.0.1:1/0" in limits and "not called yet" in limits     # no key has limits
    await gw.stop()
