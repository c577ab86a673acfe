"""Checks across fields and tables of a built `Config` (load.py builds it field by field): names,
references between tables, listen addresses, URLs, timeouts. Each problem names its key path.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse

import attrs

from hxgwd.config import model as m
from hxgwd.http.addresses import parse_listen
from hxgwd.config.places import entry_path
from hxgwd.http import httptools_available


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")        # RFC 9110 token
VALUE_RE = re.compile(r"^[\t\x20-\x7e\x80-\xff]*$")           # no CR, LF or other controls
# sha256 of sk-hx-dev-1234, the key of hxgwd.toml.example and the README's quick start: anyone has it
MAX_WORKERS = 256                 # [server] workers
EXAMPLE_KEY_SHA256 = "8d170aee995d48e15c108cbb5e9f5210c8054eaa4ea7e3c74a8dbde384b5b76a"
# Paths of the OpenAI API under its base (longest first where one ends another): hxgwd adds them
# to a backend's url itself, so a url that already ends in one would get it twice. All of the
# API's, not only those hxgwd serves: such a url is a mistake whatever the endpoint.
ENDPOINT_PATHS = ("/chat/completions", "/completions", "/embeddings", "/responses", "/moderations",
                  "/rerank", "/audio/transcriptions", "/audio/translations", "/audio/speech",
                  "/images/generations")


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
    for name in ("max_connections", "backlog", "max_header_bytes", "max_body_bytes", "max_upload_bytes",
                 "max_response_bytes", "max_sse_event_bytes"):
        if getattr(s, name) < 1:
            p.append(f"server.{name}: must be at least 1")
    if s.backlog > 65535:
        p.append("server.backlog: must be at most 65535")
    if s.max_header_bytes < 1024:
        p.append("server.max_header_bytes: must be at least 1024")
    if s.http_parser == "httptools" and not httptools_available():
        p.append("server.http_parser: httptools is not installed (pip install httptools), or use \"auto\"")
    for name in ("header_timeout", "body_timeout", "body_total_timeout", "keepalive_timeout", "write_timeout", "shutdown_grace"):
        if getattr(s, name) <= 0:
            p.append(f"server.{name}: must be greater than 0")
    if isinstance(s.workers, int) and not 1 <= s.workers <= MAX_WORKERS:
        p.append(f"server.workers: must be \"auto\" or 1 to {MAX_WORKERS}")
    if bool(s.tls_cert) != bool(s.tls_key):
        p.append("server: set both tls_cert and tls_key, or neither")
    for i, addr in enumerate(s.tls_listen):
        if addr not in s.listen:
            p.append(f"server.tls_listen[{i}]: {addr!r} is not an entry of server.listen")
    if s.tls_listen and not s.tls_cert:
        p.append("server.tls_listen: TLS needs tls_cert and tls_key")
    p.extend(_check_cors(s))
    for i, entry in enumerate(s.trusted_proxies):
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            p.append(f"server.trusted_proxies[{i}]: {entry!r} is not an address or network (10.0.0.0/8, ::1)")
    p.extend(_check_timeouts(c.timeouts, "timeouts"))
    # The example key opens the gateway to whoever read the README: any key (admin or not: it
    # spends the backends' quota and the budgets either way), on any address others can reach.
    public = [addr for addr in s.listen if not _listens_on_loopback(addr)]
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
        if k.sha256 == EXAMPLE_KEY_SHA256 and public:
            p.append(example_key_problem(f"{path}.sha256", public[0]))

    backend_names: set[str] = set()
    for i, b in enumerate(c.backends):
        path = at('backends', i)
        if not NAME_RE.match(b.name):
            p.append(f"{path}.name: use letters, digits and ._:/@- (up to 128)")
        if b.name in backend_names:
            p.append(f"{path}.name: duplicate backend name {b.name!r}")
        backend_names.add(b.name)
        if b.kind == "openai":
            problem = check_url(b.url) or check_base_url(b.url)
            if problem:
                p.append(f"{path}.url: {problem}")
        elif b.url:
            p.append(f"{path}.url: an echo backend has no url")
        if b.api_key_env and b.api_key_file:
            p.append(f"{path}: set at most one of api_key_env, api_key_file")
        if b.max_connections < 0:
            p.append(f"{path}.max_connections: must be 0 (no cap) or more")
        if b.max_idle_connections < 0:
            p.append(f"{path}.max_idle_connections: must be 0 or more")
        if b.idle_timeout <= 0:
            p.append(f"{path}.idle_timeout: must be greater than 0")
        if b.embeddings_max_inputs < 1:
            p.append(f"{path}.embeddings_max_inputs: must be at least 1")
        if b.embeddings_concurrency < 1:
            p.append(f"{path}.embeddings_concurrency: must be at least 1")
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


CORS_MAX_AGE = 86400     # what Firefox caps Access-Control-Max-Age at (Chrome: 7200)
SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*$")
DEFAULT_PORTS = {"http": 80, "https": 443}


def _check_cors(s: m.Server) -> list[str]:
    p = []
    if "*" in s.cors_origins:
        if len(s.cors_origins) > 1:
            p.append("server.cors_origins: \"*\" allows every origin; list nothing else with it")
        if s.cors_allow_credentials:
            # browsers refuse credentials with "*" anyway; reflecting every origin instead would let
            # any web page act with its visitors' cookies
            p.append("server.cors_allow_credentials: not with cors_origins = [\"*\"]; list the origins")
    seen: set[str] = set()
    for i, origin in enumerate(s.cors_origins):
        if origin == "*":
            continue
        problem = origin_problem(origin)
        if problem:
            p.append(f"server.cors_origins[{i}]: {problem}")
        elif origin in seen:
            p.append(f"server.cors_origins[{i}]: {origin!r} is listed twice")
        seen.add(origin)
    if not 0 <= s.cors_max_age <= CORS_MAX_AGE:
        p.append(f"server.cors_max_age: must be 0 to {CORS_MAX_AGE} seconds (browsers cap it: Chrome at 7200)")
    return p


def origin_problem(text: str) -> str | None:
    """Why `text` is not an origin as a browser sends it in `Origin` (scheme://host[:port],
    lowercase, no default port, no path), or None. Request origins are matched as they come, so an
    entry written any other way would never match: the message says how to write it."""
    if text == "null":
        # sandboxed frames and file:// pages send it: any web page can make one
        return "'null' is the origin of sandboxed frames and local files, which any page can make; not allowed"
    if "*" in text:
        return f"{text!r}: the only wildcard is \"*\" alone, for every origin"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7f for c in text):
        return f"{text!r} has spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        return f"{text!r} is not scheme://host[:port]"
    scheme, host = parts.scheme.lower(), parts.hostname
    if not SCHEME_RE.match(scheme) or not host or port == 0 or not text.lower().startswith(scheme + "://"):
        return f"{text!r} is not scheme://host[:port]"
    if parts.username is not None or parts.query or parts.fragment or parts.path not in ("", "/"):
        return f"{text!r}: an origin is scheme://host[:port], without a path, query or credentials"
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return f"{text!r}: the host is not a valid domain name"
    shown = f"[{host}]" if ":" in host else host
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        shown += f":{port}"
    canonical = f"{scheme}://{shown}"
    if canonical != text:
        return f"{text!r}: write it as browsers send it, {canonical!r}"
    return None


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


def check_base_url(url: str) -> str | None:
    """A backend url (already a valid http(s) URL) that ends in an endpoint path: the base to use
    instead is the url without it, where the OpenAI paths go under /v1 as at run time."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")
    endpoint = next((e for e in ENDPOINT_PATHS if path.endswith(e)), None)
    if endpoint is None:
        return None
    base = path[:-len(endpoint)].rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    use = urllib.parse.urlunsplit((parts.scheme, parts.netloc, base, "", ""))
    return (f"ends in the endpoint path {endpoint}, which hxgwd adds itself (requests would go to "
            f"{path}/v1{endpoint}); use the base URL \"{use}\"")


def public_listen_address(server: m.Server) -> str | None:
    """The first listen address that is not loopback, or None."""
    return next((addr for addr in server.listen if not _listens_on_loopback(addr)), None)


def example_key_problem(path: str, public: str) -> str:
    return (f"{path}: this is the public example key sk-hx-dev-1234; refused while server.listen "
            f"has {public!r}, which is not loopback: make a key with `hxgwd genkey` or `hxgwd keys create`")


def _listens_on_loopback(addr: str) -> bool:
    """Whether only this host can reach `addr`: 127.0.0.0/8, ::1 (also as ::ffff:127.x) or
    localhost. Any other name may resolve to a public address. An address that does not parse
    is reported by the listen checks, not here."""
    try:
        host, _ = parse_listen(addr)
    except ValueError:
        return True
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


