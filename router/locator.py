"""Where is session X? The near-cache, the store and the probe fan-out behind one facade.

`Locator` answers in three steps:
1. `try_cached(sid)`: the in-process near-cache, fed by the pods' watch feeds. No I/O.
2. `lookup(sid)`: the shared `LocationStore` (Redis), then a parallel probe of every healthy
   pod through the protocol adapter's `probe(pod, sid) -> live | not_found | unknown`.
3. `place(sid)`: a `PlacementPolicy` picks a pod; the store reserves it atomically and the
   winner (ours, or the one another caller/router recorded first) is returned.

What the pods' own feeds teach (observe, reconcile, sessions two pods report) is
`router.ownership.SessionOwnership`, and placement with its reservations (place, adopt,
confirm, release) is `router.reservation.SessionPlacement`, both mixed into `Locator`. The
near-cache and the negative cache are `router.near_cache`.

The locator is protocol-neutral: it knows pod names, session ids, a store and a probe function.
MACP gRPC (probe = GetSession) and ACP (probe = session/status) plug into the same class.

Invariants:
- A pod that did not answer is *unknown*, never *not_found*: a lookup with no live answer and
  at least one unknown (or unhealthy) pod returns UNKNOWN and never places or guesses.
- A probe that times out is reported (`on_silent`): the pod leaves probes and placement until
  it answers again, so later misses do not wait for it.
- Concurrent lookups of one sid share one fan-out (single-flight). The caller that starts it
  may bring its own probe function (same answers: live / not_found / unknown); the others
  share the result.
- All pods not_found -> a short negative-cache entry, cleared by a CREATED event or placement.
  The negative cache holds at most `negative_max` ids and the sweeper drops expired ones
  every second, however few there are.
- The in-flight table holds one entry per sid being located; it leaves when the look-up's
  task ends, whatever ended it (every caller cancelled, the locator closed).
- Invalidation is by (sid, pod): the near-cache first, then the store, each only if the
  entry still names that pod.
- A near-cache entry maps a sid to exactly one pod; terminal sessions stay routable for the
  retention window, then leave the cache. The near-cache holds at most `cache_max_sessions`
  (ended sessions are evicted first, then the oldest live ones, which the next call finds
  again through the store or a probe).
- A live (open, suspended) entry never moves because another pod reports the same sid (two
  pods sharing storage, a split brain): that is counted, logged, kept in `also_on` and both
  pods are probed. Only evidence from the owner moves it: it answers not_found, or its
  reconcile no longer lists it.
- Store failures never fail a lookup: they degrade it to the near-cache and probes. A
  placement without the store takes the sid's rendezvous-hash pod, the same on every replica.
- The store writer and the sweeper run as supervised services (`store_writer:<protocol>`,
  `sweeper:<protocol>`): an unexpected exception is logged, counted and the loop restarted;
  a batch whose write raised goes back to the pending writes, so it is written later.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from router import tracing
from router.core.status import LIVE, NOT_FOUND, UNKNOWN, LocateStatus
from router.metrics import Metrics
from router.near_cache import NearCache, NegativeCache
from router.ownership import SessionOwnership
from router.placement import PlacementPolicy, make_policy
from router.reservation import PodRoster, SessionPlacement
from router.store import (
    OPEN,
    RESERVED,
    TERMINAL_STATES,
    Location,
    LocationStore,
    StoreUnavailable,
    now_ms,
)
from router.supervisor import Supervisor

log = logging.getLogger("macp_router.locator")


def _log_failure(task: asyncio.Task[object]) -> None:
    """A duplicate check of a lookup raised: say so with the traceback, never silently."""
    if not task.cancelled() and task.exception() is not None:
        log.error("locator background check %s failed", task.get_name(),
                  exc_info=task.exception())

SOURCE_CACHE = "cache"
SOURCE_STORE = "store"
SOURCE_PROBE = "probe"
SOURCE_NEGATIVE = "negative_cache"

ProbeFn = Callable[[str, str], Awaitable[str]]
"""(pod, sid) -> a `LocateStatus` (a plain "live" / "not_found" string is read the same)."""


@dataclass(frozen=True, slots=True)
class Located:
    status: LocateStatus
    pod: str | None
    source: str
    unknown_pods: tuple[str, ...] = ()

    def describe_unknown(self, sid: str, probe_timeout_s: float,
                         causes: Mapping[str, str] | None = None) -> str:
        """Why the session is not located. `causes` names a known reason for some pods (e.g.
        "rejects the router's credentials ..."); the others did not answer in time."""
        causes = causes or {}
        silent = [pod for pod in self.unknown_pods if pod not in causes]
        known = [f"pod {pod} {causes[pod]}" for pod in self.unknown_pods if pod in causes]
        if known and not silent:
            return f"session {sid} not located: " + "; ".join(known)
        pods = ", ".join(silent) or "none"
        return (
            f"session {sid} not located: pods {pods} did not answer within "
            f"{probe_timeout_s * 1000:.0f} ms (retry)" + "".join(f"; {k}" for k in known)
        )


class LocatorConfig(Protocol):
    """The settings a locator is built from (both front doors' configs have them)."""

    placement: str
    probe_timeout_s: float
    negative_cache_ms: float
    negative_cache_max_sessions: int
    cache_max_sessions: int
    retention_s: float


class Locator(SessionOwnership, SessionPlacement):
    def __init__(
        self,
        *,
        roster: PodRoster,
        store: LocationStore,
        probe: ProbeFn,
        placement: PlacementPolicy,
        metrics: Metrics,
        protocol: str = "macp",
        probe_timeout_s: float = 0.25,
        negative_ttl_s: float = 1.0,
        negative_max: int = 100_000,
        cache_max_sessions: int = 0,
        retention_s: float = 600.0,
        reservation_grace_s: float = 30.0,
        on_silent: Callable[[str, str], None] | None = None,
    ) -> None:
        self.roster = roster
        self.store = store
        self.probe = probe
        self.placement = placement
        self.metrics = metrics
        self.protocol = protocol
        self.probe_timeout_s = probe_timeout_s
        self.retention_s = retention_s
        self.reservation_grace_s = reservation_grace_s
        self.on_silent = on_silent
        """Told (pod, reason) when a probe got no answer within the deadline."""
        self.near = NearCache(cache_max_sessions)
        self.negative = NegativeCache(negative_ttl_s, negative_max)
        self.also_on: dict[str, dict[str, str]] = {}
        """sid -> {other pod: state it reported} for sessions more than one pod reported."""
        self._inflight: dict[str, asyncio.Task[Located]] = {}
        """sid -> its single-flight look-up; an entry leaves when its task ends, however."""
        self._recent_placements: dict[str, float] = {}
        self._pending_writes: dict[str, Location] = {}
        self._write_wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task[object]] = set()
        self._supervisor: Supervisor | None = None
        self._own_supervisor = False
        self.services = (f"store_writer:{protocol}", f"sweeper:{protocol}")
        """The names of the locator's loops in the supervisor."""
        self.store_writes_failed = 0
        self.reservation_token = secrets.token_hex(8)
        """This locator's mark on the reservations it writes: `release` removes only a reservation
        carrying it, never another router's reservation of the same sid on the same pod."""
        metrics.watch_cached_sessions(self.near.counts, protocol)
        metrics.watch_locator(protocol, evictions=self.near.evictions,
                              negative=self.negative.__len__, inflight=self._inflight.__len__)

    @classmethod
    def configured(cls, config: LocatorConfig, *, roster: PodRoster, store: LocationStore,
                   probe: ProbeFn, metrics: Metrics, protocol: str,
                   on_silent: Callable[[str, str], None] | None = None) -> Locator:
        """A locator with a front door's settings (placement policy, probe timeout, cache
        bounds, retention)."""
        return cls(roster=roster, store=store, probe=probe,
                   placement=make_policy(config.placement), metrics=metrics, protocol=protocol,
                   probe_timeout_s=config.probe_timeout_s,
                   negative_ttl_s=config.negative_cache_ms / 1000,
                   negative_max=config.negative_cache_max_sessions,
                   cache_max_sessions=config.cache_max_sessions, retention_s=config.retention_s,
                   on_silent=on_silent)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, supervisor: Supervisor | None = None) -> None:
        """Run the store writer and the sweeper as `supervisor`'s services (the router's;
        a private supervisor when none is given)."""
        self._own_supervisor = supervisor is None
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        writer, sweeper = self.services
        self._supervisor.spawn(writer, self._write_loop)
        self._supervisor.spawn(sweeper, self._sweep_loop)
        self.store.on_recovered = self.resync_store

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and self._own_supervisor:
            await supervisor.aclose()
        elif supervisor is not None:
            for name in self.services:
                await supervisor.stop(name)
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    def _spawn(self, coro: Awaitable[object], name: str) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)  # type: ignore[assignment]
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    # -- 1. near-cache -------------------------------------------------------------------------
    def try_cached(self, sid: str) -> str | None:
        """The pod holding `sid` according to the near-cache; no I/O."""
        return self.near.get(sid)

    # -- 2./3. store, then probes -----------------------------------------------------------
    async def lookup(self, sid: str, *, use_negative: bool = True,
                     probe: ProbeFn | None = None) -> Located:
        """Locate `sid` past the near-cache: store, then a probe fan-out (single-flight).

        `probe` replaces the router's own probe for the fan-out this call starts (a front door
        asking with the caller's request, so the holder's answer is the caller's reply); a
        caller that joins a fan-out already in flight shares its result, not its probe.
        """
        pod = self.near.get(sid)
        if pod is not None:
            self.metrics.record_locate(self.protocol, "hit")
            return Located(LIVE, pod, SOURCE_CACHE)
        if use_negative and self.negative.hit(sid):
            self.metrics.record_locate(self.protocol, "negative_hit")
            return Located(NOT_FOUND, None, SOURCE_NEGATIVE)
        inflight = self._inflight.get(sid)
        if inflight is not None:
            self.metrics.coalesced_misses.labels(self.protocol).inc()
            return await asyncio.shield(inflight)
        # The look-up is a task of its own that every caller, the first included, awaits through
        # a shield: one caller's cancel (or deadline) ends that caller's wait, never the shared
        # look-up the others wait on.
        task: asyncio.Task[Located] = asyncio.create_task(
            tracing.traced("locate", self._shared_lookup(sid, probe or self.probe), sid),
            name=f"locate:{sid[:8]}")
        self._inflight[sid] = task
        task.add_done_callback(functools.partial(self._lookup_done, sid))
        self._tasks.add(task)  # type: ignore[arg-type]
        task.add_done_callback(self._tasks.discard)  # type: ignore[arg-type]
        task.add_done_callback(_log_failure)  # type: ignore[arg-type]
        return await asyncio.shield(task)

    async def _shared_lookup(self, sid: str, probe: ProbeFn) -> Located:
        try:
            return await self._locate_uncached(sid, probe)
        finally:
            self._inflight.pop(sid, None)

    def _lookup_done(self, sid: str, task: asyncio.Task[Located]) -> None:
        """The look-up's task ended, however (also cancelled before it ever ran, when its
        `finally` never ran): it leaves the in-flight table, unless a newer one took its place."""
        if self._inflight.get(sid) is task:
            del self._inflight[sid]

    async def _locate_uncached(self, sid: str, probe: ProbeFn) -> Located:
        location = await tracing.traced("store.get", self._store_get(sid))
        if location is not None:
            self._cache(sid, location.pod, location.state)
            self.metrics.record_locate(self.protocol, "store_hit")
            return Located(LIVE, location.pod, SOURCE_STORE)
        result = await tracing.traced("probe.fanout", self._probe_all(sid, probe),
                                      pods=len(self.roster.names()))
        if result.status == LIVE:
            assert result.pod is not None
            self._cache(sid, result.pod, OPEN)
            self._enqueue_write(sid, Location(result.pod, OPEN, "", now_ms()))
            self.metrics.record_locate(self.protocol, "probe_hit")
        elif result.status == NOT_FOUND:
            self.negative.remember(sid)
            self.metrics.record_locate(self.protocol, "not_found")
        else:
            self.metrics.record_locate(self.protocol, "unknown")
        return result

    async def probe_now(self, sid: str) -> Located:
        """Ask every pod now, bypassing the near-cache and the store (operators' fresh look)."""
        result = await self._probe_all(sid)
        if result.status == LIVE:
            assert result.pod is not None
            entry = self.near.entry(sid)
            if entry is None:
                self._cache(sid, result.pod, OPEN)
            elif entry[0] != result.pod and entry[1] not in TERMINAL_STATES:
                # Never move a live session on another pod's word: ask the owner itself.
                if await self._probe_one(entry[0], sid) == NOT_FOUND:
                    self.also_on.setdefault(sid, {})[result.pod] = OPEN
                    await self.owner_lost(sid, entry[0], "it answered not_found to a probe")
                else:
                    self._second_holder(sid, entry[0], result.pod, OPEN)
                    result = Located(LIVE, entry[0], SOURCE_PROBE)
            elif entry[0] != result.pod:
                self._cache(sid, result.pod, OPEN)
        return result

    async def _store_get(self, sid: str) -> Location | None:
        try:
            return await self.store.get(sid)
        except StoreUnavailable:
            return None

    async def _probe_all(self, sid: str, probe: ProbeFn | None = None) -> Located:
        names = self.roster.names()
        silent = [name for name in names if not self.roster.is_healthy(name)]
        targets = [name for name in names if self.roster.is_healthy(name)]
        self.metrics.probe_fanouts.labels(self.protocol).inc()
        started = time.perf_counter()
        if not targets:
            return Located(UNKNOWN, None, SOURCE_PROBE, tuple(silent))
        tasks = {
            asyncio.ensure_future(self._probe_one(name, sid, probe)): name for name in targets
        }
        live: list[str] = []
        unknown = list(silent)
        pending = set(tasks)
        try:
            while pending and not live:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    answer = task.result()
                    if answer == LIVE:
                        live.append(tasks[task])
                    elif answer != NOT_FOUND:
                        unknown.append(tasks[task])
        finally:
            self.metrics.probe_duration.labels(self.protocol).observe(
                time.perf_counter() - started
            )
        if pending:
            # First live answer wins; the rest finish in the background to spot duplicates.
            self._spawn(self._watch_for_duplicates(sid, live[0], pending, tasks), "dup-check")
        if live:
            if len(live) > 1:
                self._report_duplicate(sid, live)
            return Located(LIVE, live[0], SOURCE_PROBE)
        if unknown:
            return Located(UNKNOWN, None, SOURCE_PROBE, tuple(sorted(unknown)))
        return Located(NOT_FOUND, None, SOURCE_PROBE)

    async def _probe_one(self, pod: str, sid: str, probe: ProbeFn | None = None
                         ) -> LocateStatus:
        answer: object
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                answer = await (probe or self.probe)(pod, sid)
        except TimeoutError:
            answer = UNKNOWN
            if self.on_silent is not None:
                self.on_silent(pod, f"no answer to a probe within "
                                    f"{self.probe_timeout_s * 1000:.0f} ms")
        except Exception as exc:  # an adapter bug must not turn into not_found
            log.warning("probe of %s on pod %s failed: %r", sid, pod, exc)
            answer = UNKNOWN
        answer = LocateStatus.of(answer)
        self.metrics.record_probe(self.protocol, pod, answer)
        return answer

    # -- invalidation --------------------------------------------------------------------------
    async def invalidate(self, sid: str, pod: str) -> None:
        """`pod` said it does not hold `sid`: forget that route, near-cache first, then store."""
        if self.near.discard(sid, pod):
            self.also_on.pop(sid, None)  # the next lookup probes every pod afresh
        elif sid in self.also_on:
            self.also_on[sid].pop(pod, None)
        self._recent_placements.pop(sid, None)
        self._pending_writes.pop(sid, None)
        self.metrics.record_locate(self.protocol, "stale")
        with contextlib.suppress(StoreUnavailable):
            await self.store.delete(sid, pod)

    # -- store write-behind --------------------------------------------------------------------
    def _cache(self, sid: str, pod: str, state: str) -> None:
        ttl = self.retention_s if state in TERMINAL_STATES else 0.0
        self.near.set(sid, pod, state, ttl)

    def _enqueue_write(self, sid: str, location: Location) -> None:
        self._pending_writes[sid] = location
        self._write_wakeup.set()

    async def flush(self) -> None:
        """Write every pending entry now (tests and shutdown)."""
        while self._pending_writes:
            batch = self._pending_writes
            self._pending_writes = {}
            try:
                await self.store.put_many(batch.items())
            except StoreUnavailable:
                self.store_writes_failed += len(batch)
                return
            except BaseException:  # a crash or a cancel: the batch is written later
                self._pending_writes = {**batch, **self._pending_writes}
                self._write_wakeup.set()
                raise

    async def _write_loop(self) -> None:
        while True:
            await self._write_wakeup.wait()
            self._write_wakeup.clear()
            await self.flush()

    async def resync_store(self) -> None:
        """The store came back (or was flushed): write the whole near-cache into it."""
        entries = [  # a reservation keeps this locator's token, so `release` can still undo it
            (sid, Location(pod, state, self.reservation_token if state == RESERVED else "",
                           now_ms()))
            for sid, pod, state in self.near.items()
        ]
        log.info("store recovered: resyncing %d cached sessions", len(entries))
        with contextlib.suppress(StoreUnavailable):
            await self.store.put_many(entries)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.near.sweep()
            for sid in [sid for sid in self.also_on if self.near.get(sid) is None]:
                del self.also_on[sid]
            self.negative.sweep()
            self.sweep_recent_placements()
