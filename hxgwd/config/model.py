"""The configuration model: frozen attrs classes, the only home of defaults.

Field names are the TOML keys. `load.py` builds these from a parsed TOML document and rejects
unknown keys; `dump.py` writes them back. Validation that spans several tables (a model naming a
backend that does not exist) lives in `validate.py`, so every class here stays a plain record.
"""

from __future__ import annotations

from typing import Literal

import attrs

MiB = 1024 * 1024


@attrs.frozen(kw_only=True)
class Server:
    listen: tuple[str, ...] = ("127.0.0.1:4010",)
    max_connections: int = 1024          # open client connections; more wait in the kernel backlog
    backlog: int = 1024
    max_header_bytes: int = 16384        # request line + headers; more -> 431
    max_body_bytes: int = 16 * MiB       # request body; more -> 413
    max_upload_bytes: int = 32 * MiB     # a multipart upload (audio transcriptions: OpenAI takes 25 MB files)
    header_timeout: float = 10.0         # from the first byte of a request to its last header -> 408
    body_timeout: float = 30.0           # between two pieces of a request body -> 408
    body_total_timeout: float = 120.0    # from the first wait for a request body to its end -> 408
    keepalive_timeout: float = 75.0      # idle keep-alive connection -> closed silently
    write_timeout: float = 60.0          # a client that takes none of a write this long -> dropped
    shutdown_grace: float = 25.0         # SIGTERM: in-flight requests get this long to finish
    max_response_bytes: int = 64 * MiB   # a non-streamed upstream answer is buffered up to this -> 502
    max_sse_event_bytes: int = 1 * MiB   # one server-sent event from upstream -> 502 if larger
    http_parser: Literal["auto", "httptools", "h11"] = "auto"   # both sides; auto: httptools if importable
    tls_cert: str | None = None          # PEM certificate served to clients (leaf first, then its chain)
    tls_key: str | None = None           # its PEM private key, unencrypted; both re-read on SIGHUP
    tls_listen: tuple[str, ...] = ()     # the `listen` entries that speak TLS, as written there; empty: all
    cors_origins: tuple[str, ...] = ()   # browser origins allowed to call /v1/*, as browsers send them, or ("*",)
    cors_allow_credentials: bool = False # let browsers send cookies / HTTP auth along; never with "*"
    cors_max_age: int = 600              # seconds a browser may reuse a preflight answer
    trusted_proxies: tuple[str, ...] = ()  # addresses / networks whose X-Forwarded-For is believed
    workers: int | Literal["auto"] = 1   # serving processes; "auto": one per CPU this process may use


@attrs.frozen(kw_only=True)
class Timeouts:
    """Upstream phases, in seconds; each phase has its own answer (502/504)."""

    connect: float = 5.0
    first_byte: float = 300.0       # request sent -> response headers (non-streamed answers come whole)
    between_chunks: float = 120.0   # two reads of a response body
    # [timeouts]: the whole request, every failover attempt and the stream included; a backend's
    # own: each attempt at that backend, stream included (and never past the request's)
    total: float = 900.0
    pool: float = 5.0               # wait for a free connection of a backend's pool -> 503


@attrs.frozen(kw_only=True)
class Key:
    """A client key. Only its SHA-256 is held; the key itself comes from env or a file if at all."""

    name: str
    sha256: str | None = None
    key_env: str | None = None
    key_file: str | None = None
    models: tuple[str, ...] = ()    # models and groups this key may use; empty: all
    admin: bool = False             # may call /admin/* endpoints
    rpm: int | None = None          # requests per minute
    tpm: int | None = None          # tokens per minute (prompt + completion)
    budget_usd: float | None = None # spend per budget_period, calendar aligned in [limits] timezone
    budget_period: Literal["day", "month"] = "month"


@attrs.frozen(kw_only=True)
class Backend:
    name: str
    url: str = ""
    kind: Literal["openai", "echo"] = "openai"
    api_key_env: str | None = None
    api_key_file: str | None = None
    embeddings_input: Literal["input", "prompt"] = "input"
    embeddings_encoding: Literal["any", "float"] = "any"   # "float": backend cannot do base64
    embeddings_path: str | None = None  # full upstream path instead of <base>/embeddings (Ollama: /api/embeddings)
    embeddings_max_inputs: int = 2048    # inputs in one embeddings request; more -> 400 (OpenAI's own cap)
    embeddings_concurrency: int = 8      # "prompt": calls of one request in flight at once (one per input)
    stream_usage: bool = True        # ask for stream_options.include_usage so usage is exact
    max_connections: int = 0         # upstream connections in flight; 0: no cap (streams hold one each)
    max_idle_connections: int = 64
    idle_timeout: float = 30.0       # an idle pooled connection older than this is closed
    tls_verify: bool = True
    ca_file: str | None = None
    headers: dict[str, str] = attrs.field(factory=dict)   # extra headers sent upstream
    timeouts: Timeouts | None = None  # per-phase overrides of [timeouts]
    echo_dimensions: int = 1024       # kind = "echo": embedding size
    echo_delay: float = 0.0           # kind = "echo": seconds before answering (smoke tests of timeouts)
    probe_path: str | None = None     # active health probe, e.g. "/v1/models" or "/health"; None: passive only
    probe_interval: float = 10.0
    probe_timeout: float = 5.0


@attrs.frozen(kw_only=True)
class Model:
    """A deployment: a public model name served by one backend under its upstream name."""

    name: str
    backend: str
    upstream_model: str | None = None
    # what it serves: chat (chat completions, completions, responses), embedding, moderation,
    # rerank, transcription (transcriptions and translations), speech, image
    kind: Literal["chat", "embedding", "moderation", "rerank", "transcription", "speech", "image"] = "chat"
    weight: float = 1.0
    max_concurrency: int = 0          # requests in flight to this deployment; 0: no cap
    max_queue: int = 64               # requests waiting for a slot when at the cap; more fail over
    queue_timeout: float = 5.0        # longest wait for a slot before failing over
    input_cost_per_1k: float = 0.0    # USD per 1000 prompt tokens (usage records, budgets, routing)
    output_cost_per_1k: float = 0.0   # USD per 1000 completion tokens


STRATEGIES = ("scored", "weighted", "priority", "least-busy", "least-latency")


@attrs.frozen(kw_only=True)
class Group:
    name: str
    models: tuple[str, ...]
    strategy: Literal["scored", "weighted", "priority", "least-busy", "least-latency"] = "scored"
    cost_weight: float = 0.0          # scored: seconds of predicted time one USD of predicted cost is worth
    exploration: float = 0.05         # scored: share of requests that go to a deployment to measure it


@attrs.frozen(kw_only=True)
class Routing:
    max_attempts: int = 3             # deployments tried per request before giving up
    breaker_failures: int = 5         # consecutive failures that open a deployment's breaker
    breaker_error_rate: float = 0.5   # ... or this error rate over breaker_window
    breaker_min_requests: int = 10    # ... with at least this many requests in the window
    breaker_window: float = 30.0      # seconds
    breaker_cooldown: float = 15.0    # open -> half-open after this long (one probe request at a time)
    max_retry_after: float = 300.0    # a longer upstream Retry-After is capped to this


@attrs.frozen(kw_only=True)
class Database:
    url: str = "sqlite:////var/lib/hxgwd/hxgwd.db"   # "" disables the store; postgresql://user@host/db
    password_env: str | None = None
    password_file: str | None = None
    spool_dir: str | None = None      # default: <SQLite file>-spool (hxgwd.db-spool), or /var/lib/hxgwd/spool
    spool_max_bytes: int = 256 * MiB
    spool_fsync: Literal["always", "batch", "never"] = "batch"   # "batch": fsync once per written batch
    queue_size: int = 10000           # usage records held in memory before they go to the spool
    batch_size: int = 1000
    key_refresh: float = 5.0          # keys from the store are re-read this often: revocation delay bound
    connect_timeout: float = 5.0
    statement_timeout: float = 10.0
    retention_days: int = 0           # usage rows older than this are deleted (hourly); 0 keeps all


@attrs.frozen(kw_only=True)
class Redis:
    url: str | None = None            # redis://host:port/db; None: limits are per host, in memory
    password_env: str | None = None
    password_file: str | None = None
    on_redis_error: Literal["local", "deny"] = "local"
    timeout: float = 0.25             # per limit check


@attrs.frozen(kw_only=True)
class Limits:
    timezone: str = "UTC"             # budgets reset at midnight / the 1st of the month here


@attrs.frozen(kw_only=True)
class Log:
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True


@attrs.frozen(kw_only=True)
class Metrics:
    public: bool = False              # GET /metrics without a key; else an admin key (Bearer, or Basic's password)


@attrs.frozen(kw_only=True)
class Config:
    server: Server = Server()
    timeouts: Timeouts = Timeouts()
    routing: Routing = Routing()
    log: Log = Log()
    database: Database = Database()
    redis: Redis = Redis()
    limits: Limits = Limits()
    metrics: Metrics = Metrics()
    keys: tuple[Key, ...] = ()
    backends: tuple[Backend, ...] = ()
    models: tuple[Model, ...] = ()
    groups: tuple[Group, ...] = ()   # written as [groups.NAME] tables
