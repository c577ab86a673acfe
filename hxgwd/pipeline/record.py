"""Stage 8, record: the facts of one finished request as an immutable `RequestRecord`.

Pure: the record is built from values the handler passes in (times included), so it is tested
without clocks. The same record feeds the JSON access-log line and the usage store.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

STATUS_CLIENT_CLOSED = 499   # nginx's code for "the client went away first"


@attrs.frozen(kw_only=True)
class RequestRecord:
    ts: float                      # unix time the request started
    request_id: str                # the gateway's own, unique: the usage row's key
    client_request_id: str | None = None   # the client's X-Request-ID, if it sent a sane one
    key: str | None                # the key's name, never the key
    endpoint: str
    model: str | None              # what the client asked for
    group: str | None
    deployment: str | None         # what served it (the last attempt)
    backend: str | None
    status: int
    error_type: str | None = None  # OpenAI error type of our answer, if an error
    fault: str | None = None       # caller, policy, upstream, gateway, client
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cost_usd: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    total_ms: float = 0.0
    upstream_ms: float = 0.0
    ttfb_ms: float | None = None
    attempts: int = 0
    route: str | None = None
    generation: int = 0
    # who sent it (issue 17): a leaked key's use is traced by these, in the log and the usage table
    client: str | None = None        # the peer's address, or X-Forwarded-For's from a trusted proxy
    user_agent: str | None = None
    key_prefix: str | None = None    # a refused key's first characters (401s only), never the key
    cause: str | None = None         # why upstream attempts failed: "m@b: connect refused (ECONNREFUSED)"

    @property
    def overhead_ms(self) -> float:
        return max(0.0, self.total_ms - self.upstream_ms)

    def log_fields(self, head: dict[str, Any] | None = None) -> dict[str, Any]:
        """The access-log fields after `head`'s: the ones that are set, times rounded to µs.
        Once per request: one pass with plain getattr, not attrs.asdict (several times slower)."""
        doc = dict(head) if head else {}
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None:
                doc[name] = round(value, 3) if name in _MILLISECONDS else value
        doc["overhead_ms"] = round(self.overhead_ms, 3)
        return doc


_MILLISECONDS = frozenset(("total_ms", "upstream_ms", "ttfb_ms"))
_FIELDS = tuple(f.name for f in attrs.fields(RequestRecord))


def usage_tokens(usage: dict[str, int] | None) -> tuple[int | None, int | None, int | None]:
    """(prompt, completion, total) tokens of an upstream's usage; total from the parts when missing."""
    if not usage:
        return None, None, None
    prompt, completion, total = usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens")
    if total is None and prompt is not None:
        total = prompt + (completion or 0)
    return prompt, completion, total


# One encoder for the process: json.dumps with options builds a new encoder on every call.
_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str).encode


def log_line(fields: dict[str, Any]) -> bytes:
    return _ENCODE(fields).encode() + b"\n"
