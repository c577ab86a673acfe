"""hxgwd/idle.py: deferred bookkeeping runs when the loop is quiet, is bounded, and is never lost."""

from __future__ import annotations

import socket
import threading
import time

import trio
import trio.testing

from hxgwd.idle import IdleWork


def _errors() -> tuple[list[str], object]:
    seen: list[str] = []
    return seen, lambda where, exc: seen.append(f"{where}: {exc}")


async def test_outside_run_work_is_done_at_once():
    done: list[int] = []
    idle = IdleWork(_errors()[1])
    idle.defer(done.append, 1)
    assert done == [1]


async def test_work_waits_while_others_are_busy_and_runs_when_the_loop_is_quiet(nursery):
    done: list[str] = []
    idle = IdleWork(_errors()[1])
    await nursery.start(idle.run)
    idle.defer(done.append, "record")
    for _ in range(20):             # a busy task that never blocks, only yields: never quiet
        await trio.lowlevel.checkpoint()
        assert done == []
    await trio.sleep(0.01)          # now every task waits
    assert done == ["record"]


async def test_past_the_bound_a_defer_runs_the_backlog(nursery):
    done: list[int] = []
    idle = IdleWork(_errors()[1], max_pending=3)
    await nursery.start(idle.run)
    for i in range(3):
        idle.defer(done.append, i)
    assert done == []
    assert idle.statistics() == {"pending": 3, "max_pending": 3, "overflowed": 0}
    idle.defer(done.append, 3)      # one over: all that waits runs now, in order, without a quiet moment
    assert done == [0, 1, 2, 3]
    assert idle.statistics() == {"pending": 0, "max_pending": 3, "overflowed": 4}
    idle.defer(done.append, 4)      # under the bound again: waits for a quiet moment
    assert done == [0, 1, 2, 3]
    await trio.testing.wait_all_tasks_blocked(0.01)
    assert done == [0, 1, 2, 3, 4]
    assert idle.statistics() == {"pending": 0, "max_pending": 3, "overflowed": 4}


async def test_errors_are_reported_and_the_rest_still_runs(nursery):
    done: list[int] = []
    seen, on_error = _errors()
    idle = IdleWork(on_error)
    await nursery.start(idle.run)

    def broken() -> None:
        raise ValueError("boom")

    idle.defer(broken)
    idle.defer(done.append, 1)
    await trio.testing.wait_all_tasks_blocked(0.01)
    assert seen == ["deferred work: boom"] and done == [1]


async def test_what_is_pending_when_run_ends_is_done_then():
    done: list[int] = []
    idle = IdleWork(_errors()[1])
    async with trio.open_nursery() as nursery:
        await nursery.start(idle.run)
        idle.defer(done.append, 1)
        nursery.cancel_scope.cancel()   # before any quiet moment
    assert done == [1]
    idle.defer(done.append, 2)          # after run(): at once
    assert done == [1, 2]


class _CountWaits(trio.abc.Instrument):
    def __init__(self) -> None:
        self.waits = 0

    def before_io_wait(self, timeout: float) -> None:
        self.waits += 1


async def test_an_idle_daemon_sleeps_rather_than_polling(nursery):
    # with nothing deferred the task waits on an event, not for idleness: an idle waiter makes
    # the loop poll without sleeping, thousands of times in 50 ms
    idle = IdleWork(_errors()[1])
    await nursery.start(idle.run)
    idle.defer(lambda: None)
    await trio.sleep(0.01)
    counter = _CountWaits()
    trio.lowlevel.add_instrument(counter)
    try:
        await trio.sleep(0.05)
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert counter.waits < 10


async def test_gaps_shorter_than_quiet_for_do_not_count_as_quiet(nursery):
    # A client back to back: its next request comes a few µs after our answer. Work deferred then
    # must not run in that gap (the request would wait behind it), only once the loop has had
    # nothing to do for quiet_for. The peer is a thread, so each gap is real time with every task
    # blocked on the socket; quiet_for is set far above the gaps so that a busy machine cannot
    # stretch one into a quiet moment.
    done: list[str] = []
    idle = IdleWork(_errors()[1], quiet_for=0.5, max_wait=30)
    await nursery.start(idle.run)
    ours, echo = _echoing_peer(200)
    idle.defer(done.append, "record")
    with ours:
        for _ in range(200):
            await ours.send(b"x")
            assert await ours.recv(1) == b"x"
        assert done == []                   # 200 gaps of ~0.2 ms: none was quiet enough
        await trio.testing.wait_all_tasks_blocked(0.6)    # after IdleWork's 0.5 s of quiet
    echo.join()
    assert done == ["record"]


def _echoing_peer(rounds: int) -> tuple[trio.socket.SocketType, threading.Thread]:
    """Our end of a socket pair whose other end, a thread, sends each byte back after 0.2 ms of
    real time, `rounds` times: real gaps with every task blocked on the socket."""
    mine, theirs = socket.socketpair()
    echo = threading.Thread(target=_echo, args=(theirs, rounds), daemon=True)
    echo.start()
    return trio.socket.from_stdlib_socket(mine), echo


def _echo(sock: socket.socket, rounds: int) -> None:
    with sock:
        for _ in range(rounds):
            data = sock.recv(1)
            if not data:       # the test is done early
                return
            time.sleep(0.0002)
            sock.send(data)


async def test_a_loop_that_is_never_quiet_still_runs_the_work_within_max_wait(nursery):
    # a few long streams can keep the loop from ever being quiet for quiet_for, without ever
    # finishing max_pending requests: the access lines must not wait for that
    done: list[float] = []
    idle = IdleWork(_errors()[1], quiet_for=0.5, max_wait=0.05)
    await nursery.start(idle.run)
    ours, echo = _echoing_peer(2000)
    start = time.monotonic()
    idle.defer(lambda: done.append(time.monotonic() - start))
    with ours:
        for _ in range(2000):          # ~0.5 s of 0.2 ms gaps: never quiet for 0.5 s
            await ours.send(b"x")
            assert await ours.recv(1) == b"x"
            if done:
                break
    echo.join(timeout=5)
    assert done and done[0] < 0.4      # well before the ping-pong could have ended
