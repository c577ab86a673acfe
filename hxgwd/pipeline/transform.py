"""Stage 6, transform: adapt a request to what a backend accepts, and its answer to what OpenAI
clients expect. Pure: bytes and dicts in, bytes and dicts out; every backend quirk lives here.

Per backend, from its config:
- the public model name is replaced by the deployment's upstream name;
- embeddings take at most `embeddings_max_inputs` inputs per request (400 beyond);
- `embeddings_input = "prompt"`: `input` is renamed `prompt`; a list input becomes one call per
  item (such backends embed one text per call) and the answers are merged in order, within
  `server.max_response_bytes` (EmbeddingsMerge; the calls themselves are proxy.py's);
- an answer in the single-vector shape `{"embedding": [...]}` is normalised to OpenAI's list shape;
- `encoding_format: "base64"` is honoured even when the backend answers with floats;
- streamed chat asks for `stream_options.include_usage`, so token counts are exact without a
  tokenizer; when the client did not ask for it, the extra usage chunk is removed on the way back.

The body sent upstream is always one the gateway wrote from what it parsed, never the client's
bytes: backends differ on duplicate keys (some keep the first, Python the last) and some match keys
case-insensitively, so the client's bytes could name another model, stream or `n` than the one
the gateway authorised, routed and counted. Written again, each key is there once, unescaped, with
the value the gateway read; a top-level key that only case-folds to one of those fields is refused
(`ambiguous_key`). Answers are relayed byte for byte unless adapted as above.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from typing import Any, Callable

import attrs

from hxgwd.errors import BadRequest, PayloadTooLarge, UpstreamError
from hxgwd.http import Headers
from hxgwd.offload import OFF_LOOP_BYTES, dumps_in_steps
from hxgwd.runtime import Deployment
from hxgwd.upstream import RequestBody

HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
                        b"te", b"trailer", b"transfer-encoding", b"upgrade", b"proxy-connection"))
# Client headers never forwarded: hop-by-hop, the client's own credentials, what we set ourselves
# (the body is ours, never encoded: content_encoding.py), and a browser's Origin: CORS is the
# gateway's to decide (cors.py), not the backend's.
DROP_UPSTREAM = HOP_BY_HOP | {b"host", b"content-length", b"authorization", b"api-key", b"x-api-key",
                              b"x-request-id", b"cookie", b"accept-encoding", b"content-type",
                              b"content-encoding", b"expect", b"x-hx-model-group", b"origin"}
DROP_DOWNSTREAM = HOP_BY_HOP | {b"content-length", b"server", b"x-request-id", b"set-cookie"}
CORS_HEADERS = b"access-control-"    # a backend's own (some proxies add them to every answer) never pass

FLOAT_VECTOR = re.compile(rb'"embedding"\s*:\s*\[')


def chat_event_usage(doc: dict[str, Any]) -> Any:
    """Chat and completions streams: the chunk's own `usage` (null on every chunk but the last)."""
    return doc.get("usage")


@attrs.frozen(kw_only=True)
class CallPlan:
    path: str                        # endpoint below /v1, e.g. "/chat/completions"
    bodies: tuple[RequestBody, ...]  # one upstream call each
    public_model: str
    content_type: bytes = b"application/json"
    method: str = "POST"
    stream: bool = False
    strip_stream_usage: bool = False   # we asked for the usage chunk; the client did not
    embeddings_merge: bool = False   # answers need parsing: single-vector shape or several calls
    client_base64: bool = False
    binary_answer: bool = False      # relayed as it arrives (audio), not read whole first
    # a parsed stream event with "usage" in it -> its usage object, if it is the usage of the answer
    event_usage: Callable[[dict[str, Any]], Any] = chat_event_usage
    note_answer_id: bool = False     # the backend keeps the answer: its id is where to fetch it (Responses)
    # the answer's usage is what this request spent; not so for a stored answer fetched again
    spends_usage: bool = True


# Top-level fields the gateway routes, limits or adapts by. A key that is not one of them but
# case-folds to one ("MODEL", "mod\u0045l", "ſtream") would be read as that field by a backend that
# matches keys case-insensitively: refused rather than guessed at.
GUARDED_KEYS = frozenset(("model", "stream", "stream_options", "n", "best_of", "max_tokens",
                          "max_completion_tokens", "input", "encoding_format"))


def ambiguous_key(payload: dict[str, Any]) -> str | None:
    """The first top-level key a backend could take for a guarded field, or None."""
    for key in payload:
        if key not in GUARDED_KEYS and key.casefold() in GUARDED_KEYS:
            return key
    return None


def plan_json(path: str, payload: dict[str, Any], dep: Deployment, public_model: str, in_steps: bool = False,
              *, binary_answer: bool = False,
              event_usage: Callable[[dict[str, Any]], Any] = chat_event_usage) -> CallPlan:
    """One call with the body written anew for the deployment: its upstream model name, the rest
    as parsed. `in_steps`: a large body, planned in a worker thread, is encoded an element at a
    time so that the event loop's thread gets the GIL between them (offload.dumps_in_steps)."""
    body = dict(payload)
    body["model"] = dep.upstream_model
    return CallPlan(path=path, bodies=(_request_bytes(body, in_steps),), public_model=public_model,
                    stream=body.get("stream") is True, binary_answer=binary_answer, event_usage=event_usage)


def plan_chat(path: str, payload: dict[str, Any], dep: Deployment, public_model: str,
              in_steps: bool = False) -> CallPlan:
    """Chat and completions: a stream asks for its usage chunk (`stream_usage`), removed on the way
    back when the client did not ask for it."""
    body = dict(payload)
    body["model"] = dep.upstream_model
    stream = body.get("stream") is True
    strip_usage = False
    if stream and dep.backend.config.stream_usage:
        options = body.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        if not options.get("include_usage"):
            options["include_usage"] = True
            body["stream_options"] = options
            strip_usage = True
    return CallPlan(path=path, bodies=(_request_bytes(body, in_steps),), public_model=public_model,
                    stream=stream, strip_stream_usage=strip_usage)


def plan_embeddings(path: str, payload: dict[str, Any], dep: Deployment, public_model: str,
                    in_steps: bool = False) -> CallPlan:
    backend = dep.backend.config
    body = dict(payload)
    body["model"] = dep.upstream_model
    given = body.get("input")
    # Checked before anything is built: each input is a call or a vector of the answer (OpenAI
    # caps them at 2048 too); 20,000 took 100,000 upstream calls or a 247 MB answer.
    count = len(given) if isinstance(given, list) and given and type(given[0]) is not int else 1
    if count > backend.embeddings_max_inputs:
        raise BadRequest(f"This model takes at most {backend.embeddings_max_inputs} inputs per request; "
                         f"this one has {count}. Send them in several requests.",
                         param="input", code="too_many_inputs")
    client_base64 = body.get("encoding_format") == "base64"
    if client_base64 and backend.embeddings_encoding == "float":
        body["encoding_format"] = "float"
    if backend.embeddings_input == "input":
        return CallPlan(path=path, bodies=(_request_bytes(body, in_steps),), public_model=public_model,
                        client_base64=client_base64)
    body.pop("input", None)
    body.pop("encoding_format", None)    # single-prompt backends know floats only
    items = [given] if isinstance(given, str) else given
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise BadRequest("This model takes text input: a string or an array of strings.", param="input")
    bodies = tuple(_request_bytes({**body, "prompt": item}) for item in items)
    return CallPlan(path=path, bodies=bodies, public_model=public_model, embeddings_merge=True,
                    client_base64=client_base64)


def plan_speech(path: str, payload: dict[str, Any], dep: Deployment, public_model: str,
                in_steps: bool = False) -> CallPlan:
    """Speech: the audio comes back as it is made, relayed piece by piece (never held whole)."""
    return plan_json(path, payload, dep, public_model, in_steps, binary_answer=True)


def plan_responses(path: str, payload: dict[str, Any], dep: Deployment, public_model: str,
                   in_steps: bool = False) -> CallPlan:
    return attrs.evolve(plan_json(path, payload, dep, public_model, in_steps, event_usage=responses_event_usage),
                        note_answer_id=True)


def responses_event_usage(doc: dict[str, Any]) -> Any:
    """Responses streams: the usage is the finished response's, in `response.completed` (and in
    `response.incomplete` / `response.failed`, which may have spent tokens too)."""
    response = doc.get("response")
    return response.get("usage") if isinstance(response, dict) else None


def _request_bytes(body: dict[str, Any], in_steps: bool = False) -> bytes:
    try:
        return dumps_in_steps(body, _ENCODE) if in_steps else _dumps(body)
    except UnicodeEncodeError:
        # a lone surrogate from a "\ud800" escape: Python's json takes it, UTF-8 cannot carry it
        raise BadRequest("The request holds a lone UTF-16 surrogate escape, which is not Unicode text.",
                         code="invalid_json") from None


def upstream_headers(client: Headers, dep: Deployment, request_id: bytes,
                     content_type: bytes = b"application/json") -> Headers:
    out = [(n, v) for n, v in client if n not in DROP_UPSTREAM and not n.startswith(b"x-hx-")]
    if listed := connection_listed(client):
        out = [(n, v) for n, v in out if n not in listed]
    out.append((b"content-type", content_type))
    out.append((b"x-request-id", request_id))
    backend = dep.backend
    if backend.api_key:
        out.append((b"authorization", b"Bearer " + backend.api_key.encode()))
    for name, value in backend.config.headers.items():
        out.append((name.lower().encode(), value.encode()))
    return out


def downstream_headers(upstream: Headers) -> Headers:
    out = [(n, v) for n, v in upstream if n not in DROP_DOWNSTREAM and not n.startswith(CORS_HEADERS)]
    if listed := connection_listed(upstream):
        out = [(n, v) for n, v in out if n not in listed]
    return out


def connection_listed(headers: Headers) -> set[bytes] | None:
    """Header names that `Connection` lists: hop-by-hop too, so a proxy drops them (RFC 9110, 7.6.1)."""
    listed = None
    for name, value in headers:
        if name == b"connection" and value not in (b"keep-alive", b"close"):
            listed = (listed or set()) | {t.strip() for t in value.lower().split(b",")}
    return listed


# --- non-streamed answers ----------------------------------------------------------------------

def needs_merge(plan: CallPlan, first: bytes) -> bool:
    """Whether the client's answer must be built (EmbeddingsMerge) rather than `first` relayed."""
    return plan.embeddings_merge or (plan.client_base64 and FLOAT_VECTOR.search(first) is not None)


class EmbeddingsMerge:
    """The client's embeddings answer, built from the backend's answers as they arrive, in any
    order. Each answer is parsed and its vectors encoded at once, so one parsed answer at most is
    alive (parsed floats take ~1.6 times their text), the answer's size is known before it is
    built, and the usage of the answers so far is known if the rest never comes."""

    # bytes of one item besides its vector, an upper bound: {"object":"embedding","index":N,"embedding":V},
    ITEM_BYTES = 56

    def __init__(self, plan: CallPlan, max_bytes: int) -> None:
        self._plan = plan
        self._max_bytes = max_bytes
        self._vectors: list[list[bytes] | None] = [None] * len(plan.bodies)
        self.size = 0                      # bytes of the answer so far (an upper bound)
        self.usage: dict[str, int] | None = None

    def add(self, call: int, body: bytes) -> None:
        """The answer to call `call`. UpstreamError if no answer can be built from it (a 502,
        held against the deployment); PayloadTooLarge once the answer would be larger than
        `max_bytes`: its size follows from the request (inputs x dimensions), the same on any
        deployment, and the caller's way out is the same as for a body too large: send fewer."""
        # above OFF_LOOP_BYTES this runs in a worker thread: a Python callback per number there
        # lets the event loop's thread take the GIL between numbers; json's C parser alone never
        # lets it go
        decode = _decode_yielding if len(body) >= OFF_LOOP_BYTES else json.loads
        try:
            doc = decode(body)
        except ValueError:
            raise UpstreamError("The upstream sent an embeddings answer that is not JSON.") from None
        vectors = _vectors(doc)
        if vectors is None:
            raise UpstreamError("The upstream sent an embeddings answer of an unknown shape.")
        to_base64 = self._plan.client_base64
        try:
            encoded = [_vector_bytes(v, to_base64) for v in vectors]
        except (ValueError, TypeError, OverflowError, struct.error):
            # vectors of strings or NaN, numbers a float32 cannot hold, ...: nothing valid to send
            raise UpstreamError("The upstream sent an embeddings answer of an unknown shape.") from None
        usage = _clean_usage(doc.get("usage")) or {}      # counts only if they are counts
        del doc, vectors
        self.size += sum(map(len, encoded)) + self.ITEM_BYTES * len(encoded)
        if self.size > self._max_bytes:
            raise PayloadTooLarge(
                f"The embeddings of these inputs are larger than this gateway returns in one answer "
                f"({self._max_bytes} bytes). Send fewer inputs per request.",
                param="input", code="embeddings_too_large")
        self._vectors[call] = encoded
        had = self.usage or {"prompt_tokens": 0, "total_tokens": 0}
        self.usage = {"prompt_tokens": had["prompt_tokens"] + usage.get("prompt_tokens", 0),
                      "total_tokens": had["total_tokens"] + usage.get("total_tokens", usage.get("prompt_tokens", 0))}

    def answer(self) -> list[bytes]:
        """The merged answer in pieces (joined, it would be a second copy), once every call's
        answer was added; the vectors' bytes go with it."""
        parts = [b'{"object":"list","data":[']
        index = 0
        for encoded in self._vectors:
            assert encoded is not None
            for vector in encoded:
                parts += (b'{"object":"embedding","index":%d,"embedding":' % index, vector, b"},")
                index += 1
        self._vectors = []
        if index:
            parts[-1] = b"}"      # no comma after the last item
        usage = self.usage or {"prompt_tokens": 0, "total_tokens": 0}
        parts.append(b'],"model":%b,"usage":%b}' % (_dumps(self._plan.public_model), _dumps(usage)))
        return parts


def _vector_bytes(vector: Any, to_base64: bool) -> bytes:
    if to_base64 and isinstance(vector, list):
        return b'"%b"' % base64.b64encode(struct.pack(f"<{len(vector)}f", *vector))
    return _dumps(vector)


def _index(item: Any) -> int:
    return item["index"] if isinstance(item, dict) and type(item.get("index")) is int else 0


def _vectors(doc: Any) -> list[Any] | None:
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("data"), list):
        items = sorted(doc["data"], key=_index)
        return [d.get("embedding") for d in items if isinstance(d, dict)]
    if isinstance(doc.get("embedding"), list):          # {"embedding": [...]}: one vector
        return [doc["embedding"]]
    if isinstance(doc.get("embeddings"), list):         # {"embeddings": [[...], ...]}
        return list(doc["embeddings"])
    return None


def _decode_yielding(body: bytes) -> Any:
    """json.loads with a Python call per float: a thread parsing a large answer lets the event
    loop's thread take the GIL between them (~2x the parse time, off the loop)."""
    return json.loads(body, parse_float=_float)


def _float(text: str) -> float:
    return float(text)


_RAW_DECODE = json.JSONDecoder().raw_decode    # a decoder is built once: building one costs more than
                                               # decoding a usage object


def answer_id(body: bytes) -> str | None:
    """The `id` of a JSON answer (a Responses object): its top-level one, found without parsing
    a large answer whole (the id comes first in every server's answers we know)."""
    if len(body) <= 1 << 20:
        try:
            doc = json.loads(body)
        except ValueError:
            return None
        value = doc.get("id") if isinstance(doc, dict) else None
        return value if isinstance(value, str) else None
    match = re.match(rb'\s*\{\s*"id"\s*:\s*"([^"\\]{1,256})"', body)
    return match.group(1).decode() if match else None


def usage_from_body(body: bytes) -> dict[str, int] | None:
    """The `usage` object of a JSON answer, found from its end so large answers are not parsed."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    start = body.find(b"{", at)
    if start < 0:
        return None
    try:
        usage, _ = _RAW_DECODE(body[start:].decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return _clean_usage(usage)


def _clean_usage(usage: Any) -> dict[str, int] | None:
    if not isinstance(usage, dict):
        return None
    # counts from an upstream are trusted to be counts, not to be sane: bounded before any arithmetic
    out = {k: v for k in ("prompt_tokens", "completion_tokens", "total_tokens")
           if type(v := usage.get(k)) is int and 0 <= v < 1 << 40}
    # the Responses, images and audio APIs count input and output tokens under other names
    for theirs, ours in (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens")):
        if ours not in out and type(v := usage.get(theirs)) is int and 0 <= v < 1 << 40:
            out[ours] = v
    return out or None


# --- streamed answers --------------------------------------------------------------------------

# An event ends at a blank line, and SSE lines end in CRLF, LF or a lone CR, mixed as they come
# (WHATWG HTML, 9.2.6). A lone CR is one not followed by LF.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


class SseRelay:
    """Splits an upstream event stream into whole events, relayed byte for byte; notes usage.

    Every event, whole or still arriving, is bounded by `max_event_bytes`; at most one incomplete
    event is held.
    """

    __slots__ = ("_buf", "_strip_usage", "_max", "_event_usage", "usage", "events", "answer_id")

    def __init__(self, strip_usage: bool, max_event_bytes: int,
                 event_usage: Callable[[dict[str, Any]], Any] = chat_event_usage) -> None:
        self._buf = b""
        self._strip_usage = strip_usage
        self._max = max_event_bytes
        self._event_usage = event_usage
        self.usage: dict[str, int] | None = None
        self.answer_id: str | None = None     # a Responses stream's response id (response.created)
        self.events = 0

    def feed(self, data: bytes) -> bytes:
        """Bytes received -> bytes to send now (whole events only)."""
        buf = self._buf + data if self._buf else data
        out = []
        start = 0
        while (found := _EVENT_END.search(buf, start)) is not None:
            end = found.end()
            if end == len(buf) and buf[-1] == 13:
                break     # a CR last: the LF of a CRLF may still be on its way
            if end - start > self._max:     # whole, but over the bound all the same
                raise UpstreamError("The upstream sent a stream event that is too large.")
            event = buf[start:end]
            start = end
            self.events += 1
            if b'"usage"' in event and self._keep(event) is False:
                continue
            out.append(event)
        self._buf = buf[start:]
        if len(self._buf) > self._max:
            raise UpstreamError("The upstream sent a stream event that is too large.")
        return b"".join(out)

    def end(self) -> bytes:
        rest, self._buf = self._buf, b""
        return rest

    def _keep(self, event: bytes) -> bool:
        payload = b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))
        if not payload.startswith(b"{"):
            return True
        try:
            doc = json.loads(payload)
        except ValueError:
            return True
        if not isinstance(doc, dict):
            return True
        if self.answer_id is None and isinstance(response := doc.get("response"), dict):
            if isinstance(ident := response.get("id"), str):
                self.answer_id = ident[:256]
        usage = self._event_usage(doc)
        if not isinstance(usage, dict):
            return True            # "usage": null rides on every chunk of a stream that asked for it
        self.usage = _clean_usage(usage) or self.usage
        # the usage chunk we asked for on the client's behalf goes, whatever its counts look like
        return not (self._strip_usage and not doc.get("choices"))


# built once, not per call; NaN is not JSON, and nothing we build may hold it
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _dumps(doc: Any) -> bytes:
    return _ENCODE(doc).encode()
