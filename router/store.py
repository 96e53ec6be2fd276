"""Where sessions live, remembered: the `LocationStore` protocol and the in-memory store.

A store maps a session id to the pod that holds it (a `Location`). It is shared by router
replicas (Redis, `router.redis_store`) or private to one process (`MemoryStore`, the embedded
default). The store is a cache of the pods' truth, never the truth itself: everything in it can
be rebuilt from the pods' WatchSessions feeds.

Invariants every implementation keeps (checked by one conformance suite for all stores):
- A session id maps to at most one pod.
- `reserve(sid, pod)` is an atomic insert-if-absent: it never overwrites an existing entry and
  returns the owner that won (the caller's pod, or the one already recorded).
- `delete(sid, pod)` and `drop_pod_sessions(pod, keep)` remove an entry only while its owner is
  still `pod` (compare-and-delete), so a late invalidation never erases someone else's entry.
- `release(sid, pod, token)` is one compare-and-set: it removes the entry only while it is still
  the reservation `reserve(sid, pod, token)` wrote (state `reserved`, that pod, that token), so a
  feed's OPEN written in between, or another router's reservation of the same sid on the same
  pod, survives. The token is the reserving router's (kept in the entry's `incarnation`).
- `put` is the authoritative write of a pod's own feed: it overwrites, and keeps the per-pod index
  consistent when the owner changes.
- Drain flags are shared: a pod drained through one router is drained for every router that
  shares the store.
- Terminal entries (`resolved`, `expired`, `cancelled`) expire after the retention window;
  reservations expire after `reservation_ttl_s` unless a feed confirms them. An expired entry
  is gone whether or not it is ever read again (Redis: key TTLs; `MemoryStore`: its sweeper), so
  a store holds the open sessions plus those that ended within the retention, under any churn.
- A failing backend raises `StoreUnavailable` (never a library exception) and sets `degraded`;
  callers keep routing without the store and the store reports recovery through `on_recovered`.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from router.supervisor import Supervisor

RESERVED = "reserved"
OPEN = "open"
SUSPENDED = "suspended"
RESOLVED = "resolved"
EXPIRED = "expired"
CANCELLED = "cancelled"

STATES = frozenset({RESERVED, OPEN, SUSPENDED, RESOLVED, EXPIRED, CANCELLED})
TERMINAL_STATES = frozenset({RESOLVED, EXPIRED, CANCELLED})


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Location:
    """One session's home: the pod that holds it and what the router last learned about it."""

    pod: str
    state: str = OPEN
    incarnation: str = ""
    """Which life of the pod reported it (the feed's connection id); "" when unknown. For a
    `reserved` entry: the reserving router's token (`reserve`), which `release` compares."""
    updated_at_ms: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True, slots=True)
class BroadcastRecord:
    """A registry call (RegisterPolicy, RegisterExtMode, ...) to replay on pods that join."""

    key: str
    method: str
    request: bytes


class StoreUnavailable(Exception):
    """The store's backend did not answer; the caller should route without it."""


@runtime_checkable
class LocationStore(Protocol):
    name: str

    @property
    def degraded(self) -> bool: ...

    on_recovered: Callable[[], Awaitable[None]] | None

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...

    async def get(self, sid: str) -> Location | None: ...
    async def put(self, sid: str, location: Location) -> None: ...
    async def put_many(self, items: Iterable[tuple[str, Location]]) -> None: ...
    async def reserve(self, sid: str, pod: str, token: str = "") -> str: ...
    async def release(self, sid: str, pod: str, token: str = "") -> bool: ...
    async def delete(self, sid: str, pod: str) -> bool: ...
    async def pod_sessions(self, pod: str) -> set[str]: ...
    async def drop_pod_sessions(self, pod: str, keep: set[str]) -> int: ...

    async def record_broadcast(self, record: BroadcastRecord) -> None: ...
    async def forget_broadcast(self, key: str) -> None: ...
    async def broadcasts(self) -> list[BroadcastRecord]: ...

    async def set_draining(self, pod: str, draining: bool) -> None: ...
    async def draining_pods(self) -> set[str]: ...


SWEEP_PER_WRITE = 2
"""Expired entries a `MemoryStore` write removes besides its own: more than the one entry a
write can add, so a store that is written is swept at least as fast as it fills."""


class MemoryStore:
    """The embedded default: one process, no I/O, never degraded.

    Entries that expire (ended sessions after the retention, reservations after their TTL)
    wait in a heap on their deadline and leave the store, whichever comes first: when read
    past it, on a write (each removes up to `SWEEP_PER_WRITE` expired entries), or when the
    sweeper runs (`sweep`, every `sweep_interval_s` as the service `service` of the supervisor
    given, e.g. `store_sweeper:macp`). The heap keeps stale items of entries renewed or removed
    since (lazy deletion) and is rebuilt once it holds twice the expiring entries (+1024), so
    memory stays proportional to the entries and each write costs O(log n) amortized.

    With `max_entries` (the router passes `--cache-max-sessions`), a write of a new sid into a
    full store first removes the entry that expires soonest (an ended session or an old
    reservation), else the oldest open one: the store is a cache of the pods' truth, and a
    session it forgot is found again by a probe. Open sessions never expire on their own (an
    ACP session nobody closes stays open on its pod), so without the bound they would only
    leave with their pod.
    """

    name = "memory"

    def __init__(self, *, retention_s: float = 600.0, reservation_ttl_s: float = 300.0,
                 supervisor: Supervisor | None = None, service: str = "store_sweeper:memory",
                 sweep_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, max_entries: int = 0) -> None:
        self.max_entries = max_entries
        """The most entries held at once; 0 = unbounded."""
        self.evicted = 0
        """Entries removed to stay within `max_entries`."""
        self._order: collections.deque[str] = collections.deque()  # sids, first stored first
        self._entries: dict[str, Location] = {}
        self._expires: dict[str, float] = {}
        self._deadlines: list[tuple[float, str]] = []  # a heap on the deadline
        self._supervisor = supervisor
        self.service = service
        """The sweeper's name in the supervisor (with none given, writes and reads sweep)."""
        self._sweep_interval_s = sweep_interval_s
        self._clock = clock
        """Where deadlines are read from (tests drive their own)."""
        self.expired = 0
        """Entries removed because their deadline passed (read, write or sweeper)."""
        self._by_pod: dict[str, set[str]] = {}
        self._broadcasts: dict[str, BroadcastRecord] = {}
        self._draining: set[str] = set()
        self._retention_s = retention_s
        self._reservation_ttl_s = reservation_ttl_s
        self.on_recovered: Callable[[], Awaitable[None]] | None = None

    @property
    def degraded(self) -> bool:
        return False

    def __len__(self) -> int:
        """Entries held, the expired ones not swept yet included (`macp_router_store_entries`)."""
        return len(self._entries)

    async def start(self) -> None:
        if self._supervisor is not None and not self._supervisor.running(self.service):
            self._supervisor.spawn(self.service, self._sweep_loop)

    async def aclose(self) -> None:
        if self._supervisor is not None:
            await self._supervisor.stop(self.service)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            self.sweep()

    def sweep(self, now: float | None = None, limit: int = 100_000) -> int:
        """Remove entries past their deadline (earliest first, at most `limit`); how many."""
        now = self._clock() if now is None else now
        heap = self._deadlines
        removed = 0
        while heap and heap[0][0] <= now and removed < limit:
            deadline, sid = heapq.heappop(heap)
            if self._expires.get(sid) == deadline:
                self._remove(sid, self._entries[sid].pod)
                removed += 1
        self.expired += removed
        order = self._order  # references of entries gone keep their id strings alive
        while order and order[0] not in self._entries:
            order.popleft()
        return removed

    def _live(self, sid: str) -> Location | None:
        location = self._entries.get(sid)
        if location is None:
            return None
        deadline = self._expires.get(sid)
        if deadline is not None and deadline <= self._clock():
            self._remove(sid, location.pod)
            self.expired += 1
            return None
        return location

    def _remove(self, sid: str, pod: str) -> None:
        del self._entries[sid]
        self._expires.pop(sid, None)
        members = self._by_pod.get(pod)
        if members is not None:
            members.discard(sid)
            if not members:
                del self._by_pod[pod]

    def _set(self, sid: str, location: Location, ttl_s: float | None) -> None:
        previous = self._entries.get(sid)
        if previous is None and self.max_entries:
            if len(self._entries) >= self.max_entries:
                self._evict_one()
            self._order.append(sid)
            if len(self._order) > 2 * len(self._entries) + 1024:
                self._order = collections.deque(self._entries)
                self._order.append(sid)
        if previous is not None and previous.pod != location.pod:
            self._remove(sid, previous.pod)
        self._entries[sid] = location
        self._by_pod.setdefault(location.pod, set()).add(sid)
        now = self._clock()
        if ttl_s is None:
            self._expires.pop(sid, None)
        else:
            deadline = self._expires[sid] = now + ttl_s
            heapq.heappush(self._deadlines, (deadline, sid))
            if len(self._deadlines) > 2 * len(self._expires) + 1024:
                self._deadlines = [(d, s) for s, d in self._expires.items()]
                heapq.heapify(self._deadlines)
        self.sweep(now, SWEEP_PER_WRITE)

    def _evict_one(self) -> None:
        """Make room for one entry: the one that expires soonest, else the oldest open one."""
        heap = self._deadlines
        while heap:
            deadline, sid = heapq.heappop(heap)
            if self._expires.get(sid) == deadline:
                self._remove(sid, self._entries[sid].pod)
                self.evicted += 1
                return
        order = self._order
        while order:
            sid = order.popleft()
            location = self._entries.get(sid)
            if location is not None:
                self._remove(sid, location.pod)
                self.evicted += 1
                return

    def _ttl_for(self, location: Location) -> float | None:
        if location.terminal:
            return self._retention_s
        if location.state == RESERVED:
            return self._reservation_ttl_s
        return None

    async def get(self, sid: str) -> Location | None:
        return self._live(sid)

    async def put(self, sid: str, location: Location) -> None:
        self._set(sid, location, self._ttl_for(location))

    async def put_many(self, items: Iterable[tuple[str, Location]]) -> None:
        for sid, location in items:
            self._set(sid, location, self._ttl_for(location))

    async def reserve(self, sid: str, pod: str, token: str = "") -> str:
        current = self._live(sid)
        if current is not None:
            return current.pod
        self._set(sid, Location(pod, RESERVED, token, now_ms()), self._reservation_ttl_s)
        return pod

    async def release(self, sid: str, pod: str, token: str = "") -> bool:
        current = self._live(sid)
        if current is None or (current.pod, current.state, current.incarnation) != (
            pod, RESERVED, token
        ):
            return False
        self._remove(sid, pod)
        return True

    async def delete(self, sid: str, pod: str) -> bool:
        current = self._live(sid)
        if current is None or current.pod != pod:
            return False
        self._remove(sid, pod)
        return True

    async def pod_sessions(self, pod: str) -> set[str]:
        return {sid for sid in list(self._by_pod.get(pod, ())) if self._live(sid) is not None}

    async def drop_pod_sessions(self, pod: str, keep: set[str]) -> int:
        dropped = 0
        for sid in list(self._by_pod.get(pod, ())):
            # _live drops an already-expired entry itself: it was not dropped here, so not counted.
            if sid not in keep and self._live(sid) is not None:
                self._remove(sid, pod)
                dropped += 1
        return dropped

    async def record_broadcast(self, record: BroadcastRecord) -> None:
        self._broadcasts.pop(record.key, None)
        self._broadcasts[record.key] = record

    async def forget_broadcast(self, key: str) -> None:
        self._broadcasts.pop(key, None)

    async def broadcasts(self) -> list[BroadcastRecord]:
        return list(self._broadcasts.values())

    async def set_draining(self, pod: str, draining: bool) -> None:
        if draining:
            self._draining.add(pod)
        else:
            self._draining.discard(pod)

    async def draining_pods(self) -> set[str]:
        return set(self._draining)
