"""GET /metrics: the exposition parses (prometheus_client's parsers, both formats), the series
follow requests, label values never come from request data, and the scrape needs an admin key
(Bearer or Basic's password) unless [metrics] public."""

from __future__ import annotations

import base64
import calendar
import ssl
import time

import httpx
import pytest
import trio
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from hxgwd.metrics import certs, exposition
from hxgwd.metrics.registry import Counter, Gauge, Histogram
from tests.conftest import AUTH, DEV_KEY, gateway_config, start_gateway
from tests.fakeupstream import FakeUpstream

ADMIN = {"Authorization": f"Bearer {DEV_KEY}"}


def test_exposition_parses_in_both_formats_with_escaped_labels():
    c = Counter("t_requests", "a help with \\ and\nnewline", ("model",))
    c.inc(('we"ird\\na\nme',), 2)
    h = Histogram("t_seconds", "h", ("model",), (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(("m",), v)
    g = Gauge("t_up", "g", values=[((), 1.0)])
    empty = Counter("t_empty", "nothing yet", ("x",))
    for text, parse in ((exposition.render([c, h, g, empty]), parse_text),
                        (exposition.render([c, h, g, empty], openmetrics=True), parse_openmetrics)):
        fams = {f.name: f for f in parse(text.decode())}
        assert "t_empty" not in fams
        assert [s.labels["model"] for s in fams["t_requests"].samples if s.name.endswith("_total")] == ['we"ird\\na\nme']
        buckets = {s.labels["le"]: s.value for s in fams["t_seconds"].samples if s.name == "t_seconds_bucket"}
        assert buckets == {"0.1": 2, "1.0": 3, "+Inf": 4}
        assert [s.value for s in fams["t_seconds"].samples if s.name == "t_seconds_sum"] == [3.65]
    assert exposition.render([g], openmetrics=True).endswith(b"# EOF\n")


@pytest.mark.parametrize("accept, wanted", [
    (None, False), (b"text/plain", False),
    (b"application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.1", True),
    (b"application/openmetrics-text; q=0", False)])
def test_openmetrics_by_accept(accept, wanted):
    assert exposition.wants_openmetrics(accept) is wanted


def test_certificate_expiry_from_der(tmp_path):
    from tests.test_tls_server import make_cert
    cert, _key = make_cert(tmp_path, "c", dates=("20300102030405Z", "20450607080910Z"))
    with open(cert, "rb") as f:
        der = ssl.PEM_cert_to_DER_cert(f.read().decode())
    assert certs.not_after(der) == calendar.timegm((2045, 6, 7, 8, 9, 10))


async def scrape(gw, headers=ADMIN, accept: str | None = None) -> dict:
    r = await gw.client.get("/metrics", headers={**headers, **({"Accept": accept} if accept else {})})
    assert r.status_code == 200, r.text
    parse = parse_openmetrics if accept and "openmetrics" in accept else parse_text
    return {f.name: f for f in parse(r.text)}


def samples(fams: dict, name: str, **labels) -> list:
    fam = fams[name]
    return [s for s in fam.samples if all(s.labels.get(k) == v for k, v in labels.items())]


def config(up: FakeUpstream, extra: str = "") -> str:
    return gateway_config(f"""
        [[backends]]
        name = "u"
        url = "{up.url}"
        [[models]]
        name = "m"
        backend = "u"
        input_cost_per_1k = 1.0
        output_cost_per_1k = 2.0
    """, extra).replace('sha256 = ', 'admin = true\nsha256 = ', 1)


async def test_series_follow_requests_and_unknown_models_make_none(nursery, upstream):
    gw = await start_gateway(nursery, config(upstream))
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert (await gw.post("/v1/chat/completions", chat)).status_code == 200
    assert (await gw.post("/v1/chat/completions", {**chat, "stream": True})).status_code == 200
    assert (await gw.post("/v1/chat/completions", {**chat, "model": "made-up-9"})).status_code == 404
    assert (await gw.client.post("/v1/chat/completions", json=chat)).status_code == 401
    assert (await gw.get("/v1/no/such/path")).status_code == 404
    await trio.sleep(0.3)      # records are observed in idle work, within idle.MAX_WAIT
    fams = await scrape(gw)
    ok = samples(fams, "hxgwd_requests", endpoint="chat.completions", model="m", deployment="m@u", status_class="2xx")
    assert [s.value for s in ok if s.name == "hxgwd_requests_total"] == [2], fams["hxgwd_requests"].samples
    assert samples(fams, "hxgwd_requests", endpoint="chat.completions", model="", deployment="", status_class="4xx")
    assert samples(fams, "hxgwd_requests", endpoint="unknown", status_class="4xx")
    text = (await gw.client.get("/metrics", headers=ADMIN)).text
    assert "made-up-9" not in text and "/no/such" not in text
    assert samples(fams, "hxgwd_tokens", model="m", key="dev", type="input")[0].value > 0
    assert samples(fams, "hxgwd_cost_usd", model="m", key="dev")[0].value > 0
    assert samples(fams, "gen_ai_server_request_duration_seconds", gen_ai_response_model="m")
    assert samples(fams, "gen_ai_server_time_to_first_token_seconds", gen_ai_response_model="m")
    assert samples(fams, "gen_ai_client_token_usage", gen_ai_token_type="output", gen_ai_response_model="m")
    assert samples(fams, "hxgwd_deployment_up", deployment="m@u", model="m", backend="u")[0].value == 1
    assert samples(fams, "hxgwd_deployment_breaker_state", deployment="m@u")[0].value == 0
    assert samples(fams, "hxgwd_pool_connections", backend="u", state="idle")[0].value >= 1
    assert samples(fams, "hxgwd_requests_in_flight")[0].value == 0
    assert samples(fams, "hxgwd_connections", state="active")[0].value >= 1
    assert samples(fams, "hxgwd_build_info")[0].labels["version"]
    # a scrape is not an API request: none of the series above counts it
    assert not samples(fams, "hxgwd_requests", endpoint="metrics")
    om = await scrape(gw, accept="application/openmetrics-text; version=1.0.0")
    assert om["hxgwd_requests"].type == "counter" and om["hxgwd_request_overhead_seconds"].type == "histogram"


async def test_scrape_needs_an_admin_key_as_bearer_or_basic_password(nursery, upstream):
    text = config(upstream).replace('[[keys]]', '[[keys]]\nname = "app"\nsha256 = "'
                                    + "ab" * 32 + '"\n[[keys]]', 1)
    gw = await start_gateway(nursery, text)
    r = await gw.client.get("/metrics")
    assert r.status_code == 401
    assert 'Basic realm="hxgwd"' in r.headers.get_list("www-authenticate")[0]
    assert (await gw.client.get("/metrics", headers={"Authorization": "Bearer sk-wrong"})).status_code == 401
    basic = base64.b64encode(f"prometheus:{DEV_KEY}".encode()).decode()
    assert (await gw.client.get("/metrics", headers={"Authorization": f"Basic {basic}"})).status_code == 200
    bad = base64.b64encode(b"prometheus:sk-wrong").decode()
    assert (await gw.client.get("/metrics", headers={"Authorization": f"Basic {bad}"})).status_code == 401
    assert (await gw.client.get("/metrics", auth=httpx.BasicAuth("x", DEV_KEY))).status_code == 200
    r = await gw.client.post("/metrics", headers=ADMIN)
    assert r.status_code == 405


async def test_non_admin_key_is_403_and_public_opens_it(nursery, upstream):
    gw = await start_gateway(nursery, gateway_config(f"""
        [[backends]]
        name = "u"
        url = "{upstream.url}"
        [[models]]
        name = "m"
        backend = "u"
    """))
    assert (await gw.client.get("/metrics", headers=AUTH)).status_code == 403
    gw2 = await start_gateway(nursery, config(upstream, "[metrics]\npublic = true\n"))
    r = await gw2.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")


async def test_reload_results_are_counted(nursery, upstream, tmp_path):
    path = tmp_path / "hxgwd.toml"
    path.write_text(config(upstream))
    gw = await start_gateway(nursery, path.read_text())
    gw.daemon.config_path = str(path)
    assert await gw.daemon.reload()
    path.write_text("[server]\nnonsense = 1\n")
    assert not await gw.daemon.reload()
    fams = await scrape(gw)
    assert samples(fams, "hxgwd_reloads", result="ok")[0].value == 1
    assert samples(fams, "hxgwd_reloads", result="rejected")[0].value == 1
    assert samples(fams, "hxgwd_config_last_reload_successful")[0].value == 0
    assert samples(fams, "hxgwd_config_generation")[0].value == 2
    assert abs(samples(fams, "hxgwd_config_loaded_timestamp_seconds")[0].value - time.time()) < 60
