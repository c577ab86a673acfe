"""`hxgwd keys ...`, `hxgwd db ...`, `hxgwd usage`: the store from the command line.

Every command reads the same config as the daemon (-c PATH, $HXGWD_CONFIG, the default) and
opens the store of its [database] section. Only argparse is imported here at module level:
hxgwd/cli.py builds these parsers for every start, `--version` included; the store, trio and the
drivers are imported by `run`.

A new key is printed once, alone on stdout (so `KEY=$(hxgwd keys create --name x)` works); the
notes about it go to stderr. A SQLite file is made only by the commands that write something of
their own (`keys create`, `db migrate`) and by the daemon; the others, on a path with no file yet,
say so and make nothing. An existing SQLite file is migrated on first use by any command, as the
daemon does; a PostgreSQL schema is changed only by `hxgwd db migrate`.

Exit codes: 0 done; 1 failed (store unreachable, no SQLite database at that path yet, unknown key,
schema out of date: `db status` says 1 when a migration is due); 2 bad command line (a time flag
that is not a time, an --expires in the past, a bad `keys create` --name, --budget-usd or
--models included).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Sequence

from hxgwd.commandline import EXIT_USAGE, EXPIRES_HELP, WHEN_HELP, parse_when
from hxgwd.config.validate import NAME_RE

if TYPE_CHECKING:
    from hxgwd.config import model as m
    from hxgwd.store import Store

COMMANDS = ("keys", "db", "usage")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", metavar="PATH", default=argparse.SUPPRESS, help="config file")
        return p

    keys = with_config(sub.add_parser("keys", help="virtual keys in the database: create, list, show, revoke"))
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = with_config(actions.add_parser("create", help="make a key and print it, once"))
    create.add_argument("--name", required=True, help="the key's name: in logs, usage and reports")
    create.add_argument("--models", nargs="+", default=[], metavar="MODEL",
                        help="models and groups the key may use (space or comma separated; default: all)")
    create.add_argument("--rpm", type=_positive_int, help="requests per minute")
    create.add_argument("--tpm", type=_positive_int, help="tokens per minute")
    create.add_argument("--budget-usd", type=float, metavar="X", help="spend allowed per budget period")
    create.add_argument("--budget-period", choices=("day", "month"), default="month")
    create.add_argument("--expires", metavar="WHEN", help=f"expiry: {EXPIRES_HELP}")
    create.add_argument("--admin", action="store_true", help="may call the /admin API")
    listing = with_config(actions.add_parser("list", help="keys of the database and the config (never a secret)"))
    listing.add_argument("--all", action="store_true", help="revoked keys too")
    listing.add_argument("--json", action="store_true")
    show = with_config(actions.add_parser("show", help="one key's settings"))
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    revoke = with_config(actions.add_parser("revoke", help="revoke a key on every gateway (within key_refresh)"))
    revoke.add_argument("name")

    db = with_config(sub.add_parser("db", help="database schema: migrate, status; usage rows: prune"))
    db_actions = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    with_config(db_actions.add_parser("migrate", help="bring the schema to this hxgwd's version"))
    with_config(db_actions.add_parser("status", help="schema version: exit 0 if current, 1 if not"))
    prune = with_config(db_actions.add_parser(
        "prune", help="delete usage rows older than a time, now ([database] retention_days does it hourly)"))
    prune.add_argument("--before", metavar="WHEN", required=True, help=f"delete the rows before: {WHEN_HELP}")

    usage = with_config(sub.add_parser("usage", help="usage report: requests, tokens, cost"))
    usage.add_argument("--since", metavar="WHEN", default="30d", help=f"start, inclusive (default 30d): {WHEN_HELP}")
    usage.add_argument("--until", metavar="WHEN", help=f"end, exclusive (default now): {WHEN_HELP}")
    usage.add_argument("--by", choices=("key", "model", "deployment", "day"), default="key")
    usage.add_argument("--key", metavar="NAME", help="only this key's requests")
    usage.add_argument("--json", action="store_true")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def run(args: argparse.Namespace, config_path: str) -> int:
    from hxgwd.config.load import ConfigError, load_file

    try:
        config = load_file(config_path)
    except ConfigError as exc:
        _err(f"{config_path}: {len(exc.problems)} error(s)")
        for line in exc.problems:
            print(f"  error: {line}", file=sys.stderr)
        return 1
    problem = _time_flag_problem(args, config.limits.timezone) or _key_flag_problem(args, config)
    if problem:
        _err(problem)
        return EXIT_USAGE    # a bad flag value: as argparse exits for the flags it checks
    if not config.database.url:
        _err(f"{config_path}: the database is disabled ([database] url is empty)")
        return 1
    owner = _foreign_state_owner(config.database)
    if owner is not None:
        _err(f"the state directory belongs to {owner!r}: files made by root would lock the daemon out; "
             f"run this as that user: runuser -u {owner} -- hxgwd {' '.join(sys.argv[1:])}")
        return 1

    import trio

    from hxgwd.store import StoreError, open_store, read_password

    try:
        store = open_store(config.database, read_password(config.database), create=_makes_database(args))
        return trio.run(_dispatch, args, config, store)
    except (StoreError, ValueError) as exc:
        _err(str(exc))
        return 1
    except ImportError as exc:   # psycopg is an optional dependency
        _err(f"cannot use {config.database.url.split(':')[0]}: {exc} (pip install 'hxgwd[postgres]')")
        return 1


def _makes_database(args: argparse.Namespace) -> bool:
    """Whether this command may make the SQLite file: only those that store something of their own.
    A status, a list or a report of a mistyped path must not leave an empty database behind."""
    action = getattr(args, "keys_command", None) or getattr(args, "db_command", None)
    return (args.command, action) in (("keys", "create"), ("db", "migrate"))


def _time_flag_problem(args: argparse.Namespace, tz: str) -> str | None:
    """A one-line message naming the first of --since, --until, --before, --expires whose value
    is not a time (or an --expires in the past); checked before the store is opened, as argparse
    checks the other flags. The commands parse them again, knowing they will not fail."""
    import time

    now = time.time()
    for flag in ("since", "until", "before", "expires"):
        text = getattr(args, flag, None)
        if text is None or (not text and flag != "before"):   # an empty --since/--until: no bound
            continue
        try:
            when = parse_when(text, now, future=flag == "expires", tz=tz)
        except ValueError as exc:
            return f"--{flag} {exc}"
        if flag == "expires" and when <= now:
            return f"--expires {text}: that is in the past"
    return None


def _key_flag_problem(args: argparse.Namespace, config: m.Config) -> str | None:
    """`keys create`'s --name, --budget-usd and --models, checked like the time flags."""
    if getattr(args, "keys_command", None) != "create":
        return None
    if not NAME_RE.match(args.name):   # the same rule as config keys: it goes into logs and tables
        return f"--name {args.name!r}: use 1-128 letters, digits and ._:/@- (starting with a letter or digit)"
    if args.budget_usd is not None and not 0 <= args.budget_usd < 1e12:   # NaN and inf included
        return "--budget-usd: must be a number, 0 or more"
    targets = {md.name for md in config.models} | {g.name for g in config.groups}
    unknown = [name for name in _models_flag(args) if name not in targets]
    if unknown:
        return f"--models: no model or group named {unknown[0]!r} in the config"
    return None


def _models_flag(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(name for arg in args.models for name in arg.split(",") if name)


async def _dispatch(args: argparse.Namespace, config: m.Config, store: Store) -> int:
    try:
        if args.command == "db" and args.db_command != "prune":
            return await (_db_migrate if args.db_command == "migrate" else _db_status)(store)
        await store.ensure_schema()
        if args.command == "db":
            return await _db_prune(args, store, config)
        if args.command == "usage":
            return await _usage(args, store, config.limits.timezone)
        return await {"create": _keys_create, "list": _keys_list, "show": _keys_show,
                      "revoke": _keys_revoke}[args.keys_command](args, config, store)
    finally:
        await store.aclose()


# --- db ----------------------------------------------------------------------------------------------

async def _db_migrate(store: Store) -> int:
    before, after = await store.migrate()
    if before == after:
        print(f"hxgwd: {store.url_for_display}: schema already at version {after}")
    else:
        print(f"hxgwd: {store.url_for_display}: schema migrated from version {before} to {after}")
    return 0


async def _db_status(store: Store) -> int:
    from hxgwd.store import schema_problem

    current, expected = await store.schema_status()
    if current == expected:
        print(f"hxgwd: {store.url_for_display}: schema at version {current}, up to date")
        return 0
    print(f"hxgwd: {store.url_for_display}: {schema_problem(current, expected)}")
    return 1


async def _db_prune(args: argparse.Namespace, store: Store, config: m.Config) -> int:
    import time

    from hxgwd.logs import Logger
    from hxgwd.store import iso_time
    from hxgwd.store.retention import Pruner

    before = parse_when(args.before, time.time(), tz=config.limits.timezone)
    # delete_before() logs nothing; the Logger is what run() would write to
    pruner = Pruner(store, Logger(), days=0,
                    timeout=config.database.connect_timeout + config.database.statement_timeout)
    try:
        await pruner.delete_before(before)
    finally:   # a failure midway still says what was deleted (the error follows, exit 1)
        print(f"hxgwd: {store.url_for_display}: deleted {pruner.pruned} usage rows from before {iso_time(before)}")
    return 0


# --- keys --------------------------------------------------------------------------------------------

async def _keys_create(args: argparse.Namespace, config: m.Config, store: Store) -> int:
    import time

    if any(k.name == args.name for k in config.keys):
        _err(f"a key named {args.name!r} is in the config file; choose another name")
        return 1
    models = _models_flag(args)
    expires = (parse_when(args.expires, time.time(), future=True, tz=config.limits.timezone)
               if args.expires else None)
    key, info = await store.create_key(args.name, models=models, admin=args.admin, rpm=args.rpm, tpm=args.tpm,
                                       budget_usd=args.budget_usd, budget_period=args.budget_period,
                                       expires_at=expires)
    print(f"# key {info.name!r} ({info.prefix}...), shown this once: give it to the client. The database "
          "keeps only its SHA-256.", file=sys.stderr)
    print(f"# Running gateways accept it within {config.database.key_refresh:g} s.", file=sys.stderr)
    print(key)
    return 0


def _config_key_doc(k: m.Key) -> dict[str, Any]:
    return {"name": k.name, "source": "config", "prefix": None, "models": list(k.models), "admin": k.admin,
            "rpm": k.rpm, "tpm": k.tpm, "budget_usd": k.budget_usd, "budget_period": k.budget_period,
            "created_at": None, "expires_at": None, "revoked_at": None, "status": "active"}


async def _keys_list(args: argparse.Namespace, config: m.Config, store: Store) -> int:
    import time

    now = time.time()
    docs = [{**info.as_dict(now), "source": "store"} for info in await store.list_keys(include_revoked=args.all)]
    docs += [_config_key_doc(k) for k in config.keys]
    docs.sort(key=lambda d: (d["name"], d["source"]))
    if args.json:
        _print_json(docs)
        return 0
    header = ("NAME", "PREFIX", "SOURCE", "STATUS", "MODELS", "RPM", "TPM", "BUDGET", "EXPIRES")
    rows = [(d["name"], (d["prefix"] + "...") if d["prefix"] else "-", d["source"], d["status"],
             ",".join(d["models"]) or "*", _dash(d["rpm"]), _dash(d["tpm"]), _budget(d),
             d["expires_at"] or "-") for d in docs]
    _table(header, rows)
    return 0


async def _keys_show(args: argparse.Namespace, config: m.Config, store: Store) -> int:
    import time

    from hxgwd.store import KeyNotFound

    try:
        doc = {**(await store.get_key(args.name)).as_dict(time.time()), "source": "store"}
    except KeyNotFound:
        matches = [k for k in config.keys if k.name == args.name]
        if not matches:
            raise
        doc = _config_key_doc(matches[0])
    if args.json:
        _print_json(doc)
    else:
        for name, value in doc.items():
            if name != "id":
                text = _dash(value) if not isinstance(value, list) else ",".join(value) or "*"
                print(f"{name + ':':<15}{visible(text)}")
    return 0


async def _keys_revoke(args: argparse.Namespace, config: m.Config, store: Store) -> int:
    from hxgwd.store import KeyNotFound

    try:
        info = await store.revoke_key(args.name)
    except KeyNotFound:
        if any(k.name == args.name for k in config.keys):
            _err(f"{args.name!r} is a key of the config file: remove it there, then reload (SIGHUP)")
            return 1
        raise
    print(f"hxgwd: revoked key {info.name!r} ({info.prefix}...); running gateways refuse it within "
          f"{config.database.key_refresh:g} s")
    return 0


# --- usage -------------------------------------------------------------------------------------------

async def _usage(args: argparse.Namespace, store: Store, tz: str) -> int:
    import time

    from hxgwd.store import iso_time
    from hxgwd.store.schema import SUMMARY_FIELDS

    now = time.time()
    since = parse_when(args.since, now, tz=tz) if args.since else None
    until = parse_when(args.until, now, tz=tz) if args.until else None
    rows = await store.usage_summary(since, until, args.by, key=args.key, tz=tz)
    total = {f: sum(r[f] for r in rows) for f in SUMMARY_FIELDS if f != "avg_ms"}
    total["cost_usd"] = round(total["cost_usd"], 6)
    requests = total["requests"]
    total["avg_ms"] = round(sum(r["avg_ms"] * r["requests"] for r in rows) / requests, 3) if requests else 0.0
    if args.json:
        _print_json({"since": iso_time(since), "until": iso_time(until), "by": args.by, "key": args.key,
                     "timezone": tz, "rows": rows, "total": total})
        return 0
    print(f"usage from {iso_time(since) or 'the start'} to {iso_time(until) or 'now'}, by {args.by}"
          + (f" ({tz})" if args.by == "day" else "")
          + (f", key {visible(args.key)}" if args.key else ""))
    header = (args.by.upper(), "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "TOKENS", "COST USD", "AVG MS")
    body = [(_dash(r[args.by]), r["requests"], r["errors"], r["prompt_tokens"], r["completion_tokens"],
             r["total_tokens"], f"{r['cost_usd']:.4f}", f"{r['avg_ms']:.0f}") for r in rows]
    body.append(("TOTAL", total["requests"], total["errors"], total["prompt_tokens"], total["completion_tokens"],
                 total["total_tokens"], f"{total['cost_usd']:.4f}", f"{total['avg_ms']:.0f}"))
    _table(header, body, numeric_from=1)
    return 0


# --- helpers -----------------------------------------------------------------------------------------

def _foreign_state_owner(database: m.Database) -> str | None:
    """As root, the name of the user owning the SQLite file's directory if that is not root."""
    import os
    import pwd

    from hxgwd.store import sqlite_path

    if os.geteuid() != 0 or not database.url.startswith("sqlite:"):
        return None
    try:
        uid = os.stat(os.path.dirname(os.path.abspath(sqlite_path(database.url)))).st_uid
    except OSError:
        return None
    if uid == 0:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _budget(doc: dict[str, Any]) -> str:
    return "-" if doc["budget_usd"] is None else f"${doc['budget_usd']:g}/{doc['budget_period']}"


def visible(text: str) -> str:
    """`text` with each character a terminal could act on, or that could hide or reorder what is
    shown, written as a Python escape (ESC as the four characters \\x1b): C0 and C1 controls, DEL,
    bidi overrides and other format characters, line separators. Every table and line printed from
    the database goes through it: model names in usage rows are whatever clients sent, and an ESC
    sequence there could retitle or clear the operator's terminal."""
    if text.isprintable():     # the common case; str.isprintable is False for all of the above
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escaped(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _print_json(doc: object) -> None:
    """JSON for scripts: json.dumps escapes C0 and (ensure_ascii) everything past ASCII, but not
    DEL, which JSON allows raw; escaped too, so that no output of these commands carries one."""
    import json

    print(json.dumps(doc, indent=2).replace("\x7f", "\\u007f"))


def _table(header: tuple[str, ...], rows: Sequence[tuple[object, ...]], numeric_from: int | None = None) -> None:
    cells = [tuple(visible(str(c)) for c in header)] + [tuple(visible(str(c)) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        parts = [c.rjust(w) if numeric_from is not None and i >= numeric_from else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(parts).rstrip())


def _err(message: str) -> None:
    print(f"hxgwd: {message}", file=sys.stderr)
