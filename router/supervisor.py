"""Supervised background services: one way to run, watch, restart and stop the router's loops.

Job: run each long-lived background coroutine (a watch feed, a health loop, the store writer,
a sweeper) as a named service. A service that raises is logged with its traceback, counted,
marked down, and restarted after an exponential backoff with jitter; a service that returns is
restarted too unless it was declared `once`. Stopping cancels every service and waits for each,
bounded, naming any that does not stop (`stop(name)` one, `cancel(name)` one without waiting,
for a synchronous caller, `aclose()` all). One-shot background jobs (a registry replay, the
clean-up after a pod left) run here too (`spawn_job`): they are restarted if they raise and
forgotten once they return.

Names: a service is named `kind` or `kind:instance` (`watch:pod-a`, `store_writer:macp`); the
kind, a word fixed in code, is what metrics count by, so their label values stay bounded
whatever the instances are.

Invariants:
- A service is reported `up` only while its coroutine is running; from the instant it raises
  until its next start it is down, with the exception as `last_error`. Nothing a service forgets
  to do in its own error handling can leave it looking alive.
- `down()` lists services that ran and are not running now; a service not yet scheduled is
  starting, and a `once` service or job that finished is done: neither is down (a finished
  one leaves the table).
- Every task belongs to the supervisor that spawned it; `aclose()` leaves none running.
- `asyncio.CancelledError` is never swallowed: cancelling a service stops it for good.
- The supervisor knows no metrics library: crash counting and state changes go through the
  `on_crash` / `on_state` callbacks its owner passes. A callback that raises is logged and
  never stops a service.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger("router.supervisor")

ServiceBody = Callable[[], Awaitable[None]]


@dataclass
class ServiceState:
    """What an operator sees of one service (`/readyz`, `macp-router pods`)."""

    name: str
    up: bool = False
    starts: int = 0
    crashes: int = 0
    last_error: str = ""
    since: float = 0.0  # monotonic time of the last change of `up`
    done: bool = False  # a `once` service that returned: finished, not down

    @property
    def kind(self) -> str:
        """The name up to its first `:` or `#`: the bounded label metrics count by."""
        return service_kind(self.name)


def service_kind(name: str) -> str:
    """`watch:pod-a` -> `watch`; `replay:b#3` -> `replay`; `status` -> `status`."""
    return name.split(":", 1)[0].split("#", 1)[0]


@dataclass(frozen=True)
class Backoff:
    """Restart delays: base * 2**n (n = crashes in a row), capped, times a jitter in [0.5, 1]."""

    base_s: float = 0.1
    max_s: float = 5.0
    stable_s: float = 10.0  # a run at least this long resets the crash streak

    def delay(self, streak: int) -> float:
        raw = min(self.max_s, self.base_s * 2 ** min(streak, 16))
        return raw * random.uniform(0.5, 1.0)


class Supervisor:
    """Owns named background services; see the module docstring."""

    def __init__(
        self,
        *,
        on_crash: Callable[[str, BaseException], None] | None = None,
        on_state: Callable[[ServiceState], None] | None = None,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self._on_crash = on_crash
        self._on_state = on_state
        self._stop_timeout_s = stop_timeout_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._states: dict[str, ServiceState] = {}
        self._closing = False
        self._job_numbers = itertools.count(2)

    @property
    def closing(self) -> bool:
        """True once `aclose()` began: nothing new can start."""
        return self._closing

    def spawn(
        self,
        name: str,
        body: ServiceBody,
        *,
        backoff: Backoff | None = None,
        once: bool = False,
    ) -> ServiceState:
        """Start `body` as service `name` (unique among running services)."""
        if self._closing:
            raise RuntimeError(f"cannot start service {name}: the supervisor is stopping")
        running = self._tasks.get(name)
        if running is not None and not running.done():
            raise ValueError(f"service {name} is already running")
        state = ServiceState(name, since=time.monotonic())
        self._states[name] = state
        self._tasks[name] = asyncio.create_task(
            self._supervise(state, body, backoff or Backoff(), once), name=f"service:{name}"
        )
        return state

    def spawn_job(self, name: str, body: ServiceBody, *,
                  backoff: Backoff | None = None) -> ServiceState:
        """Run a one-shot `body` (restarted if it raises, forgotten once it returns).

        Several jobs may share a name (two replays to one pod): a name in use gets `#n`.
        """
        unique = name
        while unique in self._tasks and not self._tasks[unique].done():
            unique = f"{name}#{next(self._job_numbers)}"
        return self.spawn(unique, body, backoff=backoff, once=True)

    def running(self, name: str) -> bool:
        """True while service `name` exists (up, or down waiting for its restart)."""
        task = self._tasks.get(name)
        return task is not None and not task.done()

    def state(self, name: str) -> ServiceState | None:
        return self._states.get(name)

    def states(self) -> Iterator[ServiceState]:
        return iter(list(self._states.values()))

    def down(self) -> list[ServiceState]:
        """Services that ran and are not running now (crashed and waiting for their restart,
        or stopped by `aclose`); one spawned but not yet scheduled is starting, not down."""
        return [state for state in self._states.values() if not state.up and state.starts]

    def cancel(self, name: str) -> asyncio.Task[None] | None:
        """Cancel one service now and forget its state (for synchronous callers: a pod
        leaving); returns its task so the caller can wait for it, or None if none ran."""
        task = self._tasks.pop(name, None)
        self._states.pop(name, None)
        if task is not None:
            task.cancel()
        return task

    async def stop(self, name: str) -> None:
        """Cancel one service and wait for it (bounded); forget its state."""
        task = self.cancel(name)
        if task is not None:
            await self._cancel({name: task})

    async def aclose(self) -> None:
        """Cancel every service and wait for each, bounded; log the ones that do not stop."""
        self._closing = True
        tasks, self._tasks = self._tasks, {}
        await self._cancel(tasks)

    async def _cancel(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        for task in tasks.values():
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks.values(), timeout=self._stop_timeout_s)
        if pending:
            names = sorted(name for name, task in tasks.items() if task in pending)
            log.error("background services did not stop within %.1fs: %s",
                      self._stop_timeout_s, ", ".join(names))

    def _set_up(self, state: ServiceState, up: bool, error: str = "") -> None:
        state.up = up
        state.since = time.monotonic()
        if error:
            state.last_error = error
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:  # a reporting bug must not take the service down with it
                log.exception("state callback failed for background service %s", state.name)

    def _finish(self, state: ServiceState) -> None:
        """A `once` service returned: it is done; forget it unless a new one took its name."""
        state.done = True
        if self._states.get(state.name) is state:
            del self._states[state.name]
            self._tasks.pop(state.name, None)
        self._set_up(state, False)

    async def _supervise(
        self, state: ServiceState, body: ServiceBody, backoff: Backoff, once: bool
    ) -> None:
        streak = 0
        while True:
            started = time.monotonic()
            state.starts += 1
            self._set_up(state, True)
            try:
                await body()
            except asyncio.CancelledError:
                self._set_up(state, False)
                raise
            except Exception as exc:  # any exception: reporting it is the whole job
                state.crashes += 1
                streak = 0 if time.monotonic() - started >= backoff.stable_s else streak + 1
                error = f"{type(exc).__name__}: {exc}"
                self._set_up(state, False, error)
                log.error("background service %s crashed (%s); restarting", state.name, error,
                          exc_info=exc)
                if self._on_crash is not None:
                    try:
                        self._on_crash(state.name, exc)
                    except Exception:
                        log.exception("crash callback failed for background service %s",
                                      state.name)
            else:
                if once:
                    self._finish(state)
                    return
                self._set_up(state, False)
                streak = 0 if time.monotonic() - started >= backoff.stable_s else streak + 1
                log.info("background service %s ended; restarting", state.name)
            await asyncio.sleep(backoff.delay(streak))
