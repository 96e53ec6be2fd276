"""Placing new sessions: choose a pod, reserve it atomically, confirm or release it.

`SessionPlacement` is the part of `router.locator.Locator` that starts sessions: the placement
policy picks among the placeable pods (`choose`), the store reserves the sid for that pod in one
atomic step so two routers never place one session twice (`place`, or `adopt` for an id a pod
minted), and the outcome of the start settles it (`confirm` when the pod took it, `release`
when it provably did not).

Invariants:
- A sid already known (near-cache or store) is never placed again: its owner is returned.
- Without the store, a placement takes the sid's rendezvous-hash pod among the candidates,
  the same on every replica, so a start racing through two routers meets on one pod.
- `release` is one compare-and-set in the store: it removes only the reservation this locator
  wrote (its `reservation_token`), never an OPEN written meanwhile or another router's
  reservation of the same sid.
- Recent placements (read by reconciles, which keep reservations younger than the grace) are
  forgotten after twice the reservation grace.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Protocol

from router import tracing
from router.metrics import Metrics
from router.near_cache import NearCache, NegativeCache
from router.placement import PlacementPolicy, rendezvous
from router.store import (
    OPEN,
    RESERVED,
    Location,
    LocationStore,
    StoreUnavailable,
    now_ms,
)

log = logging.getLogger("macp_router.locator")


class NoPlaceablePod(Exception):
    """No healthy, non-draining pod can take a new session."""


class PodRoster(Protocol):
    """The locator's view of the pods: names and whether each answers."""

    def names(self) -> list[str]: ...
    def is_healthy(self, name: str) -> bool: ...
    def placeable_names(self) -> list[str]: ...


class SessionPlacement:
    """Placement and reservations (see the module docstring); mixed into `Locator`."""

    roster: PodRoster
    store: LocationStore
    placement: PlacementPolicy
    metrics: Metrics
    protocol: str
    near: NearCache
    negative: NegativeCache
    reservation_grace_s: float
    reservation_token: str
    _recent_placements: dict[str, float]

    def _enqueue_write(self, sid: str, location: Location) -> None:
        raise NotImplementedError  # Locator's write-behind

    async def place(self, sid: str) -> tuple[str, bool]:
        """Reserve `sid` on a chosen pod. Returns (owner, won): the owner is final.

        If the sid is already known (near-cache or store), that pod is returned with
        won=False and nothing is reserved. Raises `NoPlaceablePod` when no pod can take it.
        """
        cached = self.near.get(sid)
        if cached is not None:
            return cached, False
        candidates = self.roster.placeable_names()
        return await self._reserve(sid, self.choose(candidates), candidates)

    def choose(self, candidates: list[str] | None = None) -> str:
        """The placement policy's pod for a new session among `candidates` (default: every
        placeable pod). Raises `NoPlaceablePod` when there is none."""
        if candidates is None:
            candidates = self.roster.placeable_names()
        choice = self.placement.select(candidates, self.near.open_counts())
        if choice is None:
            names = self.roster.names()
            raise NoPlaceablePod(
                "no pod can take a new session: "
                + (", ".join(names) + " are unhealthy or draining" if names else "no pods")
            )
        return choice

    async def adopt(self, sid: str, pod: str) -> tuple[str, bool]:
        """`pod` minted `sid` answering a start (ACP `session/new`: the pod names the session,
        so no reservation can precede the call): reserve it for `pod` now, atomically in the
        store, and confirm it open. Returns (owner, won) as `place` does; an id the store
        already gives another pod keeps that owner (logged)."""
        owner, won = await self._reserve(sid, pod, None)
        if owner == pod:
            self.confirm(sid, pod)
        else:
            log.warning("pod %s created session %s, which is already %s's; keeping %s",
                        pod, sid, owner, owner)
        return owner, won

    async def _reserve(self, sid: str, choice: str, candidates: list[str] | None
                       ) -> tuple[str, bool]:
        """Reserve `sid` for `choice` in the store. Without a store, the pod every replica
        takes for this sid among `candidates` (None: `choice`, the pod already has it)."""
        try:
            owner = await tracing.traced(
                "store.reserve", self.store.reserve(sid, choice, self.reservation_token),
                pod=choice)
        except StoreUnavailable:
            # No shared reservation: take the pod every replica takes for this sid, so a start
            # racing through two routers meets on one pod (the runtime answers the second).
            if candidates is not None:
                choice = rendezvous(sid, candidates) or choice
            owner = choice
        cached = self.near.get(sid)
        if cached is not None and cached != owner and owner == choice:
            # Another caller in this process reserved it while we awaited the store.
            owner = cached
        won = owner == choice and cached is None
        if cached is None:
            self.near.set(sid, owner, RESERVED, self.reservation_grace_s * 10)
        self.negative.forget(sid)
        self._recent_placements.pop(sid, None)  # to the end: the dict stays in placement order
        self._recent_placements[sid] = time.monotonic()
        self.metrics.record_placement(self.protocol, owner, "placed" if won else "lost_race",
                                      sid)
        return owner, won

    def confirm(self, sid: str, pod: str) -> None:
        """The pod accepted the start: the session is open there (before its feed says so)."""
        if self.near.entry(sid) == (pod, RESERVED):
            self.near.set(sid, pod, OPEN)
            self._enqueue_write(sid, Location(pod, OPEN, "", now_ms()))

    async def release(self, sid: str, pod: str) -> None:
        """Undo a reservation the pod provably did not accept.

        One compare-and-set in the store (`LocationStore.release`): the entry goes only while
        it is still this locator's reservation on `pod`. An OPEN written meanwhile (the pod's
        feed, a confirm through another router) or another router's reservation of the same
        sid on the same pod stays (a get-then-delete here removed them).
        """
        self.metrics.record_placement(self.protocol, pod, "released", sid)
        if self.near.entry(sid) == (pod, RESERVED):
            self.near.discard(sid, pod)
        self._recent_placements.pop(sid, None)
        with contextlib.suppress(StoreUnavailable):
            await self.store.release(sid, pod, self.reservation_token)

    def sweep_recent_placements(self, now: float | None = None) -> int:
        """Forget placements older than twice the reservation grace; returns how many.

        Only a reconcile reads them (reservations within the grace are kept), and a MACP
        feed's report of the session drops its entry; ACP sessions and starts whose feed never
        reported them were kept for ever. The dict is in placement order, so this reads only
        the entries it drops (and the first it keeps)."""
        cutoff = (time.monotonic() if now is None else now) - 2 * self.reservation_grace_s
        old = []
        for sid, placed_at in self._recent_placements.items():
            if placed_at > cutoff:
                break
            old.append(sid)
        for sid in old:
            del self._recent_placements[sid]
        return len(old)
