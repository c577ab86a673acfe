"""The running configuration as one immutable snapshot, compiled from `Config`.

A `Runtime` bundles the config with what is derived from it once (key table, model registry,
resolved backend secrets) and a generation number. SIGHUP builds a new one off the event loop and
swaps `RuntimeHolder.current` in one assignment; a request reads `current` once when it starts and
keeps that snapshot to its end, so a reload never changes a request halfway.
"""

from __future__ import annotations

import errno
import hashlib
import os
import ssl
import time
import urllib.parse
from typing import Callable, Mapping

import attrs

from hxgwd.config import load
from hxgwd.config import model as m
from hxgwd.config.load import ConfigError
from hxgwd.config.validate import (EXAMPLE_KEY_SHA256, HEX64_RE, example_key_problem,
                                   public_listen_address)
from hxgwd.http.tls import server_context


@attrs.frozen
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> bytes:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == default else f"{host}:{self.port}").encode()


@attrs.frozen
class BackendRuntime:
    name: str
    config: m.Backend
    origin: Origin | None          # None for in-process backends (echo)
    base_path: str                 # OpenAI paths go under it, e.g. "/v1"
    timeouts: m.Timeouts
    api_key: str | None = attrs.field(default=None, repr=False)

    def path(self, endpoint: str) -> str:
        """`endpoint` is an OpenAI path below /v1, e.g. "/chat/completions"."""
        if endpoint == "/embeddings" and self.config.embeddings_path:
            return self.config.embeddings_path
        return self.base_path + endpoint


@attrs.frozen
class Deployment:
    id: str                        # stable across reloads while name, backend and upstream name stay
    model: str
    backend: BackendRuntime
    upstream_model: str
    kind: str
    weight: float
    config: m.Model = attrs.field(repr=False, eq=False)


@attrs.frozen
class Target:
    """What a request names: a model (its deployments) or a group (its models' deployments)."""

    name: str
    kind: str
    group: str | None
    policy: m.Group                  # strategy and its knobs
    deployments: tuple[Deployment, ...]

    @property
    def strategy(self) -> str:
        return self.policy.strategy


@attrs.frozen
class Principal:
    key_name: str
    allowed: frozenset[str] | None   # model and group names; None: all
    admin: bool = False
    digest: bytes = attrs.field(default=b"", repr=False)
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    budget_period: str = "month"
    source: str = "config"           # "config" or "store"

    def may_use(self, name: str) -> bool:
        return self.allowed is None or name in self.allowed


@attrs.frozen
class Runtime:
    config: m.Config
    generation: int
    source: str
    keys: Mapping[bytes, Principal] = attrs.field(repr=False)   # sha256 digest -> principal
    targets: Mapping[str, Target]
    deployments: Mapping[str, Deployment]
    backends: Mapping[str, BackendRuntime]
    loaded_at: float
    db_password: str | None = attrs.field(default=None, repr=False)
    redis_password: str | None = attrs.field(default=None, repr=False)
    tls: ssl.SSLContext | None = attrs.field(default=None, repr=False, eq=False)   # [server] tls_cert, tls_key
    read: ConfigRead | None = attrs.field(default=None, repr=False, eq=False)   # None: not from a file


@attrs.frozen
class ReloadResult:
    """The last SIGHUP's outcome, for /status: "ok", "rejected" (a bad file) or "failed" (a bug)."""

    result: str
    at: float                        # unix time
    generation: int                  # the generation serving after it
    problems: tuple[str, ...] = ()


class RuntimeHolder:
    """Holds the current snapshot; the lifecycle owns it and passes it to what needs it."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
        self.last_reload: ReloadResult | None = None    # none since the start

    def swap(self, runtime: Runtime) -> None:
        self.current = runtime

    def reloaded(self, result: str, problems: tuple[str, ...] | list[str] = ()) -> None:
        self.last_reload = ReloadResult(result, time.time(), self.current.generation, tuple(problems))


@attrs.frozen
class ConfigRead:
    """What a config was compiled from: the file's text and the secret files it named, as read
    once. Workers compile the supervisor's read (workers/), so that all serve the same generation
    even if a file changes meanwhile."""

    path: str
    text: str
    files: Mapping[str, str] = attrs.field(repr=False)      # key_file, api_key_file, password_file


def build_runtime(path: str, generation: int, environ: Mapping[str, str] | None = None,
                  read: ConfigRead | None = None, adjust: Callable[[m.Config], m.Config] | None = None) -> Runtime:
    """Read, validate and compile a config file (or what `read` holds of it); raise ConfigError
    listing every problem. `adjust`: applied to the checked config before it is compiled (a
    worker takes its share of the caps, workers/worker.py)."""
    text = read.text if read is not None else load.read_text(path)
    files: dict[str, str] = {}

    def read_secret(name: str) -> str:
        if read is not None:
            if name not in read.files:
                raise FileNotFoundError(errno.ENOENT, "not read by the supervisor", name)
            return read.files[name]
        files[name] = value = _read_secret(name)
        return value

    draft = load.draft_text(text, path)
    if draft.problems:
        # the secrets' sources are checked too, so that one run reports every problem of the file
        found = read_secrets(draft.config, environ, read_secret, entry_path=draft.entry_path).problems \
            if draft.config else []
        raise ConfigError(draft.in_file_order(draft.problems + found))
    assert draft.config is not None          # None only with problems
    try:
        config = adjust(draft.config) if adjust is not None else draft.config
        runtime = compile_config(config, generation, path, environ, read_secret)
    except ConfigError as exc:
        raise ConfigError(draft.in_file_order(exc.problems)) from None
    return attrs.evolve(runtime, read=read or ConfigRead(path, text, files))


@attrs.frozen
class Secrets:
    """What the config's secret sources hold, entry by entry (None where a source failed)."""

    key_digests: tuple[bytes | None, ...] = attrs.field(repr=False)     # per config.keys entry
    backend_api_keys: tuple[str | None, ...] = attrs.field(repr=False)  # per config.backends entry
    db_password: str | None = attrs.field(repr=False)
    redis_password: str | None = attrs.field(repr=False)
    problems: list[str]
    tls: ssl.SSLContext | None = attrs.field(default=None, repr=False)   # holds the private key


def read_secrets(config: m.Config, environ: Mapping[str, str] | None = None,
                 read_secret: Callable[[str], str] | None = None,
                 entry_path: Callable[[str, int], str] = lambda table, i: f"{table}[{i}]") -> Secrets:
    """Reads every key_env/key_file, api_key_env/api_key_file and password source of `config`;
    `entry_path` names an array entry (by its place in the file when entries were left out)."""
    env = os.environ if environ is None else environ
    read = read_secret or _read_secret
    problems: list[str] = []

    def secret(path: str, env_name: str | None, file_name: str | None) -> str | None:
        try:
            if env_name:
                if env_name not in env:
                    problems.append(f"{path}: environment variable {env_name} is not set")
                    return None
                if not env[env_name].strip():
                    problems.append(f"{path}: environment variable {env_name} is empty")
                    return None
                return env[env_name].strip()
            if file_name:
                value = read(file_name)
                if not value:
                    problems.append(f"{path}: {file_name} is empty")
                return value or None
        except OSError as exc:
            problems.append(f"{path}: cannot read {file_name}: {exc.strerror}")
        except UnicodeDecodeError:
            problems.append(f"{path}: {file_name} is not UTF-8 text")
        return None

    digests: list[bytes | None] = []
    named: dict[bytes, str] = {}
    public = public_listen_address(config.server)
    for i, k in enumerate(config.keys):
        if k.sha256:    # one that is not 64 hex digits is a problem of the draft's already
            digest: bytes | None = bytes.fromhex(k.sha256) if HEX64_RE.match(k.sha256) else None
        else:
            field = "key_env" if k.key_env else "key_file"
            value = secret(f"{entry_path('keys', i)}.{field}", k.key_env, k.key_file)
            digest = hashlib.sha256(value.encode()).digest() if value is not None else None
            # the same refusal as for its sha256 in the file (validate.py), for the key itself
            if digest is not None and public and digest.hex() == EXAMPLE_KEY_SHA256:
                problems.append(example_key_problem(f"{entry_path('keys', i)}.{field}", public))
        if digest is not None and digest in named:
            problems.append(f"{entry_path('keys', i)}: same key as {named[digest]!r}")
        if digest is not None:
            named[digest] = k.name
        digests.append(digest)
    api_keys = []
    for i, b in enumerate(config.backends):
        field = "api_key_env" if b.api_key_env else "api_key_file"
        api_keys.append(secret(f"{entry_path('backends', i)}.{field}", b.api_key_env, b.api_key_file))
    db, rd = config.database, config.redis
    db_password = secret("database." + ("password_env" if db.password_env else "password_file"),
                         db.password_env, db.password_file)
    redis_password = secret("redis." + ("password_env" if rd.password_env else "password_file"),
                            rd.password_env, rd.password_file)
    tls, tls_problems = server_context(config.server)
    return Secrets(tuple(digests), tuple(api_keys), db_password, redis_password, problems + tls_problems, tls)


def compile_config(config: m.Config, generation: int, source: str = "<config>",
                   environ: Mapping[str, str] | None = None,
                   read_secret: Callable[[str], str] | None = None) -> Runtime:
    secrets = read_secrets(config, environ, read_secret)
    if secrets.problems:
        raise ConfigError(secrets.problems)

    keys: dict[bytes, Principal] = {}
    for k, digest in zip(config.keys, secrets.key_digests):
        assert digest is not None     # a source that failed is among the problems
        keys[digest] = Principal(k.name, frozenset(k.models) if k.models else None, k.admin, digest,
                                 k.rpm, k.tpm, k.budget_usd, k.budget_period)

    backends: dict[str, BackendRuntime] = {}
    for b, api_key in zip(config.backends, secrets.backend_api_keys):
        origin, base = _split_url(b.url) if b.kind == "openai" else (None, "")
        backends[b.name] = BackendRuntime(b.name, b, origin, base, b.timeouts or config.timeouts, api_key)

    deployments: dict[str, Deployment] = {}
    by_model: dict[str, list[Deployment]] = {}
    for md in config.models:
        base_id = f"{md.name}@{md.backend}"
        upstream = md.upstream_model or md.name
        dep_id = base_id if base_id not in deployments else f"{base_id}/{upstream}"
        n = 2
        while dep_id in deployments:
            dep_id, n = f"{base_id}#{n}", n + 1
        dep = Deployment(dep_id, md.name, backends[md.backend], upstream, md.kind, md.weight, md)
        deployments[dep_id] = dep
        by_model.setdefault(md.name, []).append(dep)

    # A model with several deployments is routed like a group with default settings.
    targets: dict[str, Target] = {
        name: Target(name, deps[0].kind, None, m.Group(name=name, models=(name,)), tuple(deps))
        for name, deps in by_model.items()
    }
    for g in config.groups:
        deps = tuple(d for name in g.models for d in by_model[name])
        targets[g.name] = Target(g.name, deps[0].kind, g.name, g, deps)

    return Runtime(config, generation, source, keys, targets, deployments, backends, time.time(),
                   secrets.db_password, secrets.redis_password, secrets.tls)


def _read_secret(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _split_url(url: str) -> tuple[Origin, str]:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return Origin(parts.scheme, parts.hostname or "", port), path


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
