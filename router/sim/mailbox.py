"""A subscriber's mailbox: the bounded queue between the pod's events and one streaming handler.

Invariants: `push` never blocks or awaits; a mailbox holds at most its `limit` items, past that
it is lagged and its reader gets `Lagged` (the runtime drops a slow consumer); a closed mailbox
yields what it already holds, then ends.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

from router.sim.protocol import WATCH_QUEUE_LIMIT


class Subscriber:
    """A subscriber's mailbox: bounded, drained by one streaming handler.

    `push` never blocks; past `limit` pending items the subscriber is marked lagged and its
    stream ends with RESOURCE_EXHAUSTED (what the runtime does to a slow consumer).
    """

    __slots__ = ("closed", "event", "items", "lagged", "limit")

    def __init__(self, limit: int = WATCH_QUEUE_LIMIT) -> None:
        self.items: collections.deque[Any] = collections.deque()
        self.event = asyncio.Event()
        self.closed = False
        self.lagged = False
        self.limit = limit

    def push(self, item: Any) -> None:
        if self.closed or self.lagged:
            return
        if len(self.items) >= self.limit:
            self.lagged = True
        else:
            self.items.append(item)
        self.event.set()

    def close(self, *, discard: bool = False) -> None:
        if discard:
            self.items.clear()
        self.closed = True
        self.event.set()

    async def items_until_closed(self) -> AsyncIterator[Any]:
        """Yield pushed items in order; return once closed and drained; raise if lagged."""
        while True:
            while self.items:
                yield self.items.popleft()
            if self.lagged:
                raise Lagged
            if self.closed:
                return
            self.event.clear()
            await self.event.wait()


class Lagged(Exception):
    """Raised to the draining handler when its subscriber fell behind (`limit` exceeded)."""


# Pushed into a StreamSession mailbox: end the stream OK after what is already queued.
END = object()
