"""Every structure that grows with sessions has a bound or an expiry, and a metric.

The negative cache (a hard bound and an expiry that runs however few entries it holds), the
single-flight table (an entry leaves on every exit path), the near-cache bound as the locator
lives with it (an evicted live session is found again by a miss), and the in-memory store's
sweeper (ended sessions leave it without being read again). Time is driven through `now=`
arguments or tiny TTLs awaited with `eventually`; nothing here sleeps a guessed time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from router.core.status import LIVE, NOT_FOUND
from router.locator import Locator
from router.metrics import Metrics
from router.placement import RoundRobin
from router.store import OPEN, RESOLVED, Location, MemoryStore
from router.supervisor import Supervisor
from tests.unit.test_locator import Probe, Roster
from tests.waiting import eventually

Make = Callable[..., Locator]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    made: list[Locator] = []

    def build(roster: Roster, probe: Probe, **options: Any) -> Locator:
        options.setdefault("store", MemoryStore())
        options.setdefault("metrics", Metrics(CollectorRegistry()))
        locator = Locator(roster=roster, probe=probe, placement=RoundRobin(),
                          probe_timeout_s=0.05, **options)
        made.append(locator)
        return locator

    yield build
    for locator in made:
        await locator.aclose()


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# -- negative cache ---------------------------------------------------------------------------
async def test_the_negative_cache_holds_at_most_its_bound_forgetting_the_oldest(make) -> None:
    probe = Probe()
    locator = make(Roster("a", "b"), probe, negative_max=3, negative_ttl_s=60)
    for i in range(5):
        assert (await locator.lookup(f"gone{i}")).status == NOT_FOUND
    assert list(locator.negative) == ["gone2", "gone3", "gone4"]
    probes = len(probe.calls)
    assert (await locator.lookup("gone4")).source == "negative_cache"
    assert len(probe.calls) == probes
    assert (await locator.lookup("gone0")).status == NOT_FOUND  # forgotten: probed again
    assert len(probe.calls) == probes + 2
    assert sample(locator.metrics, "macp_router_negative_cache_entries", protocol="macp") == 3


async def test_expired_negative_entries_are_swept_however_few_there_are(make) -> None:
    """The sweep used to run only past 1000 entries: a handful of misses stayed for ever."""
    locator = make(Roster("a"), Probe(), negative_ttl_s=30)
    for i in range(3):
        await locator.lookup(f"gone{i}")
    now = time.monotonic()
    assert locator.negative.sweep(now=now + 1) == 0 and len(locator.negative) == 3
    assert locator.negative.sweep(now=now + 31) == 3
    assert len(locator.negative) == 0


async def test_the_sweeper_service_empties_the_negative_cache_on_its_own(make) -> None:
    locator = make(Roster("a"), Probe(), negative_ttl_s=0.01)
    await locator.start()
    await locator.lookup("gone")
    assert len(locator.negative) == 1
    await eventually(lambda: not locator.negative, timeout=5, what="negative entry swept")


# -- the single-flight table ------------------------------------------------------------------
async def test_a_lookup_every_caller_cancelled_leaves_the_in_flight_table(make) -> None:
    probe = Probe(b={"s1"})
    probe.gate.clear()
    locator = make(Roster("a", "b"), probe)
    callers = [asyncio.ensure_future(locator.lookup("s1")) for _ in range(4)]
    await eventually(lambda: len(probe.calls) == 2, timeout=10, what="the fan-out started")
    assert len(locator._inflight) == 1
    assert sample(locator.metrics, "macp_router_inflight_lookups", protocol="macp") == 1
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    probe.gate.set()
    await eventually(lambda: not locator._inflight, timeout=10, what="in-flight entry removed")
    assert sample(locator.metrics, "macp_router_inflight_lookups", protocol="macp") == 0


async def test_closing_the_locator_mid_lookup_leaves_no_in_flight_entry(make) -> None:
    probe = Probe(b={"s1"})
    probe.gate.clear()
    locator = make(Roster("a", "b"), probe)
    caller = asyncio.ensure_future(locator.lookup("s1"))
    await eventually(lambda: len(probe.calls) == 2, timeout=10, what="the fan-out started")
    await locator.aclose()
    assert locator._inflight == {}
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)


async def test_a_lookup_cancelled_before_it_ever_ran_leaves_the_in_flight_table(make) -> None:
    """Its `finally` never runs (the coroutine never started): the task's done callback
    removes the entry all the same."""
    locator = make(Roster("a"), Probe())
    caller = asyncio.ensure_future(locator.lookup("s1"))
    await asyncio.sleep(0)  # the caller created the look-up task; the task has not run yet
    task = locator._inflight["s1"]
    task.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    await eventually(lambda: not locator._inflight, timeout=10, what="in-flight entry removed")


async def test_many_concurrent_misses_leave_nothing_behind(make) -> None:
    locator = make(Roster("a", "b"), Probe(a={f"s{i}" for i in range(0, 200, 2)}))
    results = await asyncio.gather(*(locator.lookup(f"s{i % 200}") for i in range(1000)))
    assert {r.status for r in results} == {LIVE, NOT_FOUND}
    assert locator._inflight == {}


# -- the near-cache bound, as the locator lives with it ---------------------------------------
async def test_an_evicted_live_session_is_found_again_by_a_probe_on_its_pod(make) -> None:
    """The cost of evicting a live session is one miss: the next lookup probes and routes it
    to the pod that holds it, and the cache has it again."""
    probe = Probe(b={"s1"}, a={"s2", "s3"})
    locator = make(Roster("a", "b"), probe, cache_max_sessions=2)
    locator.observe("b", "s1", OPEN)  # the feed: cached, no store write yet (no writer)
    locator.observe("a", "s2", OPEN)
    locator.observe("a", "s3", OPEN)  # full: s1, the oldest live one, is evicted
    assert locator.try_cached("s1") is None and len(locator.near) == 2
    located = await locator.lookup("s1")
    assert (located.status, located.pod, located.source) == (LIVE, "b", "probe")
    assert locator.try_cached("s1") == "b"
    assert sample(locator.metrics, "macp_router_cache_evictions_total", protocol="macp",
                  reason="live") == 2  # s1 for s3, then s2 to make room for s1 again


async def test_an_evicted_session_the_store_knows_costs_a_store_read_not_a_probe(make) -> None:
    store = MemoryStore()
    probe = Probe(b={"s1"})
    locator = make(Roster("a", "b"), probe, store=store, cache_max_sessions=1)
    locator.observe("b", "s1", OPEN)
    await locator.flush()
    locator.observe("a", "s2", RESOLVED)
    locator.observe("a", "s3", OPEN)  # s1 went for s2 (no ended one yet), s2 (ended) for s3
    assert locator.try_cached("s1") is None
    located = await locator.lookup("s1")
    assert (located.status, located.pod, located.source) == (LIVE, "b", "store")
    assert probe.calls == []
    counts = {reason: sample(locator.metrics, "macp_router_cache_evictions_total",
                             protocol="macp", reason=reason)
              for reason in ("terminal", "live", "expired")}
    assert counts == {"terminal": 1, "live": 2, "expired": 0}


# -- the in-memory store ----------------------------------------------------------------------
async def test_ended_sessions_leave_the_memory_store_without_being_read_again() -> None:
    store = MemoryStore(retention_s=30)
    for i in range(100):
        await store.put(f"e{i}", Location("a", RESOLVED))
    await store.put("open", Location("a", OPEN))
    assert len(store) == 101
    assert store.sweep(now=time.monotonic() + 31) == 100
    assert len(store) == 1 and store.expired == 100
    assert await store.pod_sessions("a") == {"open"}


async def test_under_churn_the_memory_store_holds_only_what_ended_within_retention() -> None:
    """Writes sweep as they go: 5 000 sessions, one per millisecond of the store's clock,
    each reserved, opened and ended, 50 ms retention, no reads and no sweeper service: the
    store holds the ~50 that ended within the retention (+ a few expired ones a write has not
    reached yet), never the history."""
    now = [0.0]
    store = MemoryStore(retention_s=0.05, reservation_ttl_s=0.05, clock=lambda: now[0])
    peak = 0
    for i in range(5000):
        now[0] += 0.001
        sid = f"s{i}"
        await store.reserve(sid, "a")
        await store.put(sid, Location("a", OPEN))
        await store.put(sid, Location("a", RESOLVED))
        peak = max(peak, len(store))
    assert 50 <= peak <= 50 + 4, peak
    assert len(store._deadlines) <= 2 * len(store._expires) + 1024 + 1
    assert store.expired >= 5000 - peak


async def test_the_memory_store_sweeper_runs_under_the_supervisor() -> None:
    supervisor = Supervisor()
    store = MemoryStore(retention_s=0.05, supervisor=supervisor,
                        service="store_sweeper:macp", sweep_interval_s=0.02)
    try:
        await store.start()
        assert supervisor.running("store_sweeper:macp")
        await store.put("ended", Location("a", RESOLVED))
        await eventually(lambda: len(store) == 0, timeout=5, what="the sweeper removed it")
    finally:
        await store.aclose()
        assert not supervisor.running("store_sweeper:macp")
        await supervisor.aclose()


async def test_the_memory_store_size_is_exported() -> None:
    metrics = Metrics(CollectorRegistry())
    store = MemoryStore()
    metrics.watch_size("macp_router_store_entries", ("macp",), store.__len__)
    await store.put("s1", Location("a", OPEN))
    assert sample(metrics, "macp_router_store_entries", protocol="macp") == 1
    with pytest.raises(ValueError, match="no size gauge"):
        metrics.watch_size("macp_router_made_up", ("macp",), store.__len__)


# -- placements remembered for reconciles -----------------------------------------------------
async def test_placements_are_forgotten_after_twice_the_reservation_grace(make) -> None:
    """ACP sessions (no feed reports them) and starts a feed never reported were remembered
    for ever; the sweeper forgets them once no reconcile can need them."""
    locator = make(Roster("a", "b"), Probe(), reservation_grace_s=30)
    for i in range(5):
        await locator.adopt(f"acp{i}", "a")  # an ACP session/new: reserved and confirmed
    last = max(locator._recent_placements.values())
    assert locator.sweep_recent_placements(now=last + 59) == 0
    await eventually(lambda: time.monotonic() > last, timeout=1, interval=0,
                     what="the clock moved past the last placement")
    await locator.place("late")
    assert locator.sweep_recent_placements(now=last + 60) == 5  # placed at or before `last`
    assert list(locator._recent_placements) == ["late"]



def test_made_up_method_names_grow_neither_the_series_nor_the_metrics_cache() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.add_methods(["session/prompt"])
    metrics.add_protocol_pod("acp", "a")
    for i in range(500):
        metrics.record_request("acp", f"made/up{i}", "any", "a", "OK", 0.001)
        metrics.record_request("acp", "session/prompt", "session", "a", "OK", 0.001)
    assert len(metrics._request_children) == 1  # the known label set only
    assert sample(metrics, "macp_router_requests_total", protocol="acp", method="unknown",
                  route="any", pod="a", code="OK") == 500
    assert sample(metrics, "macp_router_requests_total", protocol="acp",
                  method="session/prompt", route="session", pod="a", code="OK") == 500


async def test_a_full_memory_store_drops_the_soonest_to_expire_then_the_oldest_open() -> None:
    """Open entries never expire on their own (an ACP session nobody closes): the bound keeps
    the store at `max_entries`, ended sessions going first."""
    store = MemoryStore(max_entries=3)
    await store.put("open1", Location("a", OPEN))
    await store.put("ended", Location("a", RESOLVED))
    await store.put("open2", Location("b", OPEN))
    await store.put("open3", Location("b", OPEN))  # full: the ended one goes
    assert await store.get("ended") is None and len(store) == 3
    await store.put("open2", Location("a", OPEN))  # an update makes no room
    assert len(store) == 3 and store.evicted == 1
    await store.put("open4", Location("a", OPEN))  # then the oldest open one
    assert await store.get("open1") is None
    assert {sid for sid in ("open2", "open3", "open4") if await store.get(sid)} == {
        "open2", "open3", "open4"}
    assert await store.pod_sessions("a") == {"open2", "open4"}
    assert store.evicted == 2


async def test_under_endless_open_sessions_the_memory_store_stays_at_its_bound() -> None:
    store = MemoryStore(max_entries=1000)
    for i in range(20_000):
        await store.put(f"s{i}", Location("a", OPEN))
        assert len(store) <= 1000
    assert store.evicted == 19_000
    assert len(store._order) <= 2 * 1000 + 1024 + 1
    assert len(await store.pod_sessions("a")) == 1000
