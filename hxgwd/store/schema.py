"""The schema: ordered migrations per engine, and RequestRecord <-> row.

A migration is appended, never edited: version N is the N-th entry of MIGRATIONS[engine], and
`schema_version` holds one row per applied version. Both engines run DDL inside a transaction, so
a migration applies whole or not at all; concurrent migrators serialize on BEGIN IMMEDIATE
(SQLite) or an advisory lock (PostgreSQL) and re-read the version after taking it.

Times are unix seconds in SQLite (REAL) and timestamptz in PostgreSQL. `group` is a reserved word,
so RequestRecord.group is the column group_name. Key models are a JSON array in a text column on
both engines, so the two stay alike.

`row_values` also makes a record safe to store: client-chosen strings (a model name) may hold a
NUL, which PostgreSQL text refuses, or a lone surrogate from a JSON escape, which neither driver
can encode; integers are clamped to the column range. One bad record must not fail a batch
forever (the usage sink still bisects a rejected batch as a last resort).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import operator
import zoneinfo
from typing import Any, Callable, Sequence

import attrs

from hxgwd.pipeline.record import RequestRecord

SCHEMA_LOCK = 0x68786777   # "hxgw": pg_advisory_xact_lock key for migrations

# (column, RequestRecord field, kind); kind drives sanitizing and PostgreSQL COPY types
USAGE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("request_id", "request_id", "text"),
    ("ts", "ts", "float"),
    ("key", "key", "text"),
    ("endpoint", "endpoint", "text"),
    ("model", "model", "text"),
    ("group_name", "group", "text"),
    ("deployment", "deployment", "text"),
    ("backend", "backend", "text"),
    ("status", "status", "int4"),
    ("error_type", "error_type", "text"),
    ("fault", "fault", "text"),
    ("stream", "stream", "bool"),
    ("prompt_tokens", "prompt_tokens", "int8"),
    ("completion_tokens", "completion_tokens", "int8"),
    ("total_tokens", "total_tokens", "int8"),
    ("cost_usd", "cost_usd", "float"),
    ("bytes_in", "bytes_in", "int8"),
    ("bytes_out", "bytes_out", "int8"),
    ("total_ms", "total_ms", "float"),
    ("upstream_ms", "upstream_ms", "float"),
    ("ttfb_ms", "ttfb_ms", "float"),
    ("attempts", "attempts", "int4"),
    ("route", "route", "text"),
    ("generation", "generation", "int8"),
    ("client_request_id", "client_request_id", "text"),
    ("client", "client", "text"),
    ("user_agent", "user_agent", "text"),
    ("key_prefix", "key_prefix", "text"),
    ("cause", "cause", "text"),
)
COLUMN_NAMES = tuple(c for c, _, _ in USAGE_COLUMNS)
RECORD_FIELDS = tuple(f.name for f in attrs.fields(RequestRecord))
assert sorted(RECORD_FIELDS) == sorted(f for _, f, _ in USAGE_COLUMNS), "a RequestRecord field has no column"

MAX_TEXT = 512     # characters; longer client-chosen strings are cut


def _text(value: Any) -> str:
    s = value if type(value) is str else str(value)
    if len(s) <= MAX_TEXT and s.isascii() and "\x00" not in s:
        return s                                            # the common case: one pass, no copy
    s = s[:MAX_TEXT]
    if not s.isascii():
        s = s.encode("utf-8", "replace").decode("utf-8")   # lone surrogates -> "?"
    return s.replace("\x00", "\ufffd")


def _int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        n: int = value if type(value) is int else int(value)
        return n if lo <= n <= hi else min(max(n, lo), hi)
    return convert


def _float(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None   # JSON, and so the batch insert, has no NaN/inf


_CONVERT: dict[str, Callable[[Any], object]] = {
    "text": _text, "float": _float, "bool": bool,
    "int4": _int_in(-(2 ** 31), 2 ** 31 - 1), "int8": _int_in(-(2 ** 63), 2 ** 63 - 1)}
_GET = operator.attrgetter(*(field for _, field, _ in USAGE_COLUMNS))
_CONVERTERS = tuple(_CONVERT[kind] for _, _, kind in USAGE_COLUMNS)


def row_values(record: RequestRecord) -> tuple[Any, ...]:
    """The record as a tuple in USAGE_COLUMNS order, made safe to store."""
    return tuple([None if v is None else convert(v) for v, convert in zip(_GET(record), _CONVERTERS)])


# --- the spool's line format ---------------------------------------------------------------------

# A line is a JSON array: LINE_FORMAT, then the values of LINE_FIELDS in this order. Every finished
# request writes one on the request path (the journal), and an array of values encodes in a third
# of the time of an object with the names (4 us against 13 us measured). Fields are only ever
# appended: a shorter line (an older hxgwd's) leaves the new fields at their defaults, a longer
# one (a newer hxgwd's) has its extra values ignored. Lines of hxgwd before the journal are JSON
# objects with the names; they are still read.
LINE_FORMAT = 2
LINE_FIELDS = ("ts", "request_id", "client_request_id", "key", "endpoint", "model", "group", "deployment",
               "backend", "status", "error_type", "fault", "stream", "prompt_tokens", "completion_tokens",
               "total_tokens", "cost_usd", "bytes_in", "bytes_out", "total_ms", "upstream_ms", "ttfb_ms",
               "attempts", "route", "generation", "client", "user_agent", "key_prefix", "cause")
assert sorted(LINE_FIELDS) == sorted(RECORD_FIELDS), "a RequestRecord field is not in the spool's lines"
_LINE_VALUES = operator.attrgetter(*LINE_FIELDS)
_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str).encode   # one encoder: json.dumps makes one per call
if json.encoder.c_make_encoder is not None:   # type: ignore[attr-defined]  # CPython's _json; not in typeshed
    # the C encoder made once: JSONEncoder.encode makes one per call (0.9 of 3.7 us a line). No
    # circular check (markers None): a line is a flat tuple of scalars.
    _C_ENCODE = json.encoder.c_make_encoder(  # type: ignore[attr-defined]  # as above
        None, str, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)

    def _encode(values: tuple[Any, ...]) -> str:
        return "".join(_C_ENCODE(values, 0))
else:   # pragma: no cover - a Python without _json
    def _encode(values: tuple[Any, ...]) -> str:
        return _ENCODE(values)


def values_line(values: tuple[Any, ...]) -> bytes:
    """The spool line of a record's values in LINE_FIELDS order (the request path: no record needed)."""
    return f"[{LINE_FORMAT},{_encode(values)[1:]}\n".encode()


def record_line(record: RequestRecord) -> bytes:
    return values_line(_LINE_VALUES(record))


# RequestRecord(ts=v[0], request_id=v[1], ...), made once: 2.7 us a record against 3.2 with **dict(zip(...))
_FROM_VALUES: Callable[[Sequence[Any]], RequestRecord] = eval(
    "lambda v: RequestRecord(" + ", ".join(f"{name}=v[{i}]" for i, name in enumerate(LINE_FIELDS)) + ")",
    {"RequestRecord": RequestRecord})


def record_from_values(values: tuple[Any, ...] | list[Any]) -> RequestRecord:
    """The record of a line's values (LINE_FIELDS order); a shorter list (an older hxgwd's line)
    leaves the fields it lacks at their defaults, a longer one has its extra values ignored."""
    if len(values) == len(LINE_FIELDS):
        return _FROM_VALUES(values)
    return RequestRecord(**dict(zip(LINE_FIELDS, values)))


def record_document(record: RequestRecord) -> bytes:
    """The record as a JSON object with the names, for people (rejected.jsonl); replay reads it too."""
    return json.dumps({name: getattr(record, name) for name in RECORD_FIELDS}).encode() + b"\n"


def record_from_line(line: bytes) -> RequestRecord:
    """Raises ValueError (or TypeError) for a line that is not a record; unknown fields are
    ignored, so a spool written by a newer hxgwd replays into an older one."""
    doc = json.loads(line)
    if isinstance(doc, list):
        if not doc or doc[0] != LINE_FORMAT:
            raise ValueError("not a spool line of a known format")
        return record_from_values(doc[1:])
    if not isinstance(doc, dict):
        raise ValueError("not a JSON array or object")
    try:
        return RequestRecord(**doc)
    except TypeError:
        return RequestRecord(**{k: v for k, v in doc.items() if k in RECORD_FIELDS})


def records_from_lines(lines: list[bytes]) -> tuple[list[RequestRecord], int]:
    """-> (records, how many lines were not records)."""
    records, bad = [], 0
    for line in lines:
        try:
            records.append(record_from_line(line))
        except (ValueError, TypeError):
            bad += 1
    return records, bad


# --- migrations ------------------------------------------------------------------------------------

SQLITE_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied_at REAL NOT NULL,
    description TEXT NOT NULL
)"""

POSTGRES_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now(),
    description text NOT NULL
)"""

# version N = MIGRATIONS[engine][N-1]: (description, [statements])
MIGRATIONS: dict[str, list[tuple[str, list[str]]]] = {
    "sqlite": [
        ("keys and usage", [
            """CREATE TABLE api_keys (
                id INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                prefix TEXT NOT NULL,
                sha256 BLOB NOT NULL UNIQUE,
                models TEXT NOT NULL DEFAULT '[]',
                admin INTEGER NOT NULL DEFAULT 0,
                rpm INTEGER,
                tpm INTEGER,
                budget_usd REAL,
                budget_period TEXT NOT NULL DEFAULT 'month',
                created_at REAL NOT NULL,
                expires_at REAL,
                revoked_at REAL
            )""",
            # one live key per name; revoked keys keep their rows (and names) for the record
            "CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL",
            """CREATE TABLE usage (
                request_id TEXT PRIMARY KEY,
                ts REAL NOT NULL,
                key TEXT,
                endpoint TEXT NOT NULL,
                model TEXT,
                group_name TEXT,
                deployment TEXT,
                backend TEXT,
                status INTEGER NOT NULL,
                error_type TEXT,
                fault TEXT,
                stream INTEGER NOT NULL DEFAULT 0,
                prompt_tokens INTEGER,
                completion_tokens INTEGER,
                total_tokens INTEGER,
                cost_usd REAL,
                bytes_in INTEGER NOT NULL DEFAULT 0,
                bytes_out INTEGER NOT NULL DEFAULT 0,
                total_ms REAL NOT NULL DEFAULT 0,
                upstream_ms REAL NOT NULL DEFAULT 0,
                ttfb_ms REAL,
                attempts INTEGER NOT NULL DEFAULT 0,
                route TEXT,
                generation INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX usage_ts ON usage (ts)",
            "CREATE INDEX usage_key_ts ON usage (key, ts)",   # per-key reports and budgets
        ]),
        # request_id became the gateway's own id; the client's X-Request-ID is kept beside it
        ("usage.client_request_id", ["ALTER TABLE usage ADD COLUMN client_request_id TEXT"]),
        # who sent a request and why it failed (issue 17): "which addresses used key X" is a query
        # of the table, not a search of rotated logs; key_prefix: a revoked key still being tried
        ("usage.client, user_agent, key_prefix, cause", [
            "ALTER TABLE usage ADD COLUMN client TEXT",
            "ALTER TABLE usage ADD COLUMN user_agent TEXT",
            "ALTER TABLE usage ADD COLUMN key_prefix TEXT",
            "ALTER TABLE usage ADD COLUMN cause TEXT",
        ]),
    ],
    "postgresql": [
        ("keys and usage", [
            """CREATE TABLE api_keys (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                name text NOT NULL,
                prefix text NOT NULL,
                sha256 bytea NOT NULL UNIQUE,
                models text NOT NULL DEFAULT '[]',
                admin boolean NOT NULL DEFAULT false,
                rpm integer,
                tpm integer,
                budget_usd double precision,
                budget_period text NOT NULL DEFAULT 'month',
                created_at timestamptz NOT NULL DEFAULT now(),
                expires_at timestamptz,
                revoked_at timestamptz
            )""",
            "CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL",
            """CREATE TABLE usage (
                request_id text PRIMARY KEY,
                ts timestamptz NOT NULL,
                key text,
                endpoint text NOT NULL,
                model text,
                group_name text,
                deployment text,
                backend text,
                status integer NOT NULL,
                error_type text,
                fault text,
                stream boolean NOT NULL DEFAULT false,
                prompt_tokens bigint,
                completion_tokens bigint,
                total_tokens bigint,
                cost_usd double precision,
                bytes_in bigint NOT NULL DEFAULT 0,
                bytes_out bigint NOT NULL DEFAULT 0,
                total_ms double precision NOT NULL DEFAULT 0,
                upstream_ms double precision NOT NULL DEFAULT 0,
                ttfb_ms double precision,
                attempts integer NOT NULL DEFAULT 0,
                route text,
                generation bigint NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX usage_ts ON usage (ts)",
            "CREATE INDEX usage_key_ts ON usage (key, ts)",
        ]),
        ("usage.client_request_id", ["ALTER TABLE usage ADD COLUMN client_request_id text"]),
        ("usage.client, user_agent, key_prefix, cause", [
            "ALTER TABLE usage ADD COLUMN client text",
            "ALTER TABLE usage ADD COLUMN user_agent text",
            "ALTER TABLE usage ADD COLUMN key_prefix text",
            "ALTER TABLE usage ADD COLUMN cause text",
        ]),
    ],
}


def expected_version(engine: str) -> int:
    return len(MIGRATIONS[engine])


# --- usage summaries -------------------------------------------------------------------------------

SUMMARY_FIELDS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "avg_ms")


# "by day" groups in the database by 15-minute buckets, and Python makes each bucket a calendar
# date in the report's time zone: every zone's UTC offset is a multiple of 15 minutes, so a bucket
# never straddles a local midnight, and SQLite needs no time zone support.
DAY_BUCKET = 900
Row = tuple[Any, ...]      # a row as a driver returns it: the columns the query names, in its order


def summary_rows(by: str, rows: list[Row], tz: str = "UTC") -> list[dict[str, Any]]:
    """SQL rows (group, count, errors, sums..., sum of total_ms) -> dicts, NULL sums as 0, sorted.
    For by="day" the group is a DAY_BUCKET number, and buckets of one local date in `tz` merge."""
    if by == "day":
        rows = _buckets_to_days(rows, zoneinfo.ZoneInfo(tz))
    out = []
    for group, requests, errors, prompt, completion, total, cost, sum_ms in rows:
        out.append({by: group, "requests": int(requests), "errors": int(errors or 0),
                    "prompt_tokens": int(prompt or 0), "completion_tokens": int(completion or 0),
                    "total_tokens": int(total or 0), "cost_usd": round(float(cost or 0.0), 6),
                    "avg_ms": round(float(sum_ms or 0.0) / requests, 3) if requests else 0.0})
    if by == "day":
        out.sort(key=lambda r: r["day"])
    else:
        out.sort(key=lambda r: (-r["cost_usd"], -r["requests"], r[by] or ""))
    return out


def _buckets_to_days(rows: list[Row], tz: dt.tzinfo) -> list[Row]:
    days: dict[str, list[Any]] = {}
    for bucket, *sums in rows:
        day = dt.datetime.fromtimestamp(int(bucket) * DAY_BUCKET, tz).date().isoformat()
        acc = days.setdefault(day, [0] * len(sums))
        for i, value in enumerate(sums):
            acc[i] += value or 0
    return [(day, *sums) for day, sums in days.items()]


def models_text(models: tuple[str, ...]) -> str:
    return json.dumps(list(models))


def models_tuple(text: str | None) -> tuple[str, ...]:
    return tuple(json.loads(text)) if text else ()
