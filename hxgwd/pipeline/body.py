"""The gateway's reading of a request body: JSON, strictly."""

from __future__ import annotations

import json
import math
from typing import Any


def json_document(body: bytes) -> Any:
    """A request body as JSON, strictly (RFC 8259): UTF-8 without a BOM, and no NaN or Infinity,
    which Python's json takes but other parsers, upstreams included, refuse. ValueError otherwise,
    nesting too deep for the parser included."""
    try:
        return _STRICT_DECODE(body.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):   # 1e400
        raise ValueError("number out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_STRICT_DECODE = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant).decode   # built once
