"""Work too large for the event loop's thread: a parse or an encoding of a large body.

One event loop serves every client: a 15 MB body parsed there stalled all of them, /healthz
included, for 0.4-0.7 s. Above OFF_LOOP_BYTES of input, `off_loop` runs the work in a worker
thread instead. A thread only helps where the work lets go of the GIL now and then: CPython's
json parser keeps it inside C, except when it calls back into Python (strict parsing's
`parse_float` does, once per number), and a loop in Python code lets it go every 5 ms. Below the
threshold the work runs in place: handing it to a thread costs ~50-100 µs, more than small bodies
take to parse.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import trio

OFF_LOOP_BYTES = 1 << 20     # input size from which the work goes to a thread
MAX_THREADS = 2              # at once, over all requests: the GIL lets one run Python at a time; more
                             # would only share it, and each holds its input and output in memory

T = TypeVar("T")

_threads = trio.CapacityLimiter(MAX_THREADS)


async def off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args), in a worker thread when `size` (bytes of input) is at least OFF_LOOP_BYTES.
    A cancelled caller still waits for the thread to finish: the work is bounded by its input
    (request bodies by server.max_body_bytes, answers by server.max_response_bytes)."""
    if size < OFF_LOOP_BYTES:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args, limiter=_threads)
