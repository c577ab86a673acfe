"""The OpenAPI document (docs/openapi.yaml -> hxgwd/openapi.json, served at GET /openapi.json): up
to date, valid OpenAPI 3.1, exactly the routes of the endpoint table (pipeline/endpoints.py), and
true to what the gateway answers."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

import hxgwd
from hxgwd.pipeline import models_api
from hxgwd.pipeline.endpoints import ENDPOINTS, TABLE
from tests.conftest import AUTH, gateway_config, start_gateway

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
# endpoints that exist only to refuse: listed in the document's x-hxgwd-not-served, with their code
REFUSALS = {models_api.not_served: "unsupported_endpoint", models_api.unknown: "unknown_url"}

# entries that take an admin key as Bearer or as Basic's password: /metrics checks it itself
# ("anyone" in the table, for [metrics] public), /status is "monitor"
OWN_CREDENTIALS = {"/metrics", "/status"}


def load_build() -> Any:
    spec = importlib.util.spec_from_file_location("docs_build", ROOT / "docs" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("docs_build", module)
    spec.loader.exec_module(module)
    return module


DOC: dict[str, Any] = json.loads(models_api.OPENAPI_JSON)


def test_the_served_json_is_made_from_the_yaml_and_up_to_date():
    build = load_build()
    assert (ROOT / "hxgwd" / "openapi.json").read_bytes() == models_api.OPENAPI_JSON
    assert build.openapi_json().encode() == models_api.OPENAPI_JSON, \
        "hxgwd/openapi.json is out of date: run python docs/build.py"
    assert DOC["info"]["version"] == hxgwd.__version__


def test_the_document_is_valid_openapi_3_1():
    assert DOC["openapi"].startswith("3.1.")
    validate(DOC)
    ids = [op["operationId"] for item in DOC["paths"].values() for m, op in item.items() if m in METHODS]
    assert len(ids) == len(set(ids))


def documented() -> dict[str, set[str]]:
    return {path: {m.upper() for m in item if m in METHODS} for path, item in DOC["paths"].items()}


def served() -> list[tuple[Any, str]]:
    """(endpoint, path) of every route served, the /v1-less aliases left out (the document says
    they exist), and the refusals (listed apart)."""
    out = []
    for ep in ENDPOINTS:
        if ep.serve in REFUSALS:
            continue
        for path in ep.paths:
            if not path.startswith("/v1/") and "/v1" + path in ep.paths:
                continue
            out.append((ep, path))
    return out


def test_every_route_served_is_documented_with_its_methods():
    docs = documented()
    missing = []
    for ep, path in served():
        if path.endswith("/"):       # a prefix: an id or a name below it, documented as /path/{param}...
            below = {p: m for p, m in docs.items() if p.startswith(path + "{")}
            if not below:
                missing.append(f"{ep.name}: {path}{{...}}")
            else:
                methods = set().union(*below.values())
                assert methods == set(ep.methods), f"{ep.name} {path}: documented {methods}, served {ep.methods}"
        elif path not in docs:
            missing.append(f"{ep.name}: {path}")
        else:
            assert docs[path] == set(ep.methods), f"{ep.name} {path}: documented {docs[path]}, served {ep.methods}"
    assert not missing, f"served but not in docs/openapi.yaml: {missing}"


def test_every_documented_path_is_served():
    for path, methods in documented().items():
        found = TABLE.find(re.sub(r"\{[^}]+\}", "x", path))
        assert found is not None, f"{path} is documented but not served"
        ep = found.endpoint
        assert ep.serve not in REFUSALS, f"{path} is documented, but {ep.name} only refuses it"
        assert methods <= set(ep.methods), f"{path}: documented {methods}, served {ep.methods}"
        assert (path in ep.paths) == (found.rest == ""), path


def test_the_refused_paths_are_listed_with_their_codes():
    refused = {path.rstrip("/"): REFUSALS[ep.serve] for ep in ENDPOINTS if ep.serve in REFUSALS
               for path in ep.paths}
    assert DOC["x-hxgwd-not-served"] == refused


def test_each_operation_asks_for_the_credentials_its_endpoint_needs():
    for path, item in DOC["paths"].items():
        found = TABLE.find(re.sub(r"\{[^}]+\}", "x", path))
        access = "admin" if path in OWN_CREDENTIALS else found.endpoint.access if found else "key"
        for method, op in item.items():
            if method not in METHODS:
                continue
            schemes = {name for requirement in op.get("security", DOC["security"]) for name in requirement}
            if access == "anyone":
                assert op["security"] == [], path
            elif access == "admin":
                assert "adminBearer" in schemes and "bearer" not in schemes, path
                assert ("adminBasic" in schemes) == (path in OWN_CREDENTIALS), path
            else:
                assert schemes == {"bearer", "apiKey", "xApiKey"}, path
            if access != "anyone":
                assert "401" in op["responses"], f"{method} {path}"


# --- the document against real answers ----------------------------------------------------------

def schema_of(name: str) -> OAS31Validator:
    return OAS31Validator({"$ref": f"#/components/schemas/{name}", "components": DOC["components"]})


def conforms(name: str, value: Any) -> None:
    errors = [e.message for e in schema_of(name).iter_errors(value)]
    assert not errors, f"{name}: {errors}"


def headers_of(response: str) -> set[str]:
    return {h.lower() for h in DOC["components"]["responses"][response].get("headers", {})}


ECHO = """
    [[backends]]
    name = "echo"
    kind = "echo"
    [[models]]
    name = "chat"
    backend = "echo"
    [[models]]
    name = "emb"
    backend = "echo"
    kind = "embedding"
    [groups.both]
    models = ["chat"]
"""


async def test_openapi_json_is_served_to_anyone_and_not_logged(nursery):
    gw = await start_gateway(nursery, gateway_config(ECHO))
    r = await gw.client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == DOC
    h = await gw.client.head("/openapi.json")
    assert h.status_code == 200 and h.content == b"" and h.headers["content-length"] == r.headers["content-length"]
    r = await gw.client.post("/openapi.json")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    conforms("Error", r.json())
    await gw.stop()
    assert not [line for line in gw.log.requests() if "openapi" in json.dumps(line)]


async def test_answers_conform_to_the_document(nursery, tmp_path):
    db = tmp_path / "hxgwd.db"
    cfg = gateway_config(ECHO, database=f"sqlite:///{db}").replace("sha256 =", "admin = true\nsha256 =")
    gw = await start_gateway(nursery, cfg)
    conforms("Health", (await gw.client.get("/healthz")).json())
    conforms("Ready", (await gw.client.get("/readyz")).json())
    models = await gw.get("/v1/models")
    conforms("ModelList", models.json())
    assert {"group", "kind"} <= {k for m in models.json()["data"] for k in m}
    conforms("Model", (await gw.get("/v1/models/chat")).json())

    chat = await gw.post("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200
    assert headers_of("Proxied") - {"x-accel-buffering"} <= set(chat.headers)
    assert re.fullmatch(DOC["components"]["headers"]["X-HX-Overhead-Ms"]["schema"]["pattern"],
                        chat.headers["x-hx-overhead-ms"])
    stream = await gw.post("/v1/chat/completions", {"model": "chat", "stream": True,
                                                    "messages": [{"role": "user", "content": "hi"}]})
    assert headers_of("Proxied") <= set(stream.headers)

    unauthorized = await gw.client.get("/v1/models")
    assert unauthorized.status_code == 401 and headers_of("Unauthorized") <= set(unauthorized.headers)
    conforms("Error", unauthorized.json())
    wrong_kind = await gw.post("/v1/embeddings", {"model": "chat", "input": "x"})
    assert wrong_kind.status_code == 400
    conforms("Error", wrong_kind.json())
    unknown = await gw.post("/v1/chat/completions", {"model": "nope", "messages": []})
    assert unknown.status_code == 404
    conforms("Error", unknown.json())
    not_served = await gw.get("/v1/files")
    assert not_served.json()["error"]["code"] == DOC["x-hxgwd-not-served"]["/v1/files"]

    conforms("RoutingTable", (await gw.get("/admin/routing")).json())
    conforms("Stats", (await gw.get("/admin/stats")).json())
    made = await gw.post("/admin/keys", {"name": "team-a", "models": ["chat"], "rpm": 10, "budget_usd": 5})
    assert made.status_code == 201
    conforms("KeyCreated", made.json())
    conforms("KeyCreate", {"name": "team-a", "models": ["chat"], "rpm": 10, "budget_usd": 5})
    conforms("KeyList", (await gw.get("/admin/keys")).json())
    conforms("KeyInfo", (await gw.get("/admin/keys/team-a")).json())
    revoked = await gw.client.delete("/admin/keys/team-a", headers=AUTH)
    conforms("KeyInfo", revoked.json())
    assert revoked.json()["status"] == "revoked"
    await gw.stop()          # the usage records written

    gw = await start_gateway(nursery, cfg)
    for by in ("key", "model", "deployment", "day"):
        report = (await gw.get(f"/admin/usage?by={by}&since=1d")).json()
        conforms("UsageReport", report)
        assert report["data"], by
    conflict = await gw.post("/admin/keys", {"name": "dev"})     # the config's key
    assert conflict.status_code == 409
    conforms("Error", conflict.json())


@pytest.mark.parametrize("name", ["Health", "Ready", "ModelList", "KeyInfo", "UsageReport", "Error"])
def test_schemas_are_strict_enough_to_catch_a_wrong_answer(name):
    wrong = {"error": {"message": 1}} if name != "Error" else {"error": {"message": "m"}}
    with pytest.raises(AssertionError):
        conforms(name, wrong)
