"""Run `python -m hxgwd` as a real process and read its JSON log lines, for lifecycle tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import trio


class DaemonProcess:
    def __init__(self, config_path: str, env: dict[str, str] | None = None, program: str = sys.executable) -> None:
        self.config_path = config_path
        self.program = program
        self.env = {**os.environ, **(env or {})}
        self.proc: trio.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self._buffer = b""
        self.address: str | None = None

    async def start(self, nursery: trio.Nursery, *, wait_listening: bool = True) -> None:
        self.proc = await trio.lowlevel.open_process(
            [self.program, "-m", "hxgwd", "-c", self.config_path], stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL, env=self.env)
        nursery.start_soon(self._read)
        if wait_listening:
            line = await self.wait_for("listening")
            self.address = line["addresses"][0]

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while True:
            data = await self.proc.stderr.receive_some(65536)
            if not data:
                return
            self._buffer += data
            *complete, self._buffer = self._buffer.split(b"\n")
            for raw in complete:
                try:
                    self.lines.append(json.loads(raw))
                except ValueError:
                    self.lines.append({"msg": "raw", "text": raw.decode(errors="replace")})

    async def wait_for(self, msg: str, after: int = 0, timeout: float = 15) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                for line in self.lines[after:]:
                    if line.get("msg") == msg:
                        return line
                if self.proc is not None and self.proc.returncode is not None and msg != "stopped":
                    raise AssertionError(f"daemon exited ({self.proc.returncode}) before {msg!r}: {self.lines}")
                await trio.sleep(0.02)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        with trio.fail_after(timeout):
            return await self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
