"""Work too large for the event loop's thread: a parse or an encoding of a large body.

One event loop serves every client: a 15 MB body parsed there stalled all of them, /healthz
included, for 0.4-0.7 s. Above OFF_LOOP_BYTES of input, `Offload.run` runs the work in a worker
thread instead. A thread only helps where the work lets go of the GIL now and then: CPython's
json parser keeps it inside C, except when it calls back into Python (strict parsing's
`parse_float` does, once per number), and a loop in Python code lets it go every 5 ms. Below the
threshold the work runs in place: handing it to a thread costs ~50-100 µs, more than small bodies
take to parse. Work that stays in C throughout (json's encoder, or its parser on strings) keeps
the GIL in a thread too: `dumps_in_steps` (and parse.json_document_in_steps) split it into
elements, each its own call from Python.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import trio

OFF_LOOP_BYTES = 1 << 20     # input size from which the work goes to a thread
MAX_THREADS = 2              # at once, over all requests: the GIL lets one run Python at a time; more
                             # would only share it, and each holds its input and output in memory

T = TypeVar("T")

class Offload:
    """Worker threads for work too large for the event loop: one per gateway (and one per echo
    backend), so that at most MAX_THREADS of its pieces of work run at once."""

    __slots__ = ("_threads",)

    def __init__(self, max_threads: int = MAX_THREADS) -> None:
        self._threads = trio.CapacityLimiter(max_threads)

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args), in a worker thread when `size` (bytes of input) is at least OFF_LOOP_BYTES.
        A cancelled caller still waits for the thread to finish: the work is bounded by its input
        (request bodies by server.max_body_bytes, answers by server.max_response_bytes)."""
        if size < OFF_LOOP_BYTES:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._threads)


def dumps_in_steps(doc: Any, encode: Callable[[Any], str]) -> bytes:
    """encode(doc).encode() for a large document, to run in a worker thread: the arrays of a
    top-level object are encoded an element at a time, from Python, so that the thread lets the
    loop's take the GIL between elements (json's C encoder holds it throughout: 60 ms for a 15 MB
    chat body, in a thread or not; in steps, the loop waited 16 ms at worst, for 60 % more time
    in all). `encode` must be compact (separators "," and ":"), as the result is spliced."""
    if not isinstance(doc, dict):
        return encode(doc).encode()
    members = []
    for key, value in doc.items():
        if isinstance(value, list):
            members.append(f'{encode(key)}:[{",".join([encode(item) for item in value])}]')
        else:
            members.append(f"{encode(key)}:{encode(value)}")
    return f'{{{",".join(members)}}}'.encode()
