"""CORS ([server] cors_origins): the decision sans I/O, the config's checks, and browser-shaped
requests against a running gateway."""

from __future__ import annotations

import json
import textwrap

import attrs
import pytest

from hxgwd.config import dump, load
from hxgwd.config.check import summary
from hxgwd.config import model as m
from hxgwd.http.protocol import RequestHead
from hxgwd.pipeline import cors
from hxgwd.runtime import compile_config
from tests.conftest import AUTH
from tests.fakeupstream import Reply
from tests.test_config import problems
from tests.test_gateway import CHAT, last_record, single

APP = "https://app.example.com"
OTHER = "https://other.example.com"
# what the OpenAI JS SDK asks for on a chat call from a page
SDK_HEADERS = ("authorization, content-type, openai-organization, openai-project, x-stainless-arch, "
               "x-stainless-lang, x-stainless-os, x-stainless-package-version, x-stainless-retry-count, "
               "x-stainless-runtime, x-stainless-runtime-version, x-stainless-timeout")


def head(method: str, path: str, **headers: str) -> RequestHead:
    return RequestHead(method, path, [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
                       0, True)


def preflight_head(origin: str = APP, path: str = "/v1/chat/completions", **more: str) -> RequestHead:
    return head("OPTIONS", path, origin=origin, access_control_request_method="POST", **more)


# --- the decision, sans I/O -------------------------------------------------------------------

def test_a_preflight_from_a_listed_origin_allows_what_it_asks_for():
    server = m.Server(cors_origins=(APP, "http://localhost:5173"), cors_max_age=120)
    status, headers, body = cors.preflight(server, preflight_head(access_control_request_headers=SDK_HEADERS))
    got = dict(headers)
    assert (status, body) == (204, b"")
    assert got[b"access-control-allow-origin"] == APP.encode()
    assert got[b"access-control-allow-methods"] == b"POST"
    assert got[b"access-control-allow-headers"] == SDK_HEADERS.encode()
    assert got[b"access-control-max-age"] == b"120"
    assert b"origin" in got[b"vary"]
    assert b"access-control-allow-credentials" not in got


@pytest.mark.parametrize("origins, origin", [((), APP), ((APP,), "https://evil.example"),
                                              ((APP,), "https://app.example.com.evil.example"),
                                              ((APP,), "null"), ((APP,), APP + ":443")])
def test_a_preflight_from_any_other_origin_is_a_403_without_cors_headers(origins, origin):
    status, headers, body = cors.preflight(m.Server(cors_origins=origins), preflight_head(origin))
    assert status == 403
    assert not [n for n, _ in headers if n.startswith(b"access-control-")]
    assert json.loads(body)["error"]["code"] == "cors_origin_not_allowed"


@pytest.mark.parametrize("request_head", [
    head("OPTIONS", "/v1/chat/completions", origin=APP),                            # no method asked: not a preflight
    head("OPTIONS", "/v1/chat/completions", access_control_request_method="POST"),  # no origin
    head("POST", "/v1/chat/completions", origin=APP, access_control_request_method="POST"),
    preflight_head(path="/healthz"), preflight_head(path="/admin/routing"), preflight_head(path="/v1"),
])
def test_what_is_not_a_preflight_on_the_api_is_left_to_the_api(request_head):
    assert cors.preflight(m.Server(cors_origins=(APP,)), request_head) is None


def test_answers_to_a_listed_origin_are_readable_and_vary_by_origin():
    server = m.Server(cors_origins=(APP,))
    got = dict(cors.answer_headers(server, head("POST", "/v1/embeddings", origin=APP)))
    assert got[b"access-control-allow-origin"] == APP.encode()
    assert {b"x-request-id", b"x-hx-deployment", b"retry-after", b"x-ratelimit-remaining-tokens"} <= {
        h.strip() for h in got[b"access-control-expose-headers"].split(b",")}
    assert got[b"vary"] == b"origin"
    # another origin, or none: nothing to read, but a cache must still not mix them up
    assert cors.answer_headers(server, head("POST", "/v1/embeddings", origin="https://evil.example")) == [
        (b"vary", b"origin")]
    assert cors.answer_headers(server, head("POST", "/v1/embeddings")) == [(b"vary", b"origin")]
    assert cors.answer_headers(server, head("GET", "/admin/routing", origin=APP)) == []
    assert cors.answer_headers(m.Server(), head("POST", "/v1/embeddings", origin=APP)) == []


def test_any_origin_is_the_same_answer_for_all_and_never_with_credentials():
    server = m.Server(cors_origins=("*",))
    for h in (head("GET", "/v1/models", origin=APP), head("GET", "/v1/models")):
        got = dict(cors.answer_headers(server, h))
        assert got[b"access-control-allow-origin"] == b"*" and b"vary" not in got
    _, headers, _ = cors.preflight(server, preflight_head("http://anything.test:8080"))
    assert dict(headers)[b"access-control-allow-origin"] == b"*"


def test_credentials_are_allowed_to_listed_origins_when_configured():
    server = m.Server(cors_origins=(APP,), cors_allow_credentials=True)
    assert dict(cors.preflight(server, preflight_head())[1])[b"access-control-allow-credentials"] == b"true"
    assert dict(cors.answer_headers(server, head("GET", "/v1/models", origin=APP)))[
        b"access-control-allow-credentials"] == b"true"


# --- the config --------------------------------------------------------------------------------

def cors_config(lines: str) -> str:
    return "[server]\n" + textwrap.dedent(lines)


@pytest.mark.parametrize("origins", [[APP], ["http://localhost:5173", "http://[::1]:8080"], ["*"],
                                     ["chrome-extension://abcdefghijklmnop", "tauri://localhost"]])
def test_origins_written_as_browsers_send_them_are_taken(origins):
    assert load.loads(cors_config(f"cors_origins = {json.dumps(origins)}")).server.cors_origins == tuple(origins)


@pytest.mark.parametrize("origin, problem", [
    (APP + "/", f"'{APP}/': write it as browsers send it, '{APP}'"),
    ("https://App.Example.com", f"'https://App.Example.com': write it as browsers send it, '{APP}'"),
    (APP + ":443", f"'{APP}:443': write it as browsers send it, '{APP}'"),
    ("https://bücher.de", "'https://bücher.de': write it as browsers send it, 'https://xn--bcher-kva.de'"),
    (APP + "/v1", f"'{APP}/v1': an origin is scheme://host[:port], without a path, query or credentials"),
    ("app.example.com", "'app.example.com' is not scheme://host[:port]"),
    ("https://a.test:0", "'https://a.test:0' is not scheme://host[:port]"),
    ("https://*.example.com", "'https://*.example.com': the only wildcard is \"*\" alone, for every origin"),
    ("null", "'null' is the origin of sandboxed frames and local files, which any page can make; not allowed"),
])
def test_an_origin_that_would_never_match_says_how_to_write_it(origin, problem):
    assert problems(cors_config(f"cors_origins = {json.dumps([origin], ensure_ascii=False)}")) == [
        f"server.cors_origins[0]: {problem}"]


def test_the_any_origin_wildcard_stands_alone_and_never_with_credentials():
    got = problems(cors_config(f"""
        cors_origins = ["*", "{APP}", "{APP}"]
        cors_allow_credentials = true
        cors_max_age = 100000
    """))
    assert got == ['server.cors_origins: "*" allows every origin; list nothing else with it',
                   f"server.cors_origins[2]: '{APP}' is listed twice",
                   'server.cors_allow_credentials: not with cors_origins = ["*"]; list the origins',
                   "server.cors_max_age: must be 0 to 86400 seconds (browsers cap it: Chrome at 7200)"]


def test_check_config_shows_the_origins():
    config = load.loads(cors_config(f'cors_origins = ["{APP}", "{OTHER}"]\ncors_allow_credentials = true'))
    assert f"cors:     {APP}, {OTHER} (with credentials)" in summary(compile_config(config, 1)).splitlines()
    assert "cors:" not in summary(compile_config(load.loads(cors_config("")), 1))


# --- a running gateway -------------------------------------------------------------------------

def server_lines(*origins: str, credentials: bool = False) -> str:
    return f"cors_origins = {json.dumps(list(origins))}\ncors_allow_credentials = {str(credentials).lower()}"


async def send_preflight(gw, origin: str = APP, path: str = "/v1/chat/completions", **more: str):
    return await gw.client.request("OPTIONS", path, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", **more})


async def test_a_browser_app_of_a_listed_origin_calls_the_api(nursery):
    gw, up = await single(nursery, server_extra=server_lines(APP, "http://localhost:5173"))
    r = await send_preflight(gw, **{"Access-Control-Request-Headers": SDK_HEADERS})   # no key: browsers send none
    assert r.status_code == 204 and r.content == b""
    assert r.headers["access-control-allow-origin"] == APP
    assert r.headers["access-control-allow-headers"] == SDK_HEADERS
    assert r.headers["access-control-max-age"] == "600"
    assert not up.requests                          # the preflight never leaves the gateway

    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"}, headers={"Origin": APP})
    assert r.status_code == 200
    assert r.headers.get_list("access-control-allow-origin") == [APP]
    assert "x-hx-deployment" in r.headers["access-control-expose-headers"]
    assert "origin" in r.headers["vary"].lower()
    assert "origin" not in up.requests[-1].headers   # CORS is the gateway's business, not the backend's
    await last_record(gw)
    assert [rec["endpoint"] for rec in gw.log.requests()] == ["/v1/chat/completions"]  # no record of the preflight

    async with gw.client.stream("POST", "/v1/chat/completions", json={**CHAT, "model": "m", "stream": True},
                                headers={**AUTH, "Origin": "http://localhost:5173"}) as r:
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert b"[DONE]" in b"".join([chunk async for chunk in r.aiter_bytes()])


async def test_errors_are_readable_by_the_app_too(nursery):
    gw, up = await single(nursery, server_extra=server_lines(APP), key_extra="rpm = 1")
    r = await gw.client.post("/v1/chat/completions", json={**CHAT, "model": "m"}, headers={"Origin": APP})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == APP
    assert r.json()["error"]["code"] == "missing_api_key"
    assert (await gw.post("/v1/chat/completions", {**CHAT, "model": "m"})).status_code == 200
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"}, headers={"Origin": APP})
    assert r.status_code == 429 and r.headers["access-control-allow-origin"] == APP
    assert "retry-after" in r.headers["access-control-expose-headers"] and "retry-after" in r.headers
    r = await gw.client.get("/v1/nope", headers={**AUTH, "Origin": APP})
    assert r.status_code == 404 and r.headers["access-control-allow-origin"] == APP


async def test_other_origins_get_no_cors_headers(nursery):
    gw, up = await single(nursery, server_extra=server_lines(APP))
    r = await send_preflight(gw, "https://evil.example")
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    assert r.json()["error"]["type"] == "permission_error"
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert r.headers["vary"].lower() == "origin"
    # outside the API: health checks and the admin endpoints are not for web pages
    assert (await send_preflight(gw, path="/healthz")).status_code == 405
    r = await send_preflight(gw, path="/admin/routing")
    assert r.status_code == 401 and "access-control-allow-origin" not in r.headers


async def test_without_cors_origins_nothing_changes_but_the_preflight_answer(nursery):
    gw, up = await single(nursery)
    r = await send_preflight(gw)
    assert r.status_code == 403 and "server.cors_origins" in r.json()["error"]["message"]
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"}, headers={"Origin": APP})
    assert r.status_code == 200
    assert not [h for h in r.headers if h.startswith("access-control-")] and "vary" not in r.headers
    r = await gw.client.request("OPTIONS", "/v1/models", headers={"Origin": APP})    # not a preflight
    assert r.status_code == 401


async def test_any_origin_and_credentials(nursery):
    gw, up = await single(nursery, server_extra=server_lines("*"))
    r = await send_preflight(gw, "http://localhost:3000")
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers
    r = await gw.get("/v1/models")                  # no Origin: the same answer, so no Vary
    assert r.headers["access-control-allow-origin"] == "*" and "vary" not in r.headers

    gw, up = await single(nursery, server_extra=server_lines(APP, credentials=True))
    r = await send_preflight(gw)
    assert r.headers["access-control-allow-credentials"] == "true"
    r = await gw.get("/v1/models", headers={"Origin": APP})
    assert r.headers["access-control-allow-credentials"] == "true"


async def test_a_backends_own_cors_headers_never_reach_the_browser(nursery):
    gw, up = await single(nursery, server_extra=server_lines(APP))
    headers = [("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Credentials", "true"),
               ("x-ratelimit-remaining-requests", "99")]
    up.script(Reply(headers=headers), Reply(headers=headers))
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"}, headers={"Origin": APP})
    assert r.headers.get_list("access-control-allow-origin") == [APP]
    assert "access-control-allow-credentials" not in r.headers
    assert r.headers["x-ratelimit-remaining-requests"] == "99"
    gw, up2 = await single(nursery)
    up2.script(Reply(headers=headers))
    r = await gw.post("/v1/chat/completions", {**CHAT, "model": "m"}, headers={"Origin": APP})
    assert r.status_code == 200 and not [h for h in r.headers if h.startswith("access-control-")]


async def test_a_reload_changes_the_origins(nursery, tmp_path):
    gw, up = await single(nursery, server_extra=server_lines(APP))
    config = gw.daemon.holder.current.config
    path = tmp_path / "hxgwd.toml"
    path.write_text(dump.dumps(attrs.evolve(config, server=attrs.evolve(config.server, cors_origins=(OTHER,))),
                               redact=False))
    gw.daemon.config_path = str(path)
    assert await gw.daemon.reload()
    assert (await send_preflight(gw, APP)).status_code == 403
    r = await send_preflight(gw, OTHER)
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == OTHER
