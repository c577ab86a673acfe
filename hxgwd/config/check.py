"""What `hxgwd --check-config` prints besides errors: a one-screen summary, and warnings."""

from __future__ import annotations

import os
import stat
import time

from hxgwd.config import model as m
from hxgwd.config.validate import EXAMPLE_KEY_SHA256
from hxgwd.http.tls import certificate_dates, expiry_warnings
from hxgwd.runtime import Runtime
from hxgwd.workers import worker_count


def summary(rt: Runtime) -> str:
    c = rt.config
    lines = [f"listen:   {', '.join(c.server.listen)}"]
    if c.server.workers != 1:
        count = worker_count(c.server.workers)
        lines.append(f"workers:  {count}" + (" (auto: the CPUs this process may use)" if c.server.workers == "auto" else ""))
    if rt.tls is not None and c.server.tls_cert is not None:     # the one implies the other
        dates = certificate_dates(c.server.tls_cert)
        lines.append(f"tls:      {', '.join(c.server.tls_listen) or 'every listen address'}; {c.server.tls_cert}"
                     + (f" until {time.strftime('%Y-%m-%d', time.gmtime(dates[1]))}" if dates else ""))
    if c.server.cors_origins:
        lines.append(f"cors:     {', '.join(c.server.cors_origins)}"
                     + (" (with credentials)" if c.server.cors_allow_credentials else ""))
    sources = {"sha256": 0, "key_env": 0, "key_file": 0}
    for k in c.keys:
        for s in sources:
            if getattr(k, s):
                sources[s] += 1
    lines.append(f"keys:     {len(c.keys)} ({', '.join(f'{n} {s}' for s, n in sources.items() if n) or 'none'})"
                 + (f", {sum(k.admin for k in c.keys)} admin" if any(k.admin for k in c.keys) else ""))
    lines.append(f"backends: {len(c.backends)}")
    for b in c.backends:
        where = b.url if b.kind == "openai" else f"echo, {b.echo_dimensions} dims"
        extras = [f"embeddings_input={b.embeddings_input}"] if b.embeddings_input != "input" else []
        if b.api_key_env or b.api_key_file:
            extras.append("api key set")
        lines.append(f"  {b.name:<20} {where}" + (f"  ({', '.join(extras)})" if extras else ""))
    lines.append(f"models:   {len({md.name for md in c.models})} ({len(c.models)} deployments)")
    for dep in rt.deployments.values():
        lines.append(f"  {dep.model:<20} -> {dep.backend.name}/{dep.upstream_model} [{dep.kind}]")
    lines.append(f"groups:   {len(c.groups)}")
    for g in c.groups:
        lines.append(f"  {g.name:<20} {g.strategy}: {', '.join(g.models)}")
    return "\n".join(lines)


def warnings(path: str, config: m.Config) -> list[str]:
    """What --check-config prints and the daemon logs at start: fine to run with, worth a look."""
    out = [f"key {k.name!r} is the public example key sk-hx-dev-1234: fine on loopback only; make real keys "
           "with `hxgwd genkey` or `hxgwd keys create`" for k in config.keys if k.sha256 == EXAMPLE_KEY_SHA256]
    files = [("config file", path)] + [(f"key file of key {k.name!r}", k.key_file) for k in config.keys if k.key_file]
    files += [(f"api key file of backend {b.name!r}", b.api_key_file) for b in config.backends if b.api_key_file]
    files += [("TLS private key file", config.server.tls_key)] if config.server.tls_key else []
    files += [(f"{table} password file", getattr(config, table).password_file) for table in ("database", "redis")
              if getattr(config, table).password_file]
    for what, file in files:
        try:
            mode = os.stat(file).st_mode
        except OSError:
            continue
        if mode & stat.S_IROTH:
            out.append(f"{what} {file} is readable by other users (chmod o-r)")
    workers = config.server.workers
    if isinstance(workers, int) and workers > (cpus := len(os.sched_getaffinity(0))):
        out.append(f"server.workers = {workers} is more than the {cpus} CPUs this process may use: the workers "
                   "take turns on them (\"auto\" runs one per CPU)")
    return out + expiry_warnings(config.server)
