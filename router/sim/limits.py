"""Per-connection request limits of the simulated pod (tonic's concurrency_limit_per_connection).

Job: at most `limit` requests in flight per client connection (grpc-python's peer address);
more wait in a queue (back-pressure, never a rejection), as tower's `ConcurrencyLimit` does.
The 128-streams-per-connection cap is not here: it is grpc-python's HTTP/2 setting.

Invariants:
- A connection's entry exists only while one of its requests holds or waits for a slot.
- `max_in_flight` is the most requests ever seen in flight on one connection; `queued_calls`
  counts requests that had to wait. Both are instrumentation for tests, never reset by a
  restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc


class _ConnSlots:
    """The in-flight requests of one client connection."""

    __slots__ = ("active", "sem", "users")

    def __init__(self, limit: int) -> None:
        self.sem = asyncio.Semaphore(limit)
        self.users = 0
        self.active = 0


class ConnectionLimits:
    """The in-flight slots of every client connection of one pod."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.max_in_flight = 0
        self.queued_calls = 0
        self._conns: dict[str, _ConnSlots] = {}

    @contextlib.asynccontextmanager
    async def slot(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Hold one of the connection's in-flight slots; wait (queue) when all are taken."""
        peer = context.peer()
        slots = self._conns.get(peer)
        if slots is None:
            slots = self._conns[peer] = _ConnSlots(self.limit)
        slots.users += 1
        try:
            if slots.sem.locked():
                self.queued_calls += 1
            async with slots.sem:
                slots.active += 1
                if slots.active > self.max_in_flight:
                    self.max_in_flight = slots.active
                try:
                    yield
                finally:
                    slots.active -= 1
        finally:
            slots.users -= 1
            if slots.users == 0:
                self._conns.pop(peer, None)

    def clear(self) -> None:
        self._conns.clear()
