"""Ordered start and stop of the router's parts: a list of named stages.

Job: start each stage in the order given, and stop the stages that were started (or were
starting) in the reverse order, so a part is always stopped before the parts it depends on
(the servers before the feeds, the feeds before the pods, the locator before the store).

Invariants:
- `start()` runs the stages' `start` one after another. If one raises, every stage that was
  started, and the one that failed (it may have half-started), is stopped in reverse order,
  and the error is raised.
- `stop()` never raises and always ends: each stage's stop is bounded by its own timeout; a
  stop that does not finish in time is named in the log and abandoned, a stop that raises is
  logged with its traceback, and the next stage is stopped either way.
- Stop runs once per start: a second `stop()` (or one before any `start()`) does nothing.
- The lifecycle does no I/O itself: a stage is two coroutine functions and a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("macp_router.lifecycle")

Step = Callable[[], Awaitable[object]]


async def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Stage:
    """One part of the router: how to start it, how to stop it, how long a stop may take."""

    name: str
    start: Step = _nothing
    stop: Step = _nothing
    stop_timeout_s: float | Callable[[], float] = 5.0
    """Seconds, or a function read at stop time (a stop bounded by the shutdown grace)."""

    def timeout(self) -> float:
        value = self.stop_timeout_s
        return float(value() if callable(value) else value)


class Lifecycle:
    """Starts `stages` in order and stops the started ones in reverse; see the module doc."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        names = [stage.name for stage in stages]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"lifecycle stage names must be unique: {', '.join(duplicates)}")
        self.stages = tuple(stages)
        self._entered: list[Stage] = []

    @property
    def started(self) -> list[str]:
        """Names of the stages started (or starting), in start order."""
        return [stage.name for stage in self._entered]

    async def start(self) -> None:
        if self._entered:
            raise RuntimeError(f"lifecycle already started ({', '.join(self.started)})")
        for stage in self.stages:
            self._entered.append(stage)
            began = time.monotonic()
            try:
                await stage.start()
            except BaseException as exc:
                log.info("start-up: stage %s failed (%s: %s); stopping what was started",
                         stage.name, type(exc).__name__, exc)
                await self.stop()
                raise
            log.debug("start-up: stage %s started in %.3fs", stage.name,
                      time.monotonic() - began)

    async def stop(self) -> None:
        entered, self._entered = self._entered, []
        for stage in reversed(entered):
            await self._stop_one(stage)

    @staticmethod
    async def _stop_one(stage: Stage) -> None:
        timeout = stage.timeout()
        began = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await stage.stop()
        except TimeoutError:
            log.warning("shutdown: %s did not stop within %.1fs; going on without it",
                        stage.name, timeout)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("shutdown: stopping %s failed; going on with the next stage",
                          stage.name)
        else:
            log.debug("shutdown: stage %s stopped in %.3fs", stage.name,
                      time.monotonic() - began)
