"""Giving memory back to the system after a large request.

Python frees a large request's objects, but glibc keeps the freed pages for reuse: one 15 MB chat
request took the daemon from 35 to 154 MB, and it stayed there. glibc also raises its mmap
threshold (up to 32 MiB) each time it frees an mmapped block, so after one large body, the next
ones come from the heap, where their pages stay after free. `malloc_trim(0)` hands free pages
back (from every arena, not only the heap's top). It costs a walk over the free lists, so it runs
only after a request whose body or answer reached AFTER_BYTES, deferred to a quiet moment of the
loop (idle.py), and once for any number of such requests waiting for that moment. Where glibc
is absent (musl, macOS), it does nothing.
"""

from __future__ import annotations

import ctypes
from typing import Callable

AFTER_BYTES = 4 * 1024 * 1024     # a request's body + answer from which its memory is trimmed

_malloc_trim: Callable[[int], int] | None
try:
    _trim = ctypes.CDLL(None).malloc_trim             # glibc only; ctypes lets the GIL go meanwhile
    _trim.argtypes = [ctypes.c_size_t]
    _trim.restype = ctypes.c_int
    _malloc_trim = _trim
except (OSError, AttributeError):     # pragma: no cover - not glibc
    _malloc_trim = None

class MemoryTrim:
    """One per gateway: at most one trim waiting for a quiet moment, however many large
    requests ended meanwhile."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = False

    def wanted(self) -> bool:
        """Note that a trim is wanted; False when one is already waiting (it will do for both)."""
        if self._pending or _malloc_trim is None:
            return False
        self._pending = True
        return True

    def trim(self) -> None:
        self._pending = False
        if _malloc_trim is not None:
            _malloc_trim(0)
