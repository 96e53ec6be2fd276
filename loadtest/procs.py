"""Subprocesses of a load-test run: pods, the passthrough proxy, the router, Valkey.

Every process listens on a free loopback port, is considered up when it prints a line
containing `ready` (within a timeout), has its output drained into a log file (a full pipe
would stall it), and is killed by `ProcSet.aclose()`, which callers run in a `finally`.
CPU time and RSS are read with psutil over the process and its children (router workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

LOOPBACK = "127.0.0.1"


def check_loopback(address: str) -> str:
    """`address` if its host is a loopback address; load tests never leave the machine."""
    host = address.rpartition(":")[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        raise ValueError(f"{address}: load tests only target loopback addresses")
    return address


@dataclass
class Proc:
    """One started subprocess: name, argv, pid, the address it serves, its log file."""

    name: str
    argv: list[str]
    address: str
    log_path: Path
    process: asyncio.subprocess.Process
    extra: dict[str, str] = field(default_factory=dict)
    _drain: asyncio.Task[None] | None = None
    _tail: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the process and its live children."""
        total = 0.0
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss_bytes(self) -> int:
        """Resident set size of the process and its live children."""
        total = 0
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def tail(self) -> str:
        return "\n".join(self._tail[-20:])

    async def stop(self, timeout: float = 5.0, sig: int = signal.SIGTERM) -> None:
        """Signal (SIGTERM by default), wait up to `timeout`, then SIGKILL the process group."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                await asyncio.wait_for(self.process.wait(), 5.0)
        # children (router workers) that outlived the parent
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain

    async def kill(self) -> None:
        """SIGKILL now (a crash, not a shutdown)."""
        await self.stop(timeout=5.0, sig=signal.SIGKILL)


async def spawn(
    name: str,
    argv: Sequence[str],
    address: str,
    log_dir: Path,
    *,
    ready: str = "ready",
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> Proc:
    """Start `argv` in its own process group; return once it printed `ready` (else raise)."""
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=full_env,
        start_new_session=True,
    )
    proc = Proc(name=name, argv=list(argv), address=address, log_path=log_path, process=process)
    seen_ready = asyncio.Event()

    async def drain() -> None:
        assert process.stdout is not None
        with log_path.open("a", encoding="utf-8") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(argv)}\n")
            while True:
                line = await process.stdout.readline()
                if not line:
                    break
                text = line.decode("utf-8", "replace").rstrip()
                log.write(text + "\n")
                proc._tail.append(text)
                del proc._tail[:-50]
                if ready in text:
                    seen_ready.set()

    proc._drain = asyncio.create_task(drain())
    waiter = asyncio.create_task(seen_ready.wait())
    exited = asyncio.create_task(process.wait())
    try:
        await asyncio.wait({waiter, exited}, timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        exited.cancel()
    if not seen_ready.is_set():
        await proc.stop(timeout=2.0)
        why = "exited" if process.returncode is not None else f"not ready after {timeout:.0f}s"
        raise RuntimeError(f"{name} {why}: {' '.join(argv)}\n{proc.tail()}")
    return proc


def python_argv(module: str, *args: str) -> list[str]:
    """`python -m module args...` with this interpreter (same venv)."""
    return [sys.executable, "-m", module, *args]


class ProcSet:
    """The processes of one run; `aclose()` stops all of them (call it in `finally`)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []

    async def start(self, name: str, argv: Sequence[str], address: str, **kw: object) -> Proc:
        proc = await spawn(name, argv, address, self.log_dir, **kw)  # type: ignore[arg-type]
        self.procs.append(proc)
        return proc

    async def stop(self, proc: Proc) -> None:
        await proc.stop()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    async def aclose(self) -> None:
        procs, self.procs = self.procs, []
        await asyncio.gather(*(p.stop() for p in reversed(procs)), return_exceptions=True)
