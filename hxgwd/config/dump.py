"""`Config` -> TOML text (tomli-w): the effective configuration, defaults filled in, secrets redacted."""

from __future__ import annotations

from typing import Any

import attrs
import tomli_w

from hxgwd.config import model as m
from hxgwd.store import redact_url

REDACTED = "<redacted>"


def to_dict(config: m.Config, *, redact: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = _plain(config)      # a Config is an attrs instance: a table
    doc["groups"] = {g.pop("name"): g for g in doc["groups"]}
    if redact:   # key hashes stay: a hash of a random key gives nothing away, and the dump loads again
        for backend in doc["backends"]:
            backend["headers"] = {name: REDACTED for name in backend["headers"]}
        for table in ("database", "redis"):
            if doc[table].get("url"):
                doc[table]["url"] = redact_url(doc[table]["url"], mask=REDACTED)
    return doc


def dumps(config: m.Config, *, redact: bool = True) -> str:
    return tomli_w.dumps(to_dict(config, redact=redact))


def _plain(value: Any) -> Any:
    if attrs.has(type(value)):
        return {f.name: _plain(getattr(value, f.name)) for f in attrs.fields(type(value))
                if getattr(value, f.name) is not None}   # TOML has no null: unset means absent
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
