"""Who owns a session: what the pods' feeds teach the locator, and sessions on two pods.

`SessionOwnership` is the part of `router.locator.Locator` that learns ownership from the pods
themselves: a feed event (`observe`), a reconnect's listing (`reconcile`), a pod that left
(`forget_pod`), and the handling of a session more than one pod reports (two runtimes wrongly
sharing storage, a split brain): counted, logged, kept in `also_on`, both pods probed, and
moved only on evidence from the owner (`owner_lost`).

Invariants:
- A live (open, suspended) entry never moves because another pod reports the same sid; only
  the owner's own not_found answer, or its reconcile no longer listing it, moves it.
- A feed event that repeats the cached (pod, state) writes nothing (every reconnect's
  snapshot repeats every session).
- Reservations younger than the reservation grace survive a reconcile (the pod may not have
  created them yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Mapping, Sequence

from router.core.status import LIVE, NOT_FOUND, LocateStatus
from router.metrics import Metrics
from router.near_cache import NearCache, NegativeCache
from router.store import (
    OPEN,
    RESERVED,
    TERMINAL_STATES,
    Location,
    LocationStore,
    StoreUnavailable,
    now_ms,
)

log = logging.getLogger("macp_router.locator")


class SessionOwnership:
    """Ownership learned from the pods (see the module docstring); mixed into `Locator`."""

    near: NearCache
    store: LocationStore
    metrics: Metrics
    protocol: str
    retention_s: float
    reservation_grace_s: float
    also_on: dict[str, dict[str, str]]
    negative: NegativeCache
    _recent_placements: dict[str, float]

    def _enqueue_write(self, sid: str, location: Location) -> None:
        raise NotImplementedError  # Locator's write-behind

    async def _probe_one(self, pod: str, sid: str) -> LocateStatus:
        raise NotImplementedError  # Locator's probe

    def _spawn(self, coro: Awaitable[object], name: str) -> None:
        raise NotImplementedError  # Locator's owned tasks

    async def _watch_for_duplicates(
        self,
        sid: str,
        winner: str,
        pending: set[asyncio.Future[str]],
        names: Mapping[asyncio.Future[str], str],
    ) -> None:
        done, _ = await asyncio.wait(pending)
        extra = [names[task] for task in done if not task.cancelled() and task.result() == LIVE]
        if extra:
            self._report_duplicate(sid, [winner, *extra])

    def _report_duplicate(self, sid: str, pods: Sequence[str]) -> None:
        others = self.also_on.setdefault(sid, {})
        for pod in pods[1:]:
            others.setdefault(pod, OPEN)
        self.metrics.duplicate_sessions.labels(self.protocol).inc()
        log.warning(
            "session %s is live on more than one pod (%s); routing to %s. Two runtimes must "
            "never share one storage: check the pods' data directories / Redis settings",
            sid, ", ".join(pods), pods[0],
        )

    def duplicates(self, sid: str) -> list[str]:
        """Other pods that reported `sid` while it is routed to its owner (sorted)."""
        return sorted(self.also_on.get(sid, ()))

    def _second_holder(self, sid: str, owner: str, other: str, state: str) -> None:
        others = self.also_on.get(sid)
        if others is not None and other in others:
            others[other] = state  # already reported: just keep its latest state
            return
        self._report_duplicate(sid, [owner, other])
        self.also_on[sid][other] = state
        self._spawn(self._check_owner(sid, owner), f"dup-check:{sid}")

    async def _check_owner(self, sid: str, owner: str) -> None:
        """Probe the owner and the other holders of `sid`; move it only if the owner lost it."""
        others = list(self.also_on.get(sid, ()))
        answers = await asyncio.gather(*(self._probe_one(pod, sid) for pod in [owner, *others]))
        owner_answer, rest = answers[0], dict(zip(others, answers[1:], strict=True))
        for pod, answer in rest.items():
            if answer == NOT_FOUND:
                self.also_on.get(sid, {}).pop(pod, None)
        if owner_answer == NOT_FOUND:
            await self.owner_lost(sid, owner, "it answered not_found to a probe")
        elif owner_answer == LIVE and any(answer == LIVE for answer in rest.values()):
            log.warning("session %s: owner %s and %s both answer live; keep routing to %s",
                        sid, owner, ", ".join(p for p, a in rest.items() if a == LIVE), owner)
        if not self.also_on.get(sid):
            self.also_on.pop(sid, None)

    async def owner_lost(self, sid: str, owner: str, evidence: str) -> bool:
        """`owner` no longer holds `sid`: route it to a pod that reported it, if any."""
        others = self.also_on.pop(sid, None)
        entry = self.near.entry(sid)
        if not others or entry is None or entry[0] != owner:
            return False
        pod, state = next(iter(others.items()))
        log.warning("session %s moves from pod %s to pod %s: %s", sid, owner, pod, evidence)
        ttl = self.retention_s if state in TERMINAL_STATES else 0.0
        self.near.set(sid, pod, state, ttl)
        self._enqueue_write(sid, Location(pod, state, "", now_ms()))
        if len(others) > 1:
            self.also_on[sid] = {p: s for p, s in others.items() if p != pod}
        return True

    # -- what the feeds teach -------------------------------------------------------------------
    def observe(self, pod: str, sid: str, state: str, incarnation: str = "") -> None:
        """A pod's own feed reported `sid` in `state`: the authoritative write.

        Except for a session live on another pod: a second pod reporting it (two pods wrongly
        sharing storage, a split brain) never moves it. It is counted and logged, both pods are
        probed, and only evidence that the owner no longer holds it moves the entry.
        """
        current = self.near.entry(sid)
        if (current is not None and current[0] != pod and current[1] not in TERMINAL_STATES
                and current[1] != RESERVED):
            self._second_holder(sid, current[0], pod, state)
            return
        self.negative.forget(sid)
        self._recent_placements.pop(sid, None)
        if current == (pod, state):
            # Nothing new: every reconnect's snapshot repeats every session the pod holds
            # (terminal ones too, for the runtime's whole retention): no write for it.
            return
        ttl = self.retention_s if state in TERMINAL_STATES else 0.0
        self.near.set(sid, pod, state, ttl)
        self._enqueue_write(sid, Location(pod, state, incarnation, now_ms()))

    async def reconcile(self, pod: str, present: set[str], since: float) -> int:
        """After a feed reconnect: drop entries for `pod` that the pod no longer lists.

        `since` is when the reconcile listing started; reservations made after it (or within
        the reservation grace) are kept, since the pod may not have created them yet.
        """
        grace_start = since - self.reservation_grace_s
        keep = set(present)
        for sid, placed_at in list(self._recent_placements.items()):
            if placed_at >= grace_start:
                keep.add(sid)
            else:
                del self._recent_placements[sid]
        dropped = 0
        for sid, state in self.near.sessions_of(pod):
            if sid in keep or state in TERMINAL_STATES:
                continue
            if await self.owner_lost(sid, pod, "its owner's reconcile no longer lists it"):
                continue
            self.near.discard(sid, pod)
            dropped += 1
        for sid in [sid for sid, others in self.also_on.items()
                    if pod in others and sid not in keep]:
            self.also_on[sid].pop(pod, None)
            if not self.also_on[sid]:
                del self.also_on[sid]
        with contextlib.suppress(StoreUnavailable):
            await self.store.drop_pod_sessions(pod, keep)
        if dropped:
            self.metrics.reconcile_dropped.labels(self.metrics.pod_label(pod)).inc(dropped)
            log.info("pod %s: reconcile dropped %d stale entries", pod, dropped)
        return dropped

    async def forget_pod(self, pod: str) -> None:
        """A pod left the set for good: drop its entries everywhere."""
        for sid, _state in self.near.sessions_of(pod):
            self.near.discard(sid, pod)
        with contextlib.suppress(StoreUnavailable):
            await self.store.drop_pod_sessions(pod, set())
