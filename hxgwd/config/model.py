"""The configuration model: frozen attrs classes, the only home of defaults.

Field names are the TOML keys. `load.py` builds these from a parsed TOML document and rejects
unknown keys; `dump.py` writes them back. Validation that spans several tables (a model naming a
backend that does not exist) lives in `load.validate`, so every class here stays a plain record.
"""

from __future__ import annotations

from typing import Literal

import attrs

frozen = attrs.frozen(kw_only=True)

MiB = 1024 * 1024


@frozen
class Server:
    listen: tuple[str, ...] = ("127.0.0.1:4010",)
    max_connections: int = 1024          # open client connections; more wait in the kernel backlog
    backlog: int = 1024
    max_header_bytes: int = 16384        # request line + headers; more -> 431
    max_body_bytes: int = 16 * MiB       # request body; more -> 413
    header_timeout: float = 10.0         # from the first byte of a request to its last header -> 408
    body_timeout: float = 30.0           # between two pieces of a request body -> 408
    keepalive_timeout: float = 75.0      # idle keep-alive connection -> closed silently
    write_timeout: float = 60.0          # one write to a client that does not read -> connection dropped
    shutdown_grace: float = 25.0         # SIGTERM: in-flight requests get this long to finish
    max_response_bytes: int = 64 * MiB   # a non-streamed upstream answer is buffered up to this -> 502
    max_sse_event_bytes: int = 1 * MiB   # one server-sent event from upstream -> 502 if larger


@frozen
class Timeouts:
    """Upstream phases, in seconds; each phase has its own answer (502/504)."""

    connect: float = 5.0
    first_byte: float = 300.0       # request sent -> response headers (non-streamed answers come whole)
    between_chunks: float = 120.0   # two reads of a response body
    total: float = 900.0            # the whole upstream exchange, stream included
    pool: float = 5.0               # wait for a free connection of a backend's pool -> 503


@frozen
class Key:
    """A client key. Only its SHA-256 is held; the key itself comes from env or a file if at all."""

    name: str
    sha256: str | None = None
    key_env: str | None = None
    key_file: str | None = None
    models: tuple[str, ...] = ()    # models and groups this key may use; empty: all
    admin: bool = False             # may call /admin/* endpoints


@frozen
class Backend:
    name: str
    url: str = ""
    kind: Literal["openai", "echo"] = "openai"
    api_key_env: str | None = None
    api_key_file: str | None = None
    embeddings_input: Literal["input", "prompt"] = "input"
    embeddings_encoding: Literal["any", "float"] = "any"   # "float": backend cannot do base64
    embeddings_path: str | None = None  # full upstream path instead of <base>/embeddings (Ollama: /api/embeddings)
    stream_usage: bool = True        # ask for stream_options.include_usage so usage is exact
    max_connections: int = 256       # pooled upstream connections
    max_idle_connections: int = 64
    idle_timeout: float = 30.0       # an idle pooled connection older than this is closed
    tls_verify: bool = True
    ca_file: str | None = None
    headers: dict[str, str] = attrs.field(factory=dict)   # extra headers sent upstream
    timeouts: Timeouts | None = None  # per-phase overrides of [timeouts]
    echo_dimensions: int = 1024       # kind = "echo": embedding size
    echo_delay: float = 0.0           # kind = "echo": seconds before answering (smoke tests of timeouts)


@frozen
class Model:
    """A deployment: a public model name served by one backend under its upstream name."""

    name: str
    backend: str
    upstream_model: str | None = None
    kind: Literal["chat", "embedding"] = "chat"
    weight: float = 1.0


@frozen
class Group:
    name: str
    models: tuple[str, ...]
    strategy: Literal["weighted", "priority"] = "weighted"


@frozen
class Routing:
    max_attempts: int = 3           # deployments tried per request before giving up


@frozen
class Log:
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True


@frozen
class Config:
    server: Server = Server()
    timeouts: Timeouts = Timeouts()
    routing: Routing = Routing()
    log: Log = Log()
    keys: tuple[Key, ...] = ()
    backends: tuple[Backend, ...] = ()
    models: tuple[Model, ...] = ()
    groups: tuple[Group, ...] = ()   # written as [groups.NAME] tables
