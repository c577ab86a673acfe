"""Command line: run the daemon, check or print the config, make keys.

Only argparse is imported before the arguments are parsed, so `--version` and `--help` start
fast (the PyInstaller binary unpacks and imports on every start).

Exit codes:
    0   clean stop after draining; or the command succeeded
    1   --check-config found errors (like `nginx -t`), or a command failed
    2   bad command line
    3   forced stop: a second SIGTERM/SIGINT cut the drain short
    71  cannot listen (address in use, no permission)
    73  the usage spool directory cannot be created, or another hxgwd uses it
    75  with workers: the program file was replaced (an upgrade); systemd starts the new one
    78  the config is invalid at start, or the PostgreSQL schema needs `hxgwd db migrate` (EX_CONFIG)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import TYPE_CHECKING

from hxgwd.commandline import EXIT_CANTCREAT, EXIT_CONFIG, EXIT_FORCED, EXIT_LISTEN, EXIT_USAGE

if TYPE_CHECKING:
    from hxgwd.logs import Logger
    from hxgwd.runtime import Runtime

DEFAULT_CONFIG = "/etc/hxgwd/hxgwd.toml"


def config_path(args: argparse.Namespace) -> str:
    given: str | None = args.config
    if given is not None:          # `-c ""` is a mistake to report, not a wish for the default
        return given
    return os.environ.get("HXGWD_CONFIG") or DEFAULT_CONFIG


def build_parser() -> argparse.ArgumentParser:
    from hxgwd import __version__

    parser = argparse.ArgumentParser(
        prog="hxgwd", description="HX gateway daemon: an OpenAI-compatible API gateway.",
        epilog="Without a command, runs the daemon. Config: -c PATH, else $HXGWD_CONFIG, else "
               f"{DEFAULT_CONFIG}. SIGHUP reloads the config; SIGTERM drains and stops.")
    parser.add_argument("-c", "--config", metavar="PATH", help="config file")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config, print a summary, exit 0 (valid) or 1 (errors)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective config (defaults filled in, secrets redacted)")
    # how a supervisor starts its workers (workers/supervisor.py): INDEX:CONTROL_FD
    parser.add_argument("--worker", metavar="INDEX:FD", help=argparse.SUPPRESS)
    from hxgwd.http import resolve_parser
    parser.add_argument("--version", action="version",
                        version=f"hxgwd {__version__} (http parser: {resolve_parser('auto')})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    genkey = sub.add_parser("genkey", help="print a new random client key and its [[keys]] lines")
    genkey.add_argument("--name", default="my-app", help="the key's name in the config")
    for p in sub.choices.values():
        p.add_argument("-c", "--config", metavar="PATH", default=argparse.SUPPRESS, help="config file")
    from hxgwd.store.cli import add_parsers   # keys, db, usage: they add their own -c
    add_parsers(sub)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "genkey":
        return cmd_genkey(args.name)
    if args.command in ("keys", "db", "usage"):
        from hxgwd.store.cli import run as store_run
        return store_run(args, config_path(args))
    if args.check_config:
        return cmd_check_config(config_path(args))
    if args.print_config:
        return cmd_print_config(config_path(args))
    if args.worker:
        index, _, fd = args.worker.partition(":")
        return cmd_worker(int(index), int(fd))
    return cmd_run(config_path(args))


def cmd_genkey(name: str) -> int:
    import hashlib
    import secrets

    from hxgwd.config.validate import NAME_RE

    if not NAME_RE.match(name):   # printed into TOML as it is: nothing that could need quoting
        print(f"hxgwd genkey: --name {name!r}: use 1-128 letters, digits and ._:/@- (starting with "
              "a letter or digit)", file=sys.stderr)
        return EXIT_USAGE
    key = "sk-hx-" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    print("# The new key, shown this once; give it to the client and do not store it elsewhere:")
    print(key)
    print("# Paste into hxgwd.toml, then reload (systemctl reload hxgwd, or SIGHUP):")
    print("[[keys]]")
    print(f'name = "{name}"')
    print(f'sha256 = "{digest}"')
    return 0


def cmd_check_config(path: str) -> int:
    from hxgwd.config.check import summary, warnings
    from hxgwd.config.load import ConfigError
    from hxgwd.runtime import build_runtime

    try:
        runtime = build_runtime(path, generation=0)
    except ConfigError as exc:
        print(f"hxgwd: {path}: {len(exc.problems)} error(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  error: {problem}", file=sys.stderr)
        return 1
    for warning in warnings(path, runtime.config):
        print(f"  warning: {warning}", file=sys.stderr)
    print(summary(runtime))
    print(f"hxgwd: {path}: configuration OK")
    return 0


def cmd_print_config(path: str) -> int:
    from hxgwd.config.dump import dumps
    from hxgwd.config.load import ConfigError, load_file

    try:
        config = load_file(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    sys.stdout.write(dumps(config))
    return 0


def cmd_run(path: str) -> int:
    import signal

    # Until trio's handlers are in place, a SIGHUP would kill us and a SIGTERM skip the drain;
    # open_signal_receiver restores these dispositions when it exits.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    import trio

    from hxgwd.config.load import ConfigError
    from hxgwd.lifecycle import Daemon, serve
    from hxgwd.logs import Logger
    from hxgwd.runtime import RuntimeHolder, build_runtime

    log = Logger()
    try:
        runtime = build_runtime(path, generation=1)
    except ConfigError as exc:
        log.error("invalid config, not starting", path=path, problems=exc.problems)
        return EXIT_CONFIG
    log.configure(runtime.config.log.level, runtime.config.log.access_log)
    from hxgwd.config.check import warnings

    for warning in warnings(path, runtime.config):   # not only for who runs --check-config
        log.warning("config warning", warning=warning)
    from hxgwd.workers import worker_count

    count = worker_count(runtime.config.server.workers)
    if count > 1:
        return _run_supervisor(runtime, log, path, count)
    daemon = Daemon(RuntimeHolder(runtime), log, config_path=path)

    # What is loaded by now (modules, the config snapshot) lives as long as the process: out of
    # the collector's sight, a full collection under load took 4.6 ms instead of 28. Frozen
    # objects are still freed by refcount; only cycles among them would outlive a reload.
    gc.collect()
    gc.freeze()
    try:
        life = trio.run(serve, daemon)
    except Exception as raised:
        status = _start_failure(raised, log, runtime.config.server.listen)
        if status is None:
            raise
        return status
    return EXIT_FORCED if life.forced else 0


def _run_supervisor(runtime: Runtime, log: Logger, path: str, count: int) -> int:
    import trio

    from hxgwd.workers.slot import StartFailed
    from hxgwd.workers.supervisor import Supervisor

    supervisor = Supervisor(runtime, log, path, count)
    gc.collect()
    gc.freeze()
    try:
        trio.run(supervisor.run)
    except Exception as raised:
        cause = _sole_cause(raised)
        if isinstance(cause, StartFailed):     # logged by the supervisor, with the worker's status
            return cause.status
        status = _start_failure(raised, log, runtime.config.server.listen)
        if status is None:
            raise
        return status
    return EXIT_FORCED if supervisor.forced else supervisor.exit_status


def cmd_worker(index: int, control_fd: int) -> int:
    """A worker of a supervisor (workers/worker.py); its exit status is the supervisor's to report."""
    import signal

    signal.signal(signal.SIGHUP, signal.SIG_IGN)     # reloads come from the supervisor
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import trio

    from hxgwd.logs import Logger
    from hxgwd.workers import worker

    log = Logger()
    try:
        life = trio.run(worker.run, index, control_fd, log)     # it freezes the collector once built
    except Exception as raised:
        status = _start_failure(raised, log, None)
        if status is None:
            raise
        return status
    return EXIT_FORCED if life.forced else 0


def _start_failure(raised: Exception, log: Logger, listen: tuple[str, ...] | None) -> int | None:
    """The exit status of a failure at start, logged; None for anything else (a bug: re-raised).
    `listen`: the addresses, where this process binds them."""
    from hxgwd.store import SchemaError
    from hxgwd.store.spool import SpoolError

    cause = _sole_cause(raised)   # a failure at start may come wrapped by the nursery it ran in
    if isinstance(cause, SchemaError):
        log.error("cannot start: database schema", error=str(cause))
        return EXIT_CONFIG
    if isinstance(cause, SpoolError):
        log.error("cannot start: usage spool", error=str(cause))
        return EXIT_CANTCREAT
    if isinstance(cause, OSError) and listen is not None:   # listeners are bound before any task starts
        log.error("cannot listen", error=cause.strerror or str(cause), addresses=list(listen))
        return EXIT_LISTEN
    return None


def _sole_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
