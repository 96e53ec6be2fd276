"""The locator's in-process caches: `NearCache` (sid -> pod) and `NegativeCache` (on no pod).

Both are plain process memory read on the hot path without I/O, and both are bounded: the
near-cache by `--cache-max-sessions` (ended sessions evicted first, then the oldest live ones),
the negative cache by `--negative-cache-max-sessions` and a short TTL.

Invariants:
- A near-cache entry maps a sid to exactly one pod; per-(pod, state) counts stay exact.
- Every queue kept beside the dicts (age, ended, expiry heap) is rebuilt once it holds twice
  the entries (+1024): memory stays O(bound), an insert O(1) amortized.
- A negative entry answers "on no pod" only until its TTL; entries leave oldest first, by the
  bound or the sweeper, however few there are.
"""

from __future__ import annotations

import collections
import heapq
import time
from collections.abc import Iterable, Iterator, Mapping

from router.store import OPEN, RESERVED, TERMINAL_STATES


class NearCache:
    """sid -> pod in process memory, holding at most `max_entries` sessions.

    An open session costs one dict slot whose value is the (shared) pod-name string, plus one
    slot in the age queue. Any other state is a small tuple `(pod, state, expires_at)`
    (expires_at 0.0 = never). Per-(pod, state) counts are kept exact for placement and metrics.
    Expiries wait in a heap, not a FIFO: TTLs differ (a reservation's is ten times a
    retention), and a long one queued first must not hold back the shorter ones behind it.

    The bound: inserting a new sid into a full cache evicts one entry first, an ended (terminal)
    session if there is one (the oldest ended first), else the oldest cached live one. An
    evicted live session is not lost: the next call on it misses and finds it through the
    store or a probe. Every queue (age, terminal, expiry heap) holds plain references with
    lazy deletion and is rebuilt from the dict once it holds twice the entries (+1024), so
    each stays O(`max_entries`) and every insert costs O(1) amortized (O(log n) for a TTL).
    `evictions` counts removals by reason: "expired" (retention or reservation TTL), and, to
    make room, "terminal" and "live".
    """

    __slots__ = ("_counts", "_entries", "_expiry_queue", "_open_counts", "_order",
                 "_terminal_order", "evictions", "max_entries")

    def __init__(self, max_entries: int = 0) -> None:
        self.max_entries = max_entries
        """The most sessions held at once; 0 = unbounded (tests and benchmarks only)."""
        self._entries: dict[str, str | tuple[str, str, float]] = {}
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._open_counts: collections.Counter[str] = collections.Counter()
        self._expiry_queue: list[tuple[float, str]] = []  # a heap on expires_at
        self._order: collections.deque[str] = collections.deque()  # sids, first cached first
        self._terminal_order: collections.deque[str] = collections.deque()  # ended, oldest first
        self.evictions: dict[str, int] = {"expired": 0, "terminal": 0, "live": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, sid: str) -> str | None:
        value = self._entries.get(sid)
        if value is None or value.__class__ is str:
            return value  # type: ignore[return-value]
        pod, _state, expires_at = value  # type: ignore[misc]
        if expires_at and expires_at <= time.monotonic():
            self._remove(sid)
            self.evictions["expired"] += 1
            return None
        return pod

    def entry(self, sid: str) -> tuple[str, str] | None:
        """(pod, state) of a cached session, or None."""
        pod = self.get(sid)
        if pod is None:
            return None
        value = self._entries[sid]
        return (pod, OPEN) if value.__class__ is str else (pod, value[1])  # type: ignore[index]

    def set(self, sid: str, pod: str, state: str, ttl_s: float = 0.0) -> None:
        entries = self._entries
        if sid in entries:
            self._remove(sid)
        else:
            if self.max_entries and len(entries) >= self.max_entries:
                self._evict_one()
            self._order.append(sid)
            if len(self._order) > 2 * len(entries) + 1024:
                self._order = collections.deque(entries)
                self._order.append(sid)
        if state == OPEN:
            entries[sid] = pod
        else:
            expires_at = time.monotonic() + ttl_s if ttl_s else 0.0
            entries[sid] = (pod, state, expires_at)
            if expires_at:
                queue = self._expiry_queue
                heapq.heappush(queue, (expires_at, sid))
                if len(queue) > 2 * len(entries) + 1024:
                    self._rebuild_expiry_queue()
            if state in TERMINAL_STATES:
                self._terminal_order.append(sid)
                if len(self._terminal_order) > 2 * len(entries) + 1024:
                    self._terminal_order = collections.deque(
                        s for s, v in entries.items()
                        if v.__class__ is tuple and v[1] in TERMINAL_STATES)  # type: ignore[index]
        self._counts[(pod, state)] += 1
        if state == OPEN or state == RESERVED:
            self._open_counts[pod] += 1

    def _evict_one(self) -> None:
        """Make room for one entry: the oldest ended session, else the oldest live one."""
        entries = self._entries
        terminal = self._terminal_order
        while terminal:
            sid = terminal.popleft()
            value = entries.get(sid)
            if value is not None and value.__class__ is tuple and value[1] in TERMINAL_STATES:  # type: ignore[index]
                self._remove(sid)
                self.evictions["terminal"] += 1
                return
        order = self._order
        while order:
            sid = order.popleft()
            if sid in entries:
                self._remove(sid)
                self.evictions["live"] += 1
                return

    def _rebuild_expiry_queue(self) -> None:
        """Drop the heap's stale items (entries renewed, moved or removed since queued)."""
        self._expiry_queue = [
            (value[2], sid) for sid, value in self._entries.items()  # type: ignore[misc]
            if value.__class__ is tuple and value[2]  # type: ignore[index]
        ]
        heapq.heapify(self._expiry_queue)

    def discard(self, sid: str, pod: str) -> bool:
        """Remove the entry only while it still names `pod`."""
        value = self._entries.get(sid)
        if value is None:
            return False
        owner = value if value.__class__ is str else value[0]  # type: ignore[index]
        if owner != pod:
            return False
        self._remove(sid)
        return True

    def _remove(self, sid: str) -> None:
        value = self._entries.pop(sid)
        if value.__class__ is str:
            pod, state = value, OPEN
        else:
            pod, state, _ = value  # type: ignore[misc]
        key = (pod, state)  # type: ignore[assignment]
        self._counts[key] -= 1  # type: ignore[index]
        if self._counts[key] <= 0:  # type: ignore[index]
            del self._counts[key]  # type: ignore[arg-type]
        if state == OPEN or state == RESERVED:
            self._open_counts[pod] -= 1  # type: ignore[index]
            if self._open_counts[pod] <= 0:  # type: ignore[index]
                del self._open_counts[pod]  # type: ignore[arg-type]

    def sweep(self, now: float | None = None, limit: int = 10_000) -> int:
        """Drop expired entries (oldest first, at most `limit`); returns how many."""
        now = time.monotonic() if now is None else now
        dropped = 0
        queue = self._expiry_queue
        entries = self._entries
        while queue and queue[0][0] <= now and dropped < limit:
            expires_at, sid = heapq.heappop(queue)
            value = entries.get(sid)
            if value is not None and value.__class__ is tuple and value[2] == expires_at:  # type: ignore[index]
                self._remove(sid)
                dropped += 1
        self.evictions["expired"] += dropped
        # Ended sessions expire in the order they ended (one retention for all): what they
        # left at the head of the terminal queue goes now, so it stays as long as they are.
        terminal = self._terminal_order
        while terminal:
            value = entries.get(terminal[0])
            if value is not None and value.__class__ is tuple and value[1] in TERMINAL_STATES:  # type: ignore[index]
                break
            terminal.popleft()
        # Likewise the age queue: the oldest sessions are the ones that expire first, and a
        # reference left behind would keep a session-id string alive until the next rebuild.
        order = self._order
        while order and order[0] not in entries:
            order.popleft()
        return dropped

    def sessions_of(self, pod: str) -> list[tuple[str, str]]:
        """(sid, state) of every entry on `pod`. O(cache size): reconcile only."""
        result = []
        for sid, value in self._entries.items():
            if value.__class__ is str:
                if value == pod:
                    result.append((sid, OPEN))
            elif value[0] == pod:  # type: ignore[index]
                result.append((sid, value[1]))  # type: ignore[index]
        return result

    def items(self) -> Iterable[tuple[str, str, str]]:
        for sid, value in list(self._entries.items()):
            if value.__class__ is str:
                yield sid, value, OPEN  # type: ignore[misc]
            else:
                yield sid, value[0], value[1]  # type: ignore[misc, index]

    def counts(self) -> Mapping[tuple[str, str], int]:
        return self._counts

    def open_counts(self) -> Mapping[str, int]:
        return self._open_counts


class NegativeCache:
    """sid -> when "on no pod" expires, in expiry order (one TTL for all): at most
    `max_entries` ids, the oldest dropped first; `sweep` drops the expired ones."""

    __slots__ = ("_expires", "max_entries", "ttl_s")

    def __init__(self, ttl_s: float = 1.0, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._expires: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._expires)

    def __iter__(self) -> Iterator[str]:
        return iter(self._expires)

    def hit(self, sid: str) -> bool:
        """True while `sid` is known to be on no pod; an expired entry is dropped."""
        expires_at = self._expires.get(sid)
        if expires_at is None:
            return False
        if expires_at > time.monotonic():
            return True
        del self._expires[sid]
        return False

    def remember(self, sid: str) -> None:
        """Every pod answered not_found for `sid` (no-op when the cache is off)."""
        if self.ttl_s <= 0 or self.max_entries <= 0:
            return
        expires = self._expires
        expires[sid] = time.monotonic() + self.ttl_s
        expires.move_to_end(sid)
        if len(expires) > self.max_entries:
            expires.popitem(last=False)

    def forget(self, sid: str) -> None:
        """`sid` exists now (created, placed)."""
        self._expires.pop(sid, None)

    def sweep(self, now: float | None = None) -> int:
        """Drop the expired entries (oldest first); returns how many."""
        now = time.monotonic() if now is None else now
        expires = self._expires
        dropped = 0
        while expires:
            sid, expires_at = next(iter(expires.items()))
            if expires_at > now:
                break
            del expires[sid]
            dropped += 1
        return dropped
