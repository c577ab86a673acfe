"""The alert rules and the Grafana dashboard that ship with hxgwd: promtool accepts the rules and
their unit tests pass, promtool lints a real scrape, and every metric a rule or a dashboard panel
names is in a real `/metrics` scrape of a gateway with a database, Redis and TLS on (the series
that exist only with those)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DEV_KEY, ROOT, gateway_config, start_gateway
from tests.test_tls_server import client_context, make_cert

RULES = os.path.join(ROOT, "packaging", "hxgwd-alerts.yml")
RULES_TEST = os.path.join(ROOT, "tests", "alerts-test.yml")
DASHBOARD = os.path.join(ROOT, "docs", "grafana-dashboard.json")
NAME = re.compile(r"\b((?:hxgwd|gen_ai)_[a-z0-9_]+)\b")
promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) is not installed")


def rule_expressions() -> list[str]:
    with open(RULES, encoding="utf-8") as f:
        text = f.read()
    # the rules' `expr:` values, one-line or block: everything from expr: to the next key
    return re.findall(r"expr: *\|?\n?((?:.|\n)*?)\n *(?:for|labels):", text)


def dashboard_expressions() -> list[str]:
    with open(DASHBOARD, encoding="utf-8") as f:
        doc = json.load(f)
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in doc["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    return exprs


@promtool
def test_promtool_checks_the_rules_and_runs_their_unit_tests():
    for args in (["check", "rules", RULES], ["test", "rules", RULES_TEST]):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_is_grafana_json_with_a_datasource_variable():
    with open(DASHBOARD, encoding="utf-8") as f:
        doc = json.load(f)
    assert doc["uid"] and doc["panels"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    assert all(t["datasource"]["uid"] == "${datasource}" for p in doc["panels"] for t in p.get("targets", []))


async def test_every_metric_named_by_a_rule_or_the_dashboard_is_scraped(nursery, upstream, tmp_path, redis_server):
    cert, key = make_cert(tmp_path, "gw", days=30)
    text = gateway_config(f"""
        [redis]
        url = "{redis_server.url}"
        [[backends]]
        name = "u"
        url = "{upstream.url}"
        max_connections = 4
        [[models]]
        name = "m"
        backend = "u"
        input_cost_per_1k = 1.0
        max_concurrency = 8
    """, database=f"sqlite:///{tmp_path}/usage.db").replace(
        "[database]\n", f'[database]\nspool_dir = "{tmp_path}/spool"\n', 1).replace(
        "[server]\n", f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n', 1).replace(
        "sha256 = ", "admin = true\nrpm = 1000\nsha256 = ", 1)
    gw = await start_gateway(nursery, text)
    auth = {"Authorization": f"Bearer {DEV_KEY}"}
    async with httpx.AsyncClient(base_url=gw.url.replace("http:", "https:"), verify=client_context(cert),
                                 timeout=30) as client:
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        for body in (chat, {**chat, "stream": True}):
            assert (await client.post("/v1/chat/completions", json=body, headers=auth)).status_code == 200
        await trio.sleep(0.3)       # the records are observed in idle work
        r = await client.get("/metrics", headers=auth)
    assert r.status_code == 200
    samples = [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]
    scraped = {s.name for s in samples}
    labels = {name for s in samples for name in s.labels}       # gen_ai_token_type is a label
    named = {n for expr in rule_expressions() + dashboard_expressions() for n in NAME.findall(expr)} - labels
    assert len(named) > 30
    # a single process has no workers: tests/test_workers.py scrapes these from a supervisor's
    assert sorted(named - scraped - {"hxgwd_worker_restarts_total", "hxgwd_workers"}) == []
    # and the scrape is clean by promtool's linter
    if shutil.which("promtool"):
        done = subprocess.run(["promtool", "check", "metrics"], input=r.content, capture_output=True)
        assert done.returncode == 0, done.stdout + done.stderr
    # a scrape a test or the .ci/run promtool step can look at
    artifacts = os.environ.get("HXGWD_TEST_ARTIFACTS")
    if artifacts:
        os.makedirs(artifacts, exist_ok=True)
        with open(os.path.join(artifacts, "metrics.txt"), "wb") as f:
            f.write(r.content)
