"""TOML text -> `Config`, or every error found, each naming its key path.

Building is driven by the attrs field types of `model.py`, so a new key needs no code here.
Unknown keys are errors (with a "did you mean" hint) because a silently ignored typo in a
gateway config is an outage waiting for a reload.
"""

from __future__ import annotations

import difflib
import math
import tomllib
import types
import typing
from typing import Any, Literal

import attrs

from hxgwd.config import model as m
from hxgwd.config.places import entry_path, in_file_order
from hxgwd.config.validate import validate


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
    return draft_text(read_text(path), path)


def draft_text(text: str, path: str) -> Draft:
    return draft(_parse(text, source=path))


def read_text(path: str) -> str:
    """The config file's text; ConfigError if it cannot be read or is not UTF-8."""
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
    return text


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
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:     # int | Literal["auto"]: the kind of the value picks the branch
            literal = next(a for a in inner if typing.get_origin(a) is Literal)
            if isinstance(value, str):
                return _convert(literal, value, path, problems)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            problems.append(f"{path}: expected an integer or {' or '.join(repr(a) for a in typing.get_args(literal))}")
            return INVALID
        return _convert(inner[0], value, path, problems)
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
