"""The control channel between the supervisor and one worker: a stream socket pair made by the
supervisor (the worker's end is inherited), carrying length-prefixed JSON frames both ways.

    {"id": 7, "call": "admit", "args": {...}}    a call; answered by
    {"id": 7, "result": ...} or {"id": 7, "error": "..."}
    {"call": "settle", "args": {...}}            a notification: no id, no answer

Frames are encoded and decoded by `Frames` (sans-I/O). A `Peer`'s calls and notifications queue
for its writer task, which sends whatever is queued when it wakes in one system call; the answers
to the calls of one read go out together, at once (`_emit` says why). The queue is bounded
(MAX_QUEUED_BYTES; then calls wait, and notifications without waiting are refused) and so is a
frame (MAX_FRAME). Every call has a deadline; a reply that comes
after it is dropped. The channel closing (the other process died or closed it) fails the calls
in flight with `PeerGone` and sets `closed`.

JSON, not pickle: nothing from the channel is ever executed, and both ends are ours anyway.
"""

from __future__ import annotations

import inspect
import json
import socket
import struct
from collections import deque
from typing import Any, Awaitable, Callable, Mapping

import trio

MAX_FRAME = 32 * 1024 * 1024     # a /metrics or /status gather of many deployments stays far below
MAX_QUEUED_BYTES = 8 * 1024 * 1024   # frames waiting for the writer (a slow reader on the other side)
HEADER = struct.Struct("!I")

Handler = Callable[[Any], Any]   # sync (answered inline, in order) or async (answered from a task)

_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


class PeerGone(Exception):
    """The other end closed the channel or died."""


class RemoteError(Exception):
    """The other end's handler raised; the message is its one-line description."""


class FrameError(Exception):
    """A frame over MAX_FRAME, or a length prefix that says so: the channel is closed."""


def encode(message: Any) -> bytes:
    body = _encode(message).encode()
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes is over {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


class Frames:
    """Bytes in, messages out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> list[Any]:
        buf = self._buf
        buf += data
        out: list[Any] = []
        at = 0
        while len(buf) - at >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, at)
            if size > MAX_FRAME:
                raise FrameError(f"frame of {size} bytes is over {MAX_FRAME}")
            if len(buf) - at - HEADER.size < size:
                break
            start = at + HEADER.size
            out.append(json.loads(bytes(buf[start:start + size])))
            at = start + size
        del buf[:at]
        return out


class Peer:
    def __init__(self, sock: socket.socket, handlers: Mapping[str, Handler],
                 on_error: Callable[[str, BaseException], None] | None = None) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._handlers = dict(handlers)
        self._async = {name for name, fn in handlers.items() if inspect.iscoroutinefunction(fn)}
        self._on_error = on_error
        self._out: deque[bytes] = deque()    # what the socket did not take at once, in order
        self._out_bytes = 0
        self._writing = False                # the writer task is in a send: frames queue behind it
        self._more = trio.Event()            # the writer has something to send
        self._room = trio.Event()            # the writer sent what was queued
        self._waiting: dict[int, list[Any]] = {}     # id -> [event, reply]
        self._replies: list[bytes] | None = None     # answers of the read being handled
        self._next_id = 0
        self.closed = trio.Event()
        self.calls = 0          # calls made
        self.late = 0           # replies that came after their call gave up

    # --- making calls ----------------------------------------------------------------------------

    async def call(self, name: str, args: Any = None, timeout: float = 5.0) -> Any:
        if self.closed.is_set():
            raise PeerGone(name)
        self._next_id += 1
        ident = self._next_id
        slot: list[Any] = [trio.Event(), None]
        self._waiting[ident] = slot
        self.calls += 1
        try:
            with trio.fail_after(timeout):
                await self._send(encode({"id": ident, "call": name, "args": args}), name)
                await slot[0].wait()
        finally:
            self._waiting.pop(ident, None)
        reply = slot[1]
        if reply is None:
            raise PeerGone(name)
        if "error" in reply:
            raise RemoteError(reply["error"])
        return reply.get("result")

    async def notify(self, name: str, args: Any = None) -> None:
        await self._send(encode({"call": name, "args": args}), name)

    def notify_nowait(self, name: str, args: Any = None) -> bool:
        """For callers that cannot wait: False when the channel is closed or its queue is full."""
        return self._emit(encode({"call": name, "args": args}), direct=False)

    def _over(self, frame: bytes) -> bool:
        """A frame queued after others may not take the queue past its bound (alone, it may)."""
        return self._out_bytes > 0 and self._out_bytes + len(frame) > MAX_QUEUED_BYTES

    async def _send(self, frame: bytes, name: str) -> None:
        while not self._emit(frame, direct=False):     # the queue is full: wait for the writer to empty it
            if self.closed.is_set():
                raise PeerGone(name)
            await self._room.wait()

    def _emit(self, frame: bytes, direct: bool) -> bool:
        """Queue `frame` for the writer task, or with `direct`, send it at once when nothing waits
        before it and the socket takes it whole (else queue its rest). False when closed, or
        when the queue is over MAX_QUEUED_BYTES.

        Frames of request tasks queue: the writer sends what the tasks of one scheduling round
        queued in one system call, and the other side wakes once for all of them. The answers
        to one read's calls go out directly, together, without waking the writer. The supervisor's
        CPU per limited request at 64 connections (bench/workers.py): 43 µs with every frame
        through the writer, 99 with every frame sent directly, 29 so."""
        if self.closed.is_set():
            return False
        if direct and not self._out and not self._writing:
            try:
                sent = self._sock.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close()
                return False
            if sent == len(frame):
                return True
            if sent:                     # a frame begun is finished, whatever the bound
                frame = frame[sent:]
            elif self._over(frame):
                return False
        elif self._over(frame):
            return False
        self._out.append(frame)
        self._out_bytes += len(frame)
        self._more.set()
        return True

    # --- the tasks ------------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until the channel closes; then calls in flight fail with PeerGone."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop)
                task_status.started()
                await self._read_loop(nursery)
                nursery.cancel_scope.cancel()
        finally:
            self._close()
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        frames = Frames()
        while True:
            try:
                data = await self._stream.receive_some(256 * 1024)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                messages = frames.feed(data)
            except (FrameError, ValueError) as exc:
                self._report("a bad frame from the other process", exc)
                return
            self._replies = []
            for msg in messages:
                if "call" not in msg:
                    slot = self._waiting.get(msg.get("id"))
                    if slot is None:
                        self.late += 1
                    else:
                        slot[1] = msg
                        slot[0].set()
                    continue
                name = msg["call"]
                if name not in self._handlers:
                    if msg.get("id") is not None:
                        self._put({"id": msg["id"], "error": f"no such call: {str(name)[:100]}"})
                elif name in self._async:
                    nursery.start_soon(self._answer_async, msg)
                else:
                    self._answer(msg)
            replies, self._replies = self._replies, None
            if replies and not self._emit(b"".join(replies), direct=True) and not self.closed.is_set():
                # the other side stopped reading: it will time the calls out
                self._report("the channel's queue is full, replies were dropped", RuntimeError("queue full"))

    def _answer(self, msg: dict[str, Any]) -> None:
        ident = msg.get("id")
        try:
            reply = {"id": ident, "result": self._handlers[msg["call"]](msg.get("args"))}
        except Exception as exc:
            reply = self._failed(msg, exc)
        if ident is not None:
            self._put(reply)

    async def _answer_async(self, msg: dict[str, Any]) -> None:
        ident = msg.get("id")
        try:
            reply = {"id": ident, "result": await self._handlers[msg["call"]](msg.get("args"))}
        except Exception as exc:
            reply = self._failed(msg, exc)
        if ident is not None:
            self._put(reply)

    def _failed(self, msg: dict[str, Any], exc: Exception) -> dict[str, Any]:
        self._report(f"handling {msg.get('call')!r}", exc)
        return {"id": msg.get("id"), "error": f"{type(exc).__name__}: {exc}"[:500]}

    def _put(self, reply: dict[str, Any]) -> None:
        try:
            frame = encode(reply)
        except FrameError as exc:
            frame = encode({"id": reply.get("id"), "error": str(exc)})
        if self._replies is not None:      # answered within a read: sent with the others after it
            self._replies.append(frame)
            return
        if not self._emit(frame, direct=False) and not self.closed.is_set():
            # the other side stopped reading: it will time the call out
            self._report("the channel's queue is full, a reply was dropped", RuntimeError("queue full"))

    async def _write_loop(self) -> None:
        try:
            while not self.closed.is_set():
                await self._more.wait()
                self._more = trio.Event()
                while self._out:
                    data = b"".join(self._out)
                    self._out.clear()
                    self._out_bytes = 0
                    self._writing = True
                    try:
                        await self._stream.send_all(data)
                    finally:
                        self._writing = False
                    self._room.set()
                    self._room = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return             # the other process went away: `closed` says so (finally)
        finally:
            self._close()

    def _close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self._more.set()
        self._room.set()
        for slot in self._waiting.values():
            slot[0].set()          # reply None: PeerGone

    def _report(self, what: str, exc: BaseException) -> None:
        if self._on_error is not None:
            self._on_error(what, exc)


async def answer_all(calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run `calls` concurrently; each result, or the exception it raised, in order."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int) -> None:
        try:
            results[i] = await calls[i]()
        except Exception as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(one, i)
    return results
