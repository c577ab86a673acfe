"""The table of endpoints: every path the gateway answers, and what each one is (endpoint.py).

Adding an API is one entry here plus its tests. Proxied endpoints answer under `/v1` and, as
LiteLLM and vLLM do, without it. Admin routes, health and the model list are entries too.
"""

from __future__ import annotations

from typing import Any, Iterable

from hxgwd import admin, status_page
from hxgwd.limits import estimate as limit
from hxgwd.pipeline import metrics_api, models_api, serve_form, serve_model, transform
from hxgwd.pipeline.endpoint import Endpoint, Table
from hxgwd.runtime import Deployment

KINDS = ("chat", "embedding", "moderation", "rerank", "transcription", "speech", "image")


def input_only(kind: str, payload: dict[str, Any], prompt_bytes: int,
               deployments: Iterable[Deployment]) -> limit.Estimate:
    """APIs that produce no tokens of text (moderation, rerank, speech, images): the input's."""
    return limit.estimate(kind, prompt_bytes, 0, deployments)


def _proxied(name: str, upstream: str, kind: str, plan: Any, estimate: Any = input_only,
             stores_answers: bool = False) -> Endpoint:
    return Endpoint(name=name, paths=("/v1" + upstream, upstream), methods=("POST",), serve=serve_model.proxied,
                    kind=kind, upstream=upstream, model_from="json", plan=plan, estimate=estimate,
                    stores_answers=stores_answers)


def _form(name: str, upstream: str) -> Endpoint:
    return Endpoint(name=name, paths=("/v1" + upstream, upstream), methods=("POST",), serve=serve_form.transcribe,
                    kind="transcription", upstream=upstream, model_from="multipart")


def _admin(name: str, path: str, methods: tuple[str, ...], serve: Any) -> Endpoint:
    return Endpoint(name=name, paths=(path,), methods=methods, serve=serve, access="admin")


ENDPOINTS = (
    Endpoint(name="health", paths=("/healthz",), methods=("GET",), serve=models_api.health, access="anyone"),
    Endpoint(name="ready", paths=("/readyz",), methods=("GET",), serve=models_api.ready, access="anyone"),
    # checks its own credentials (admin key as Bearer or Basic password, or [metrics] public)
    Endpoint(name="metrics", paths=("/metrics",), methods=("GET",), serve=metrics_api.metrics, access="anyone"),
    # the document of this table (docs/openapi.yaml): the same for every config, open like the health checks
    Endpoint(name="openapi", paths=("/openapi.json",), methods=("GET",), serve=models_api.openapi, access="anyone"),
    # for the person on call, in a browser: an admin key as Basic's password too (endpoint.py)
    Endpoint(name="status", paths=("/status",), methods=("GET",), serve=status_page.status, access="monitor"),
    Endpoint(name="models", paths=("/v1/models", "/models", "/v1/models/", "/models/"), methods=("GET",),
             serve=models_api.models),
    _proxied("chat.completions", "/chat/completions", "chat", transform.plan_chat, limit.estimate_request),
    _proxied("completions", "/completions", "chat", transform.plan_chat, limit.estimate_request),
    _proxied("responses", "/responses", "chat", transform.plan_responses, limit.estimate_request,
             stores_answers=True),
    Endpoint(name="responses.stored", paths=("/v1/responses/", "/responses/"), methods=("GET", "DELETE", "POST"),
             serve=serve_model.stored_response, upstream="/responses"),
    _proxied("embeddings", "/embeddings", "embedding", transform.plan_embeddings, limit.estimate_request),
    _proxied("moderations", "/moderations", "moderation", transform.plan_json),
    _proxied("rerank", "/rerank", "rerank", transform.plan_json),
    Endpoint(name="rerank.v2", paths=("/v2/rerank",), methods=("POST",), serve=serve_model.proxied,
             kind="rerank", upstream="/rerank", model_from="json", plan=transform.plan_json, estimate=input_only),
    _proxied("audio.speech", "/audio/speech", "speech", transform.plan_speech),
    _form("audio.transcriptions", "/audio/transcriptions"),
    _form("audio.translations", "/audio/translations"),
    _proxied("images.generations", "/images/generations", "image", transform.plan_json),
    Endpoint(name="unsupported", serve=models_api.not_served, methods=("GET", "POST", "DELETE"),
             paths=tuple(p for api in ("files", "batches", "uploads", "fine_tuning", "assistants", "threads",
                                       "vector_stores", "realtime")
                         for p in (f"/v1/{api}", f"/v1/{api}/"))),
    _admin("admin.routing", "/admin/routing", ("GET",), admin.routing),
    _admin("admin.stats", "/admin/stats", ("GET",), admin.stats),
    _admin("admin.keys", "/admin/keys", ("GET", "POST"), admin.keys),
    _admin("admin.key", "/admin/keys/", ("GET", "DELETE"), admin.key),
    _admin("admin.usage", "/admin/usage", ("GET",), admin.usage),
    # any other admin path: a key that is not an admin's learns nothing of which exist (403 first)
    _admin("admin.unknown", "/admin/", ("GET", "POST", "DELETE"), models_api.unknown),
)

TABLE = Table(ENDPOINTS)
