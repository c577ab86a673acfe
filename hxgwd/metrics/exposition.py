"""Families -> the Prometheus text format 0.0.4, or OpenMetrics 1.0 when the scraper asks for it.

The two differ here only in the content type, the counter family's name (OpenMetrics names it
without `_total`), the escaping of HELP and the closing `# EOF`.
"""

from __future__ import annotations

import math
from typing import Iterable

from hxgwd.metrics.registry import Family

TEXT = b"text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = b"application/openmetrics-text; version=1.0.0; charset=utf-8"


def wants_openmetrics(accept: bytes | None) -> bool:
    """Prometheus sends `application/openmetrics-text;version=1.0.0;q=0.5,...,text/plain;...`:
    OpenMetrics when it is listed and not refused with q=0."""
    if not accept:
        return False
    for item in accept.lower().split(b","):
        kind, *params = (p.strip() for p in item.split(b";"))
        if kind == b"application/openmetrics-text":
            return not any(p.replace(b" ", b"") in (b"q=0", b"q=0.0", b"q=0.00", b"q=0.000") for p in params)
    return False


def render(families: Iterable[Family], openmetrics: bool = False) -> bytes:
    out: list[str] = []
    add = out.append
    for fam in families:
        name = fam.name
        samples = list(fam.samples())
        if not samples and fam.labels:     # a labelled family with no series yet: nothing to say
            continue
        shown = name if openmetrics or fam.kind != "counter" else name + "_total"
        add(f"# HELP {shown} {_help(fam.help)}\n# TYPE {shown} {fam.kind}\n")
        if not samples:
            samples = [("_total" if fam.kind == "counter" else "", (), (), 0.0)]
        for suffix, names, values, value in samples:
            if names:
                labels = ",".join(f'{n}="{_label(v)}"' for n, v in zip(names, values))
                add(f"{name}{suffix}{{{labels}}} {_value(value)}\n")
            else:
                add(f"{name}{suffix} {_value(value)}\n")
    if openmetrics:
        add("# EOF\n")
    return "".join(out).encode()


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
