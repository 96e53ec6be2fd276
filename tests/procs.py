"""Real `macp-router` processes for end-to-end and fault tests, bounded in time.

`RouterProcess` runs `python -m router.cli serve ...` (or `pod ...`), waits for its "ready" log
line, and always ends it (SIGTERM, then SIGKILL) on exit. Output goes to a file so a failing
test can show it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from loadtest.ports import free_port

__all__ = ["Process", "free_port", "router_process"]


class Process:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 20.0, ready_mark: str = "ready") -> Process:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
        )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if ready_mark in self.output():
                return self
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"{self.args[0]} exited {code}:\n{self.output()}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.args[0]} not ready within {ready_timeout}s:\n{self.output()}")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


def router_process(
    tmp_path: Path, pods: str, *extra: str, port: int | None = None, name: str = "router"
) -> tuple[Process, str]:
    """A `serve` subprocess (not started) and its address."""
    port = port or free_port()
    args = ["serve", "--listen", f"127.0.0.1:{port}", "--pods", pods, "--token", "router",
            "--log-level", "info", *extra]
    return Process(args, tmp_path / f"{name}.log"), f"127.0.0.1:{port}"
