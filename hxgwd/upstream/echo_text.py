"""The echo's text answers: chat and text completions (the last user message, streamed too),
embeddings (deterministic unit vectors), moderations and rerank. Tokens are whitespace-separated
words throughout.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
import uuid
from typing import Any, Iterator

from hxgwd.upstream import UpstreamRequest
from hxgwd.upstream.echo_common import (
    ENCODE, JSON, WORD, Body, EchoResponse, EchoState, Form, error_reply, is_tokens, joined,
    json_reply, limit_words, model_of, positive_int, sse_reply, text_of, word_count,
)


def chat_completions(body: Body, req: UpstreamRequest, state: EchoState) -> EchoResponse:
    if isinstance(body, Form):
        return error_reply(400, "The body must be JSON.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return error_reply(400, "'messages' must be a non-empty array.", "messages")
    prompt_words = sum(word_count(text_of(m.get("content"))) for m in messages if isinstance(m, dict))
    last = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {})
    text = text_of(last.get("content"))
    end, count, cut = limit_words(text, body.get("max_completion_tokens") or body.get("max_tokens"))
    finish = "length" if cut else "stop"
    model = model_of(body)
    usage = {"prompt_tokens": prompt_words, "completion_tokens": count, "total_tokens": prompt_words + count}
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.get("stream") is not True:   # as the gateway reads it: "true" or 1 is not a stream
        return json_reply(200, {
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": joined(text, end)},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage})

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def events() -> Iterator[dict[str, Any]]:
        yield chunk({"role": "assistant", "content": ""}, None)
        for i, word in enumerate(WORD.finditer(text, 0, end)):
            yield chunk({"content": word.group() if i == 0 else " " + word.group()}, None)
        yield chunk({}, finish)
        if (body.get("stream_options") or {}).get("include_usage"):
            yield {"id": ident, "object": "chat.completion.chunk", "created": created,
                   "model": model, "choices": [], "usage": usage}
    return sse_reply(events())


def completions(body: Body, req: UpstreamRequest, state: EchoState) -> EchoResponse:
    if isinstance(body, Form):
        return error_reply(400, "The body must be JSON.")
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
    if not isinstance(prompt, str):
        return error_reply(400, "'prompt' must be a string or an array of strings.", "prompt")
    end, count, cut = limit_words(prompt, body.get("max_tokens"))
    finish = "length" if cut else "stop"
    prompt_words = word_count(prompt)
    usage = {"prompt_tokens": prompt_words, "completion_tokens": count, "total_tokens": prompt_words + count}
    ident, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), model_of(body)
    if body.get("stream") is not True:   # as the gateway reads it: "true" or 1 is not a stream
        return json_reply(200, {"id": ident, "object": "text_completion", "created": created, "model": model,
                                "choices": [{"index": 0, "text": joined(prompt, end), "logprobs": None,
                                             "finish_reason": finish}], "usage": usage})

    def events() -> Iterator[dict[str, Any]]:
        for i, word in enumerate(WORD.finditer(prompt, 0, end)):
            yield {"id": ident, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": word.group() if i == 0 else " " + word.group(),
                                "logprobs": None, "finish_reason": finish if i == count - 1 else None}]}
        if (body.get("stream_options") or {}).get("include_usage"):
            yield {"id": ident, "object": "text_completion", "created": created, "model": model,
                   "choices": [], "usage": usage}
    return sse_reply(events())


def embeddings(body: Body, req: UpstreamRequest, state: EchoState) -> EchoResponse:
    if isinstance(body, Form):
        return error_reply(400, "The body must be JSON.")
    given = body.get("input", body.get("prompt"))
    if isinstance(given, str) or is_tokens(given):
        items = [given]
    elif isinstance(given, list) and given and all(isinstance(i, str) or is_tokens(i) for i in given):
        items = given
    else:
        return error_reply(400, "'input' must be a string, an array of strings, or token arrays.", "input")
    as_base64 = body.get("encoding_format") == "base64"
    return EchoResponse(200, list(JSON), _vectors(items, as_base64, model_of(body), state.dimensions), pace=True)


def _vectors(items: list[Any], as_base64: bool, model: str, dimensions: int) -> Iterator[bytes]:
    """The answer in pieces of ~64 KB, each made when it is read: 2,048 vectors of 1,024
    dimensions took the loop for 0.6 s in one go (12.6 s for 20,000)."""
    per_piece = max(1, 65536 // (20 * dimensions))    # ~20 bytes a number as JSON text
    tokens = 0
    piece = [b'{"object":"list","data":[']
    for i, item in enumerate(items):
        text = item if isinstance(item, str) else " ".join(str(t) for t in item)
        tokens += word_count(text) if isinstance(item, str) else len(item)
        vector = unit_vector(text, dimensions)
        value: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
        piece.append((b"," if i else b"") + ENCODE({"object": "embedding", "index": i, "embedding": value}).encode())
        if len(piece) >= per_piece:
            yield b"".join(piece)
            piece = []
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    piece.append(b'],"model":%b,"usage":%b}' % (ENCODE(model).encode(), ENCODE(usage).encode()))
    yield b"".join(piece)


def unit_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic vector of length 1 for `text`."""
    raw = hashlib.shake_256(text.encode()).digest(2 * dimensions)
    values = [v + 0.5 for v in struct.unpack(f"<{dimensions}h", raw)]
    norm = sum(v * v for v in values) ** 0.5
    return [v / norm for v in values]


# --- moderations ------------------------------------------------------------------------------

# Every category OpenAI's omni-moderation reports, and whether it is also applied to images.
MODERATION_CATEGORIES = {
    "harassment": False, "harassment/threatening": False, "hate": False, "hate/threatening": False,
    "illicit": False, "illicit/violent": False, "self-harm": True, "self-harm/intent": True,
    "self-harm/instructions": True, "sexual": True, "sexual/minors": False, "violence": True,
    "violence/graphic": True,
}
# A text containing this word (any case) is flagged for `violence`: tests can see a flag.
FLAG_WORD = "hx-flag"


def moderations(body: Body, req: UpstreamRequest, state: EchoState) -> EchoResponse:
    if isinstance(body, Form):
        return error_reply(400, "The body must be JSON.")
    given = body.get("input")
    if isinstance(given, str):
        inputs: list[tuple[str, bool]] = [(given, False)]
    elif isinstance(given, list) and given and all(isinstance(i, str) for i in given):
        inputs = [(i, False) for i in given]
    elif isinstance(given, list) and given and all(isinstance(i, dict) for i in given):
        # multimodal: one input of text and image parts, one result
        inputs = [(text_of(given), any(p.get("type") == "image_url" for p in given))]
    else:
        return error_reply(400, "'input' must be a string, an array of strings, or an array of "
                                "text and image_url objects.", "input")
    return json_reply(200, {"id": f"modr-{uuid.uuid4().hex[:24]}", "model": model_of(body, "omni-moderation-latest"),
                            "results": [_moderation(text, image) for text, image in inputs]})


def _moderation(text: str, image: bool) -> dict[str, Any]:
    flagged = FLAG_WORD in text.lower()
    categories = {name: False for name in MODERATION_CATEGORIES}
    scores = {name: 0.0 for name in MODERATION_CATEGORIES}
    if flagged:
        categories["violence"], scores["violence"] = True, 0.99
    applied = {name: ["text", "image"] if image and on_images else ["text"]
               for name, on_images in MODERATION_CATEGORIES.items()}
    return {"flagged": flagged, "categories": categories, "category_scores": scores,
            "category_applied_input_types": applied}


# --- rerank -----------------------------------------------------------------------------------

def rerank(body: Body, req: UpstreamRequest, state: EchoState) -> EchoResponse:
    """The Cohere/Jina/vLLM shape. The score is the share of the query's distinct words (any
    case) found in the document: deterministic, and ordered as a reader would expect."""
    if isinstance(body, Form):
        return error_reply(400, "The body must be JSON.")
    query, documents = body.get("query"), body.get("documents")
    if not isinstance(query, str):
        return error_reply(400, "'query' must be a string.", "query")
    if not isinstance(documents, list) or not documents:
        return error_reply(400, "'documents' must be a non-empty array.", "documents")
    texts = [d if isinstance(d, str) else d.get("text") if isinstance(d, dict) else None for d in documents]
    if not all(isinstance(t, str) for t in texts):
        return error_reply(400, "Each document must be a string or an object with a 'text' string.", "documents")
    top_n = body.get("top_n")
    if top_n is not None and not positive_int(top_n):
        return error_reply(400, "'top_n' must be a positive integer.", "top_n")
    query_words = set(query.lower().split())
    query_count = word_count(query)
    scored = []
    for index, text in enumerate(texts):
        assert isinstance(text, str)
        shared = query_words & set(text.lower().split())
        scored.append((round(len(shared) / len(query_words), 6) if query_words else 0.0, index))
    scored.sort(key=lambda s: (-s[0], s[1]))
    results = []
    for score, index in scored[:top_n or len(scored)]:
        result: dict[str, Any] = {"index": index, "relevance_score": score}
        if body.get("return_documents", True) is not False:   # vLLM's and Jina's default
            result["document"] = {"text": texts[index]}
        results.append(result)
    tokens = sum(query_count + word_count(t) for t in texts if isinstance(t, str))
    return json_reply(200, {"id": f"rerank-{uuid.uuid4().hex[:24]}", "model": model_of(body),
                            "results": results, "usage": {"total_tokens": tokens}})
