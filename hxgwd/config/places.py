"""Where a config problem stands in the file: array entries numbered by their place in it, and
problems sorted by the position of their key paths, whichever check found them.
"""

from __future__ import annotations

from typing import Any


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
