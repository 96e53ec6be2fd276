"""The locator on its own: near-cache, store and probe fan-out, with fakes for pods and probes.

A `Locator` is built with a fake roster (pod names, health, draining), the real in-process
`MemoryStore` and a fake probe function that answers from a dict of which pod holds which
session and records every probe. No sockets: what reached the "pods" is exactly `probe.calls`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from router.core.status import LIVE, NOT_FOUND, UNKNOWN, LocateStatus
from router.locator import Locator
from router.metrics import Metrics
from router.placement import RoundRobin, rendezvous
from router.reservation import NoPlaceablePod
from router.store import OPEN, RESERVED, RESOLVED, Location, MemoryStore, StoreUnavailable
from tests.waiting import eventually

SID = "0190a5b4-7c1d-7aaa-8bbb-0123456789ab"


class Roster:
    """The locator's view of the pods; all healthy and placeable unless told otherwise."""

    def __init__(self, *names: str) -> None:
        self.pods = list(names)
        self.unhealthy: set[str] = set()
        self.draining: set[str] = set()

    def names(self) -> list[str]:
        return list(self.pods)

    def is_healthy(self, name: str) -> bool:
        return name not in self.unhealthy

    def placeable_names(self) -> list[str]:
        return [n for n in self.pods if n not in self.unhealthy and n not in self.draining]


class Probe:
    """Answers live / not_found from `holds`; `silent` pods never answer; `broken` ones raise."""

    def __init__(self, **holds: set[str]) -> None:
        self.holds = holds
        self.silent: set[str] = set()
        self.broken: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, pod: str, sid: str) -> LocateStatus:
        self.calls.append((pod, sid))
        await self.gate.wait()
        if pod in self.broken:
            raise RuntimeError("adapter bug")
        if pod in self.silent:
            await asyncio.Event().wait()
        return LIVE if sid in self.holds.get(pod, set()) else NOT_FOUND


class FailingStore(MemoryStore):
    """A store that is down: every call raises StoreUnavailable."""

    async def get(self, sid: str) -> Any:
        raise StoreUnavailable("down")

    async def reserve(self, sid: str, pod: str, token: str = "") -> str:
        raise StoreUnavailable("down")

    async def release(self, sid: str, pod: str, token: str = "") -> bool:
        raise StoreUnavailable("down")

    async def delete(self, sid: str, pod: str) -> None:
        raise StoreUnavailable("down")


class FeedLandsDuringRelease(MemoryStore):
    """A store where the pod's feed write (OPEN) lands right after the first store call a
    release makes returns: between a read and a delete, if release reads first."""

    def __init__(self, pod: str) -> None:
        super().__init__()
        self.pod = pod
        self.armed = False

    async def _feed_lands(self, sid: str) -> None:
        if self.armed:
            self.armed = False
            await self.put(sid, Location(self.pod, OPEN, "feed", 1))

    async def get(self, sid: str) -> Any:
        location = await super().get(sid)
        await self._feed_lands(sid)
        return location

    async def release(self, sid: str, pod: str, token: str = "") -> bool:
        released = await super().release(sid, pod, token)
        await self._feed_lands(sid)
        return released

    async def delete(self, sid: str, pod: str) -> bool:
        deleted = await super().delete(sid, pod)
        await self._feed_lands(sid)
        return deleted


Make = Callable[..., Locator]

GATED_PROBE_TIMEOUT_S = 5.0
"""Probe timeout of the tests that hold probes at a gate: the default 50 ms raced the gate, and
a loop stalled that long on a loaded machine timed the held probes out (UNKNOWN)."""


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    made: list[Locator] = []

    def build(roster: Roster, probe: Probe, **options: Any) -> Locator:
        options.setdefault("store", MemoryStore())
        options.setdefault("placement", RoundRobin())
        options.setdefault("probe_timeout_s", 0.05)
        locator = Locator(roster=roster, probe=probe, metrics=Metrics(CollectorRegistry()),
                          **options)
        made.append(locator)
        return locator

    yield build
    for locator in made:
        await locator.aclose()


# -- hit and miss ------------------------------------------------------------------------------
async def test_a_session_its_feed_reported_is_a_hit_with_no_store_read_and_no_probe(make) -> None:
    probe = Probe(b={SID})
    locator = make(Roster("a", "b"), probe, store=FailingStore())
    locator.observe("b", SID, OPEN)
    assert locator.try_cached(SID) == "b"
    located = await locator.lookup(SID)
    assert (located.status, located.pod, located.source) == (LIVE, "b", "cache")
    assert probe.calls == []


async def test_a_miss_probes_every_healthy_pod_once_then_hits_the_cache(make) -> None:
    probe = Probe(b={SID})
    store = MemoryStore()
    locator = make(Roster("a", "b", "c"), probe, store=store)
    assert locator.try_cached(SID) is None
    located = await locator.lookup(SID)
    assert (located.status, located.pod, located.source) == (LIVE, "b", "probe")
    probed = [pod for pod, _ in probe.calls]
    assert "b" in probed and len(probed) == len(set(probed)) and set(probed) <= {"a", "b", "c"}
    assert locator.try_cached(SID) == "b"
    await locator.flush()
    assert (await store.get(SID)).pod == "b"  # type: ignore[union-attr]
    probes = len(probe.calls)
    assert (await locator.lookup(SID)).source == "cache"
    assert len(probe.calls) == probes


async def test_a_miss_the_store_answers_sends_no_probe(make) -> None:
    store = MemoryStore()
    await store.reserve(SID, "c")
    probe = Probe()
    locator = make(Roster("a", "b", "c"), probe, store=store)
    located = await locator.lookup(SID)
    assert (located.status, located.pod, located.source) == (LIVE, "c", "store")
    assert probe.calls == []


async def test_concurrent_misses_for_one_session_probe_each_pod_once(make) -> None:
    probe = Probe(c={SID})
    probe.gate.clear()
    locator = make(Roster("a", "b", "c"), probe, probe_timeout_s=GATED_PROBE_TIMEOUT_S)
    lookups = [asyncio.ensure_future(locator.lookup(SID)) for _ in range(20)]
    await eventually(lambda: len(probe.calls) == 3, timeout=10, what="one fan-out started")
    probe.gate.set()
    results = await asyncio.gather(*lookups)
    assert {(r.status, r.pod) for r in results} == {(LIVE, "c")}
    assert sorted(probe.calls) == [("a", SID), ("b", SID), ("c", SID)]


async def test_the_first_callers_cancel_does_not_fail_the_others_sharing_its_lookup(make) -> None:
    """One client's cancel (or deadline) ends its own wait only: the callers that joined its
    look-up get the look-up's result, not CANCELLED."""
    probe = Probe(c={SID})
    probe.gate.clear()
    locator = make(Roster("a", "b", "c"), probe, probe_timeout_s=GATED_PROBE_TIMEOUT_S)
    first = asyncio.ensure_future(locator.lookup(SID))
    await eventually(lambda: len(probe.calls) == 3, timeout=10, what="the fan-out started")
    others = [asyncio.ensure_future(locator.lookup(SID)) for _ in range(5)]
    await asyncio.sleep(0)  # the others join the look-up in flight
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    probe.gate.set()
    results = await asyncio.gather(*others)
    assert {(r.status, r.pod) for r in results} == {(LIVE, "c")}
    assert len(probe.calls) == 3  # still one fan-out
    assert locator.try_cached(SID) == "c"


async def test_a_lookup_every_caller_abandoned_still_finishes_and_fills_the_cache(make) -> None:
    probe = Probe(b={SID})
    probe.gate.clear()
    locator = make(Roster("a", "b"), probe, probe_timeout_s=GATED_PROBE_TIMEOUT_S)
    caller = asyncio.ensure_future(locator.lookup(SID))
    await eventually(lambda: len(probe.calls) == 2, timeout=10, what="the fan-out started")
    caller.cancel()
    probe.gate.set()
    await eventually(lambda: locator.try_cached(SID) == "b", timeout=10, what="cache filled")


# -- not found, unknown ------------------------------------------------------------------------
async def test_no_holder_is_not_found_and_remembered_for_the_negative_ttl(make) -> None:
    probe = Probe()
    locator = make(Roster("a", "b"), probe, negative_ttl_s=60)
    assert (await locator.lookup(SID)).status == NOT_FOUND
    assert len(probe.calls) == 2
    again = await locator.lookup(SID)
    assert (again.status, again.source) == (NOT_FOUND, "negative_cache")
    assert len(probe.calls) == 2
    fresh = await locator.lookup(SID, use_negative=False)
    assert fresh.status == NOT_FOUND and len(probe.calls) == 4


async def test_an_expired_negative_entry_probes_again(make) -> None:
    probe = Probe()
    locator = make(Roster("a", "b"), probe, negative_ttl_s=0)
    await locator.lookup(SID)
    assert (await locator.lookup(SID)).source == "probe"
    assert len(probe.calls) == 4


async def test_a_created_event_clears_the_negative_cache(make) -> None:
    locator = make(Roster("a", "b"), Probe(), negative_ttl_s=60)
    assert (await locator.lookup(SID)).status == NOT_FOUND
    locator.observe("a", SID, OPEN)
    located = await locator.lookup(SID)
    assert (located.status, located.pod, located.source) == (LIVE, "a", "cache")


async def test_a_silent_pod_makes_the_answer_unknown_is_reported_and_nothing_is_cached(
    make,
) -> None:
    probe = Probe()
    probe.silent.add("c")
    silent: list[tuple[str, str]] = []
    locator = make(Roster("a", "b", "c"), probe, negative_ttl_s=60,
                   on_silent=lambda pod, why: silent.append((pod, why)))
    located = await locator.lookup(SID)
    assert (located.status, located.pod, located.unknown_pods) == (UNKNOWN, None, ("c",))
    assert [pod for pod, _ in silent] == ["c"] and "50 ms" in silent[0][1]
    assert "did not answer within 50 ms" in located.describe_unknown(SID, 0.05)
    assert locator.try_cached(SID) is None
    assert (await locator.lookup(SID)).source == "probe", "unknown is never negative-cached"


async def test_an_unknown_answer_names_each_pods_known_cause_and_the_silent_ones(make) -> None:
    probe = Probe()
    probe.silent.update({"b", "c"})
    located = await make(Roster("a", "b", "c"), probe).lookup(SID)
    causes = {"b": "rejects the router's credentials"}
    text = located.describe_unknown(SID, 0.25, causes)
    assert text == (f"session {SID} not located: pods c did not answer within 250 ms (retry); "
                    "pod b rejects the router's credentials")
    only_known = located.describe_unknown(SID, 0.25, {**causes, "c": "is draining"})
    assert only_known == (f"session {SID} not located: pod b rejects the router's credentials; "
                          "pod c is draining")


async def test_an_unhealthy_pod_is_unknown_without_being_probed(make) -> None:
    probe = Probe()
    roster = Roster("a", "b")
    roster.unhealthy.add("b")
    located = await make(roster, probe).lookup(SID)
    assert (located.status, located.unknown_pods) == (UNKNOWN, ("b",))
    assert probe.calls == [("a", SID)]


async def test_a_probe_that_raises_is_unknown_never_not_found(make) -> None:
    probe = Probe()
    probe.broken.add("a")
    located = await make(Roster("a", "b"), probe).lookup(SID)
    assert (located.status, located.unknown_pods) == (UNKNOWN, ("a",))


async def test_a_live_answer_wins_while_another_pod_is_still_silent(make) -> None:
    probe = Probe(a={SID})
    probe.silent.add("b")
    located = await make(Roster("a", "b"), probe, probe_timeout_s=30).lookup(SID)
    assert (located.status, located.pod) == (LIVE, "a")


async def test_an_unknown_session_is_never_placed(make) -> None:
    store = MemoryStore()
    probe = Probe()
    probe.silent.add("b")
    locator = make(Roster("a", "b"), probe, store=store)
    assert (await locator.lookup(SID)).status == UNKNOWN
    await locator.flush()
    assert await store.get(SID) is None
    assert locator.near.open_counts() == {}


async def test_a_store_outage_degrades_a_lookup_to_probes(make) -> None:
    located = await make(Roster("a", "b"), Probe(b={SID}), store=FailingStore()).lookup(SID)
    assert (located.status, located.pod) == (LIVE, "b")


# -- stale routes ------------------------------------------------------------------------------
async def test_a_stale_route_is_invalidated_and_the_next_lookup_finds_the_holder(make) -> None:
    store = MemoryStore()
    probe = Probe(b={SID})
    locator = make(Roster("a", "b"), probe, store=store)
    locator.observe("a", SID, OPEN)  # the cache says a; the session is on b
    await locator.flush()
    assert locator.try_cached(SID) == "a"
    await locator.invalidate(SID, "a")  # a answered NOT_FOUND to the forwarded call
    assert locator.try_cached(SID) is None
    assert await store.get(SID) is None
    located = await locator.lookup(SID)
    assert (located.status, located.pod, located.source) == (LIVE, "b", "probe")


async def test_invalidating_a_pod_the_entry_does_not_name_changes_nothing(make) -> None:
    locator = make(Roster("a", "b"), Probe())
    locator.observe("b", SID, OPEN)
    await locator.invalidate(SID, "a")
    assert locator.try_cached(SID) == "b"


# -- placement ---------------------------------------------------------------------------------
async def test_place_reserves_once_and_confirm_opens_the_session(make) -> None:
    store = MemoryStore()
    locator = make(Roster("a", "b"), Probe(), store=store)
    owner, won = await locator.place(SID)
    assert won and owner in ("a", "b")
    assert locator.near.entry(SID) == (owner, RESERVED)
    assert (await store.get(SID)).state == RESERVED  # type: ignore[union-attr]
    assert await locator.place(SID) == (owner, False)
    locator.confirm(SID, owner)
    assert locator.near.entry(SID) == (owner, OPEN)
    await locator.flush()
    assert (await store.get(SID)).state == OPEN  # type: ignore[union-attr]


async def test_release_undoes_a_reservation_the_pod_did_not_accept(make) -> None:
    store = MemoryStore()
    locator = make(Roster("a", "b"), Probe(), store=store)
    owner, _ = await locator.place(SID)
    await locator.release(SID, owner)
    assert locator.try_cached(SID) is None
    assert await store.get(SID) is None


async def test_release_spares_an_open_entry_the_feed_wrote_after_the_reservation(make) -> None:
    store = FeedLandsDuringRelease("a")
    locator = make(Roster("a", "b"), Probe(), store=store, placement=_Always("a"))
    assert await locator.place(SID) == ("a", True)
    store.armed = True  # the pod's feed says OPEN while the release is under way
    await locator.release(SID, "a")
    assert not store.armed, "the feed write did not land during the release"
    assert await store.get(SID) == Location("a", OPEN, "feed", 1)
    assert await store.pod_sessions("a") == {SID}


async def test_release_spares_an_open_entry_written_before_it(make) -> None:
    store = MemoryStore()
    locator = make(Roster("a", "b"), Probe(), store=store, placement=_Always("a"))
    assert await locator.place(SID) == ("a", True)
    await store.put(SID, Location("a", OPEN, "feed", 1))
    await locator.release(SID, "a")
    assert await store.get(SID) == Location("a", OPEN, "feed", 1)


async def test_release_by_a_router_that_lost_leaves_the_winners_reservation(make) -> None:
    store = MemoryStore()
    winner = make(Roster("a", "b"), Probe(), store=store, placement=_Always("a"))
    loser = make(Roster("a", "b"), Probe(), store=store, placement=_Always("a"))
    assert await winner.place(SID) == ("a", True)
    await loser.place(SID)  # the store names "a" for both: the loser cannot tell it lost
    await loser.release(SID, "a")  # its start was refused ("session exists"): it releases
    location = await store.get(SID)
    assert location is not None and (location.pod, location.state) == ("a", RESERVED)
    await winner.release(SID, "a")
    assert await store.get(SID) is None


async def test_a_reservation_resynced_after_a_store_flush_can_still_be_released(make) -> None:
    store = MemoryStore()
    locator = make(Roster("a", "b"), Probe(), store=store, placement=_Always("a"))
    assert await locator.place(SID) == ("a", True)
    assert await store.delete(SID, "a")  # the store was flushed
    await locator.resync_store()  # it came back: the near-cache is written into it
    assert (await store.get(SID)).state == RESERVED  # type: ignore[union-attr]
    await locator.release(SID, "a")  # the pod refused the start
    assert await store.get(SID) is None


async def test_confirm_by_another_pod_does_not_move_a_reservation(make) -> None:
    locator = make(Roster("a", "b"), Probe(), placement=_Always("a"))
    await locator.place(SID)
    locator.confirm(SID, "b")
    assert locator.near.entry(SID) == ("a", RESERVED)


async def test_a_known_session_is_returned_by_place_without_a_reservation(make) -> None:
    store = MemoryStore()
    locator = make(Roster("a", "b"), Probe(), store=store)
    locator.observe("b", SID, OPEN)
    assert await locator.place(SID) == ("b", False)
    assert await store.get(SID) is None  # nothing reserved (the feed write is not flushed)


async def test_the_store_picks_the_winner_of_a_race_with_another_router(make) -> None:
    store = MemoryStore()
    await store.reserve(SID, "b")  # another router reserved it first
    locator = make(Roster("a", "b"), Probe(), store=store, placement=_Always("a"))
    assert await locator.place(SID) == ("b", False)


async def test_without_a_store_placement_takes_the_rendezvous_pod(make) -> None:
    locator = make(Roster("a", "b", "c"), Probe(), store=FailingStore(), placement=_Always("a"))
    owner, won = await locator.place(SID)
    assert owner == rendezvous(SID, ["a", "b", "c"]) and won


async def test_no_placeable_pod_is_an_error_naming_the_pods(make) -> None:
    roster = Roster("a", "b")
    roster.unhealthy.add("a")
    roster.draining.add("b")
    with pytest.raises(NoPlaceablePod, match="a, b are unhealthy or draining"):
        await make(roster, Probe()).place(SID)


async def test_placement_clears_the_negative_cache(make) -> None:
    locator = make(Roster("a"), Probe(), negative_ttl_s=60)
    assert (await locator.lookup(SID)).status == NOT_FOUND
    owner, _ = await locator.place(SID)
    assert (await locator.lookup(SID)).pod == owner


# -- what the feeds teach ----------------------------------------------------------------------
async def test_a_second_pod_reporting_a_live_session_does_not_move_it(make) -> None:
    probe = Probe(a={SID}, b={SID})
    locator = make(Roster("a", "b"), probe)
    locator.observe("a", SID, OPEN)
    locator.observe("b", SID, OPEN)
    assert locator.try_cached(SID) == "a"
    assert locator.duplicates(SID) == ["b"]
    await eventually(lambda: ("a", SID) in probe.calls, timeout=10, what="owner probed")


async def test_the_owner_answering_not_found_moves_the_session_to_the_other_holder(make) -> None:
    probe = Probe(b={SID})
    locator = make(Roster("a", "b"), probe)
    locator.observe("a", SID, OPEN)
    locator.observe("b", SID, OPEN)
    await eventually(lambda: locator.try_cached(SID) == "b", timeout=10, what="moved to b")
    assert locator.duplicates(SID) == []


async def test_an_ended_session_stays_routable_to_its_pod(make) -> None:
    locator = make(Roster("a", "b"), Probe())
    locator.observe("a", SID, OPEN)
    locator.observe("a", SID, RESOLVED)
    assert locator.near.entry(SID) == ("a", RESOLVED)
    assert (await locator.lookup(SID)).pod == "a"
    assert locator.near.open_counts() == {}


class _Always:
    """A placement policy that always picks one pod (when it is a candidate)."""

    name = "always"

    def __init__(self, pod: str) -> None:
        self.pod = pod

    def select(self, candidates: list[str], load: object) -> str | None:
        return self.pod if self.pod in candidates else None
