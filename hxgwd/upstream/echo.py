"""The echo backend: an in-process OpenAI-compatible upstream with no network and no tokens spent.

Chat answers with the last user message (streamed too), completions with the prompt, embeddings
with deterministic unit vectors (same text, same vector) of the configured size, the Responses
API with the last user input (streamed as its event sequence; kept for GET and DELETE by id),
moderations flag the word "hx-flag", rerank scores by shared words, transcriptions describe the
uploaded file, speech is silence as long as the words, images are 1x1 PNGs. Each answer carries
the `usage` block OpenAI's would, counting whitespace-separated words as tokens. It sits behind
the same transport interface as a real backend, so its requests go through routing, transforms and
records like any other: operators use it to smoke-test a deployment end to end.

Each endpoint's answer is a plain function (echo_common.Answer: body, request, state ->
EchoResponse); ECHO_ANSWERS maps the upstream path below /v1 to it, and the gateway's endpoint
table may hand EchoBackend its own mapping instead.
"""

from __future__ import annotations

import json
import re
from typing import Mapping

import attrs
import trio

from hxgwd.config.model import Timeouts
from hxgwd.offload import OFF_LOOP_BYTES, Offload
from hxgwd.pipeline.body import json_document_in_steps
from hxgwd.upstream import UpstreamRequest
from hxgwd.upstream.echo_common import (
    Answer, Body, EchoResponse, EchoState, error_reply, json_reply, word_count,
)
from hxgwd.upstream.echo_media import (
    images_generations, parse_form, speech, transcriptions, translations,
)
from hxgwd.upstream.echo_responses import response_by_id, responses
from hxgwd.upstream.echo_text import (
    chat_completions, completions, embeddings, moderations, rerank, unit_vector,
)

__all__ = ["ECHO_ANSWERS", "EchoBackend", "EchoResponse", "EchoState", "unit_vector"]
_word_count = word_count      # the name tests/test_large_requests.py imports


def models(body: Body, req: UpstreamRequest, state: EchoState) -> EchoResponse:
    if req.method not in ("GET", "HEAD"):
        return error_reply(405, f"Method {req.method} is not allowed on /models.")
    return json_reply(200, {"object": "list", "data": [
        {"id": "echo", "object": "model", "created": 0, "owned_by": "hxgwd"}]})


# Keys are OpenAI paths below /v1; "{name}" stands for one path segment.
ECHO_ANSWERS: dict[str, Answer] = {
    "/models": models,
    "/chat/completions": chat_completions,
    "/completions": completions,
    "/embeddings": embeddings,
    "/responses": responses,
    "/responses/{id}": response_by_id,
    "/moderations": moderations,
    "/rerank": rerank,
    "/audio/transcriptions": transcriptions,
    "/audio/translations": translations,
    "/audio/speech": speech,
    "/images/generations": images_generations,
}


class EchoBackend:
    def __init__(self, dimensions: int, delay: float = 0.0, answers: Mapping[str, Answer] | None = None) -> None:
        self.state = EchoState(dimensions)
        self._offload = Offload()
        self.delay = delay
        self._routes = _routes(ECHO_ANSWERS if answers is None else answers)
        self._by_path: dict[str, Answer | None] = {}    # the routes' verdicts, for paths seen before

    @property
    def dimensions(self) -> int:
        return self.state.dimensions

    async def request(self, req: UpstreamRequest, timeouts: Timeouts) -> EchoResponse:
        if self.delay:
            with trio.fail_after(timeouts.first_byte):
                await trio.sleep(self.delay)
        data = req.body
        if not isinstance(data, bytes):     # in pieces (an upload): the echo reads it whole
            data = b"".join(data)
            req = attrs.evolve(req, body=data)
        # a large body is parsed and answered in a thread (offload.py), as the gateway parses it
        return await self._offload.run(len(data), self._answer, req, data)

    def _answer(self, req: UpstreamRequest, data: bytes) -> EchoResponse:
        """`data`: req.body, whole."""
        path = req.path.split("?", 1)[0]
        try:
            answer = self._by_path[path]
        except KeyError:
            key, answer = next(((k, a) for k, pattern, a in self._routes if pattern.search(path)), ("", None))
            # not paths with ids (/responses/{id}), nor more than a few: each is a new path
            if "{" not in key and len(self._by_path) < 64:
                self._by_path[path] = answer
        if answer is None:
            return error_reply(404, f"No echo endpoint at {path}.")
        content_type = next((v.decode("latin-1") for k, v in req.headers if k.lower() == b"content-type"), "")
        body: Body
        if content_type.lower().startswith("multipart/form-data") or data.startswith(b"--"):
            try:
                body = parse_form(data, content_type)
            except ValueError as exc:
                return error_reply(400, f"The body is not valid multipart/form-data: {exc}.")
            return answer(body, req, self.state)
        try:
            parsed = ((json.loads if len(data) < OFF_LOOP_BYTES else json_document_in_steps)(data)
                      if data else {})
            if not isinstance(parsed, dict):
                raise ValueError
        except ValueError:
            return error_reply(400, "The body is not a JSON object.")
        return answer(parsed, req, self.state)


def _routes(answers: Mapping[str, Answer]) -> list[tuple[str, re.Pattern[str], Answer]]:
    """A pattern per path, matching it at the end of a request's path (the backend's base path,
    /v1 or another, goes before it); the longest first, so /chat/completions is not taken for
    /completions."""
    def pattern(key: str) -> re.Pattern[str]:
        return re.compile(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(key)) + "$")
    return [(key, pattern(key), answers[key]) for key in sorted(answers, key=len, reverse=True)]
