"""TOML text -> `Config`, or every error found, each naming its key path.

Building is driven by the attrs field types of `model.py`, so a new key needs no code here.
Unknown keys are errors (with a "did you mean" hint) because a silently ignored typo in a
gateway config is an outage waiting for a reload.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import tomllib
import types
import typing
import urllib.parse
from typing import Any, Literal

import attrs

from hxgwd.config import model as m


class ConfigError(Exception):
    """Raised with every problem found; `problems` holds one "path: message" line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@attrs.frozen
class Draft:
    """A parsed file with its problems, and as much of a `Config` as could be built despite them.

    Checks that come after loading (the secrets' sources, in runtime.py) run on the draft too,
    so that one run reports every problem of a file.
    """

    config: m.Config | None      # None only if not even the top level could be built
    problems: list[str]          # in file order
    doc: dict[str, Any]          # as parsed, for placing problems in the file
    positions: dict[str, list[int]]   # array path -> where each kept entry stood in the file

    def entry_path(self, table: str, i: int) -> str:
        return entry_path(self.positions, table, i)

    def in_file_order(self, problems: list[str]) -> list[str]:
        return in_file_order(problems, self.doc)


def load_file(path: str) -> m.Config:
    return _loaded(draft_file(path))


def loads(text: str, source: str = "<config>") -> m.Config:
    return _loaded(draft(_parse(text, source)))


def from_dict(doc: dict[str, Any]) -> m.Config:
    return _loaded(draft(doc))


def _loaded(d: Draft) -> m.Config:
    if d.problems or d.config is None:
        raise ConfigError(d.problems)
    return d.config


def draft_file(path: str) -> Draft:
    """Raises ConfigError only if there is no TOML document to draft from."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    if data.startswith(b"\xef\xbb\xbf"):
        raise ConfigError([f"{path}: starts with a byte order mark (BOM); save it as UTF-8 without one"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 (byte {exc.start}); TOML files are UTF-8"]) from None
    return draft(_parse(text, source=path))


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: TOML syntax: {exc}"]) from None


def draft(parsed: dict[str, Any]) -> Draft:
    problems: list[str] = []
    doc = dict(parsed)
    groups = doc.get("groups")
    if isinstance(groups, dict):   # [groups.NAME] tables become Group records named NAME
        doc["groups"] = [{"name": name, **g} if isinstance(g, dict) else g for name, g in groups.items()]
    elif groups is not None:
        problems.append("groups: expected a table of [groups.NAME] tables")
        doc.pop("groups")
    defaults = doc.get("timeouts")
    if isinstance(defaults, dict) and isinstance(doc.get("backends"), list):
        # a backend's `timeouts = {...}` overrides some of [timeouts]; the rest come from there
        doc["backends"] = [{**b, "timeouts": {**defaults, **b["timeouts"]}}
                           if isinstance(b, dict) and isinstance(b.get("timeouts"), dict) else b
                           for b in doc["backends"]]
    positions: dict[str, list[int]] = {}
    config = _build(m.Config, doc, "", problems, group_paths=isinstance(groups, dict) and list(groups),
                    positions=positions)
    if config is not None:
        problems.extend(validate(config, positions))
    return Draft(config, in_file_order(problems, parsed), parsed, positions)


# --- where a problem stands in the file ------------------------------------------------------

def entry_path(positions: dict[str, list[int]] | None, table: str, i: int) -> str:
    """The path of the `i`th kept entry of array `table`, numbered by its place in the file."""
    places = (positions or {}).get(table)
    return f"{table}[{places[i] if places else i}]"


def in_file_order(problems: list[str], doc: dict[str, Any]) -> list[str]:
    """Sorted by where their key paths stand in the file: tables in the order they first appear,
    an array's entries in order, a table's keys in order; a key that is missing sorts at the end
    of its table. Problems at one place keep the order they were found in."""
    return sorted(problems, key=lambda problem: _place(doc, problem.split(": ", 1)[0]))


def _place(doc: dict[str, Any], path: str) -> tuple[int, ...]:
    ranks: list[int] = []
    node: Any = doc
    rest = path
    while rest:
        if rest.startswith("["):
            index, _, rest = rest[1:].partition("]")
            if not (index.isdigit() and isinstance(node, list)):
                break
            ranks.append(int(index))
            node = node[int(index)] if int(index) < len(node) else None
            continue
        rest = rest.removeprefix(".")
        if not isinstance(node, dict):
            break
        # the longest key that leads the path: names may hold dots ([groups."a.b"])
        keys = [k for k in node if rest == k or rest.startswith((f"{k}.", f"{k}["))]
        if not keys:
            ranks.append(len(node))
            break
        key = max(keys, key=len)
        ranks.append(list(node).index(key))
        node, rest = node[key], rest[len(key):]
    return tuple(ranks)


# --- building by field types -------------------------------------------------------------------

def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _build(cls: type, data: Any, path: str, problems: list[str], group_paths: Any = None,
           positions: dict[str, list[int]] | None = None) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{path or '<root>'}: expected a table")
        return None
    attrs.resolve_types(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            problems.append(f"{_join(path, key)}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is attrs.NOTHING:
                problems.append(f"{_join(path, name)}: required")
            continue
        if cls is m.Config and name == "groups" and group_paths:
            value = tuple(g for g in (_build(m.Group, g, f"groups.{n}", problems)
                                      for n, g in zip(group_paths, data[name])) if g is not None)
        else:
            value = _convert(field.type, data[name], _join(path, name), problems, positions)
        if value is not INVALID and value is not None:
            kwargs[name] = value   # containers keep their valid parts, so later checks still run
    if any(name not in kwargs and fields[name].default is attrs.NOTHING for name in fields):
        return None
    return cls(**kwargs)


INVALID = object()   # a scalar of the wrong type: its field falls back to the default


def _convert(tp: Any, value: Any, path: str, problems: list[str],
             positions: dict[str, list[int]] | None = None) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path, problems)
    if origin is Literal:
        if value not in args:
            problems.append(f"{path}: must be one of {', '.join(repr(a) for a in args)}")
            return INVALID
        return value
    if origin is tuple:
        if not isinstance(value, list):
            problems.append(f"{path}: expected an array")
            return ()
        converted = ((i, _convert(args[0], v, _join(path, i), problems)) for i, v in enumerate(value))
        kept = [(i, v) for i, v in converted if v is not INVALID and v is not None]
        if positions is not None:    # an invalid entry is left out: later checks name entries by their place
            positions[path] = [i for i, _ in kept]
        return tuple(v for _, v in kept)
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a table")
            return {}
        items = {k: _convert(args[1], v, _join(path, k), problems) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not INVALID and v is not None}
    if attrs.has(tp):
        return _build(tp, value, path, problems)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number")
            return INVALID
        if not math.isfinite(value):   # TOML has nan and inf; no setting here means either
            problems.append(f"{path}: must be a finite number")
            return INVALID
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        problems.append(f"{path}: expected an integer")
        return INVALID
    if tp in (str, bool) and not isinstance(value, tp):
        problems.append(f"{path}: expected {'a string' if tp is str else 'true or false'}")
        return INVALID
    return value


# --- checks that span fields or tables ---------------------------------------------------------

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")        # RFC 9110 token
VALUE_RE = re.compile(r"^[\t\x20-\x7e\x80-\xff]*$")           # no CR, LF or other controls


def validate(c: m.Config, positions: dict[str, list[int]] | None = None) -> list[str]:
    """Checks across fields; `positions`: where in the file each kept array entry stood."""
    p: list[str] = []

    def at(table: str, i: int) -> str:
        return entry_path(positions, table, i)

    s = c.server
    if not s.listen:
        p.append("server.listen: at least one address is required")
    bound: dict[tuple[str, int], int] = {}
    for i, addr in enumerate(s.listen):
        try:
            host, port = parse_listen(addr)
        except ValueError as exc:
            p.append(f"server.listen[{i}]: {exc}")
            continue
        if port and ((host, port) in bound or ("0.0.0.0", port) in bound
                     or (host == "0.0.0.0" and any(q == port and ":" not in h for h, q in bound))):
            p.append(f"server.listen[{i}]: {addr!r} overlaps an address listed before it")
        bound[(host, port)] = i
    for name in ("max_connections", "backlog", "max_header_bytes", "max_body_bytes",
                 "max_response_bytes", "max_sse_event_bytes"):
        if getattr(s, name) < 1:
            p.append(f"server.{name}: must be at least 1")
    if s.backlog > 65535:
        p.append("server.backlog: must be at most 65535")
    if s.max_header_bytes < 1024:
        p.append("server.max_header_bytes: must be at least 1024")
    for name in ("header_timeout", "body_timeout", "keepalive_timeout", "write_timeout", "shutdown_grace"):
        if getattr(s, name) <= 0:
            p.append(f"server.{name}: must be greater than 0")
    p.extend(_check_timeouts(c.timeouts, "timeouts"))
    if c.routing.max_attempts < 1:
        p.append("routing.max_attempts: must be at least 1")

    key_names: set[str] = set()
    for i, k in enumerate(c.keys):
        path = at('keys', i)
        if not NAME_RE.match(k.name):
            p.append(f"{path}.name: use letters, digits and ._:/@- (up to 128)")
        if k.name in key_names:
            p.append(f"{path}.name: duplicate key name {k.name!r}")
        key_names.add(k.name)
        sources = [n for n in ("sha256", "key_env", "key_file") if getattr(k, n)]
        if len(sources) != 1:
            p.append(f"{path}: set exactly one of sha256, key_env, key_file")
        if k.sha256 and not HEX64_RE.match(k.sha256):
            p.append(f"{path}.sha256: must be 64 lowercase hex digits (sha256 of the key)")

    backend_names: set[str] = set()
    for i, b in enumerate(c.backends):
        path = at('backends', i)
        if not NAME_RE.match(b.name):
            p.append(f"{path}.name: use letters, digits and ._:/@- (up to 128)")
        if b.name in backend_names:
            p.append(f"{path}.name: duplicate backend name {b.name!r}")
        backend_names.add(b.name)
        if b.kind == "openai":
            problem = check_url(b.url)
            if problem:
                p.append(f"{path}.url: {problem}")
        elif b.url:
            p.append(f"{path}.url: an echo backend has no url")
        if b.api_key_env and b.api_key_file:
            p.append(f"{path}: set at most one of api_key_env, api_key_file")
        if b.max_connections < 1:
            p.append(f"{path}.max_connections: must be at least 1")
        if b.max_idle_connections < 0:
            p.append(f"{path}.max_idle_connections: must be 0 or more")
        if b.idle_timeout <= 0:
            p.append(f"{path}.idle_timeout: must be greater than 0")
        if not 1 <= b.echo_dimensions <= 65536:
            p.append(f"{path}.echo_dimensions: must be between 1 and 65536")
        if b.echo_delay < 0:
            p.append(f"{path}.echo_delay: must be 0 or more")
        for h, value in b.headers.items():
            if h.lower() in ("host", "content-length", "transfer-encoding", "connection", "authorization"):
                p.append(f"{path}.headers.{h}: set by the gateway, cannot be overridden")
            elif not TOKEN_RE.match(h) or not VALUE_RE.match(value):
                p.append(f"{path}.headers.{h}: not a valid HTTP header name and value")
        if b.timeouts is not None:
            p.extend(_check_timeouts(b.timeouts, f"{path}.timeouts"))

    model_names: dict[str, str] = {}
    for i, md in enumerate(c.models):
        path = at('models', i)
        if not NAME_RE.match(md.name):
            p.append(f"{path}.name: use letters, digits and ._:/@- (up to 128)")
        if md.backend not in backend_names:
            p.append(f"{path}.backend: no backend named {md.backend!r}")
        if md.weight <= 0:
            p.append(f"{path}.weight: must be greater than 0")
        if model_names.setdefault(md.name, md.kind) != md.kind:
            p.append(f"{path}.kind: deployments of {md.name!r} disagree on kind")

    for i, md in enumerate(c.models):
        path = at('models', i)
        for name in ("max_concurrency", "max_queue", "input_cost_per_1k", "output_cost_per_1k"):
            if getattr(md, name) < 0:
                p.append(f"{path}.{name}: must be 0 or more")
        if md.queue_timeout <= 0:
            p.append(f"{path}.queue_timeout: must be greater than 0")
    for i, b in enumerate(c.backends):
        if b.probe_path is not None and not b.probe_path.startswith("/"):
            p.append(f"{at('backends', i)}.probe_path: must start with /")
        if b.probe_interval <= 0 or b.probe_timeout <= 0:
            p.append(f"{at('backends', i)}: probe_interval and probe_timeout must be greater than 0")
        if b.embeddings_path is not None and not b.embeddings_path.startswith("/"):
            p.append(f"{at('backends', i)}.embeddings_path: must start with /")
    for i, k in enumerate(c.keys):
        for name in ("rpm", "tpm"):
            if getattr(k, name) is not None and getattr(k, name) < 1:
                p.append(f"{at('keys', i)}.{name}: must be at least 1")
        if k.budget_usd is not None and k.budget_usd < 0:
            p.append(f"{at('keys', i)}.budget_usd: must be 0 or more")
    r = c.routing
    for name in ("breaker_failures", "breaker_min_requests"):
        if getattr(r, name) < 1:
            p.append(f"routing.{name}: must be at least 1")
    if not 0 < r.breaker_error_rate <= 1:
        p.append("routing.breaker_error_rate: must be above 0 and at most 1")
    for name in ("breaker_window", "breaker_cooldown", "max_retry_after"):
        if getattr(r, name) <= 0:
            p.append(f"routing.{name}: must be greater than 0")
    p.extend(_check_stores(c))

    group_names: set[str] = set()
    for g in c.groups:
        path = f"groups.{g.name}"
        group_names.add(g.name)
        if not NAME_RE.match(g.name):
            p.append(f"{path}: use letters, digits and ._:/@- in group names")
        if g.name in model_names:
            p.append(f"{path}: a model has the same name; a target must name one or the other")
        if not g.models:
            p.append(f"{path}.models: at least one model is required")
        kinds = set()
        for j, name in enumerate(g.models):
            if name not in model_names:
                p.append(f"{path}.models[{j}]: no model named {name!r}")
            else:
                kinds.add(model_names[name])
        if len(kinds) > 1:
            p.append(f"{path}.models: mixes chat and embedding models")
        if g.cost_weight < 0:
            p.append(f"{path}.cost_weight: must be 0 or more")
        if not 0 <= g.exploration <= 0.5:
            p.append(f"{path}.exploration: must be between 0 and 0.5")
    for i, k in enumerate(c.keys):
        for j, name in enumerate(k.models):
            if name not in model_names and name not in group_names:
                p.append(f"{at('keys', i)}.models[{j}]: no model or group named {name!r}")
    return p


def _check_stores(c: m.Config) -> list[str]:
    p = []
    db = c.database
    if db.url and not (db.url.startswith("sqlite:///") or db.url.split("://")[0] in ("postgresql", "postgres")):
        p.append("database.url: use sqlite:////absolute/path.db, sqlite:///relative.db or postgresql://user@host/db")
    if db.url.startswith("sqlite:///") and len(db.url) == len("sqlite:///"):
        p.append("database.url: the SQLite file path is missing")
    if db.password_env and db.password_file:
        p.append("database: set at most one of password_env, password_file")
    for name in ("spool_max_bytes", "queue_size", "batch_size"):
        if getattr(db, name) < 1:
            p.append(f"database.{name}: must be at least 1")
    for name in ("key_refresh", "connect_timeout", "statement_timeout"):
        if getattr(db, name) <= 0:
            p.append(f"database.{name}: must be greater than 0")
    if db.retention_days < 0:
        p.append("database.retention_days: must be 0 (keep all) or more")
    if c.redis.url is not None and not c.redis.url.startswith(("redis://", "rediss://", "unix://")):
        p.append("redis.url: use redis://host:port/db")
    if c.redis.timeout <= 0:
        p.append("redis.timeout: must be greater than 0")
    try:
        import zoneinfo
        zoneinfo.ZoneInfo(c.limits.timezone)
    except (ValueError, LookupError):
        p.append(f"limits.timezone: unknown time zone {c.limits.timezone!r}")
    return p


def _check_timeouts(t: m.Timeouts, path: str) -> list[str]:
    return [f"{path}.{f.name}: must be greater than 0"
            for f in attrs.fields(m.Timeouts) if getattr(t, f.name) <= 0]


def check_url(url: str) -> str | None:
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7f for c in url):
        return "must not contain spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:           # "http://[zz]:80", "http://[::1"
        return f"not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "scheme must be http or https"
    if not parts.hostname:
        return "has no host"
    try:
        if parts.port == 0:
            raise ValueError
    except ValueError:
        return "port must be a number from 1 to 65535"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    if parts.username or parts.password:
        return "must not hold credentials; use api_key_env or api_key_file"
    return None


def parse_listen(addr: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (all interfaces) -> (host, port)."""
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{addr!r}: expected HOST:PORT")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{addr!r}: port must be 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif host and not re.match(r"^[A-Za-z0-9.-]+$", host):
        raise ValueError(f"{addr!r}: bad host")
    return host or "0.0.0.0", port
