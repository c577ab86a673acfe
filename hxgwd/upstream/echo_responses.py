"""The echo's Responses API: POST /responses answers with the last user input (streamed as the
real event sequence too), and GET / DELETE /responses/{id} serve what it stored.

A stored response is kept (state.responses: the last 256, bounded in bytes) unless the request
said `store: false`, as OpenAI does; `previous_response_id` must name one it still holds, which is
how a gateway's pass-through to "the deployment that made it" can be tested.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterator

from hxgwd.upstream import UpstreamRequest
from hxgwd.upstream.echo_common import (
    ENCODE, JSON, WORD, Body, EchoResponse, EchoState, Form, error_reply, joined, json_reply,
    limit_words, model_of, sse_reply, text_of, word_count,
)


def responses(body: Body, req: UpstreamRequest, state: EchoState) -> EchoResponse:
    if isinstance(body, Form):
        return error_reply(400, "The body must be JSON.")
    given = body.get("input")
    if isinstance(given, str):
        messages: list[Any] = [{"role": "user", "content": given}]
    elif isinstance(given, list):
        messages = [m for m in given if isinstance(m, dict) and m.get("type", "message") == "message"]
    else:
        return error_reply(400, "'input' must be a string or an array of input items.", "input")
    previous = body.get("previous_response_id")
    earlier = state.responses.get(previous) if isinstance(previous, str) else None
    if previous is not None and earlier is None:
        return error_reply(400, f"Previous response with id '{previous}' not found.",
                           "previous_response_id", "previous_response_not_found")
    instructions = body.get("instructions") if isinstance(body.get("instructions"), str) else None
    input_tokens = word_count(instructions or "") + sum(word_count(text_of(m.get("content"))) for m in messages)
    if earlier is not None:    # the conversation so far is input again, as OpenAI counts it
        input_tokens += json.loads(earlier)["usage"]["total_tokens"]
    last: dict[str, Any] = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    text = text_of(last.get("content"))
    end, count, cut = limit_words(text, body.get("max_output_tokens"))
    ident, item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    status = "incomplete" if cut else "completed"
    usage = {"input_tokens": input_tokens,
             # cache_write_tokens: openai-python 3.63 requires it (older SDKs knew cached_tokens only)
             "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
             "output_tokens": count, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": input_tokens + count}
    answer = joined(text, end)
    part = {"type": "output_text", "text": answer, "annotations": [], "logprobs": []}
    item = {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}
    final = _response(body, ident, int(time.time()), instructions, status, [item], usage)
    store = body.get("store") is not False
    if store:
        state.responses.put(ident, ENCODE(final).encode())
    if body.get("stream") is not True:   # as the gateway reads it: "true" or 1 is not a stream
        return json_reply(200, final)

    def events() -> Iterator[dict[str, Any]]:
        started = {**final, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
        at = {"item_id": item_id, "output_index": 0, "content_index": 0}
        yield {"type": "response.created", "response": started}
        yield {"type": "response.in_progress", "response": started}
        yield {"type": "response.output_item.added", "output_index": 0,
               "item": {**item, "status": "in_progress", "content": []}}
        yield {"type": "response.content_part.added", **at, "part": {**part, "text": ""}}
        for i, word in enumerate(WORD.finditer(text, 0, end)):
            yield {"type": "response.output_text.delta", **at,
                   "delta": word.group() if i == 0 else " " + word.group(), "logprobs": []}
        yield {"type": "response.output_text.done", **at, "text": answer, "logprobs": []}
        yield {"type": "response.content_part.done", **at, "part": part}
        yield {"type": "response.output_item.done", "output_index": 0, "item": item}
        # the last event carries the whole response, usage included; none before it does
        yield {"type": "response.incomplete" if cut else "response.completed", "response": final}

    def numbered() -> Iterator[dict[str, Any]]:
        for n, event in enumerate(events()):
            yield {**event, "sequence_number": n}
    return sse_reply(numbered(), done=False, named=True)


def _response(body: dict[str, Any], ident: str, created: int, instructions: str | None, status: str,
              output: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    """A Response object with every field OpenAI returns, the request's settings echoed."""
    def number(name: str, default: float) -> float:
        value = body.get(name)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default
    metadata = body.get("metadata")
    return {
        "id": ident, "object": "response", "created_at": created, "status": status,
        "background": False, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": instructions, "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None, "model": model_of(body), "output": output, "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
        "store": body.get("store") is not False, "temperature": number("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto", "tools": [],
        "top_logprobs": 0, "top_p": number("top_p", 1.0), "truncation": "disabled", "usage": usage,
        "user": None, "metadata": metadata if isinstance(metadata, dict) else {},
    }


def response_by_id(body: Body, req: UpstreamRequest, state: EchoState) -> EchoResponse:
    """GET /responses/{id}: the stored response; DELETE: forget it. 404 for an id this backend
    never stored (or no longer holds)."""
    ident = req.path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if req.method not in ("GET", "DELETE"):
        return error_reply(405, f"Method {req.method} is not allowed on /responses/{{id}}.")
    if req.method == "DELETE":
        if not state.responses.delete(ident):
            return _not_found(ident)
        return json_reply(200, {"id": ident, "object": "response", "deleted": True})
    doc = state.responses.get(ident)
    if doc is None:
        return _not_found(ident)
    return EchoResponse(200, list(JSON), [doc])


def _not_found(ident: str) -> EchoResponse:
    return error_reply(404, f"Response with id '{ident}' not found.", None, None)
