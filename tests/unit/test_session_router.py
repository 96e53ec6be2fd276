"""The session core (`SessionRouter` over a `Locator`) with a fake backend: no sockets.

Each test states one rule of the session flow: where a call goes on a hit and a miss, that
concurrent misses share one probe round, that an unknown answer is never placed or guessed,
that a stale route is retried once, and how a start's reservation is confirmed or released.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from router.core.errors import Abort
from router.core.session_router import NotLocated, SessionRouter
from router.core.status import LIVE, NOT_FOUND, UNKNOWN
from router.reservation import NoPlaceablePod
from router.store import OPEN, RESERVED
from tests.unit.fakes import FakeBackend, FakeRoster, call, make_locator

PODS = ("a", "b", "c")


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(*PODS)


@pytest.fixture
def roster() -> FakeRoster:
    return FakeRoster(*PODS)


@pytest.fixture
def core(roster: FakeRoster, backend: FakeBackend) -> SessionRouter:
    return SessionRouter(make_locator(roster, backend, probe_timeout_s=0.05), backend)


async def test_cache_hit_forwards_to_the_cached_pod_without_probing(core, backend) -> None:
    backend.holds["b"].add("s1")
    core.locator.observe("b", "s1", OPEN)
    the_call = call()
    assert await core.session(the_call, "s1", "req") == "b:req"
    assert the_call.pod == "b" and the_call.sid == "s1"
    assert backend.probes == []
    assert backend.forwards == [("b", "req")]


async def test_miss_probes_every_pod_once_and_caches_the_holder(core, backend) -> None:
    backend.holds["c"].add("s1")
    assert await core.session(call(), "s1", "r1") == "c:r1"
    assert sorted(backend.probes) == [("a", "s1"), ("b", "s1"), ("c", "s1")]
    assert core.locator.try_cached("s1") == "c"
    backend.probes.clear()
    assert await core.session(call(), "s1", "r2") == "c:r2"
    assert backend.probes == []  # the second call is a near-cache hit


async def test_miss_probes_all_pods_once_for_concurrent_callers(core, backend) -> None:
    backend.holds["a"].add("s1")
    backend.probe_gate = asyncio.Event()
    calls = [asyncio.create_task(core.session(call(), "s1", f"r{i}")) for i in range(5)]
    await asyncio.sleep(0)  # every caller reaches the lookup before any probe answers
    for _ in range(3):
        await asyncio.sleep(0)
    backend.probe_gate.set()
    answers = await asyncio.gather(*calls)
    assert answers == [f"a:r{i}" for i in range(5)]
    assert sorted(backend.probes) == [("a", "s1"), ("b", "s1"), ("c", "s1")]


async def test_not_found_everywhere_answers_not_found_and_is_negatively_cached(
    core, backend
) -> None:
    assert await core.session(call(), "ghost", "r") == "not-found:ghost"
    assert len(backend.probes) == 3
    assert await core.session(call(), "ghost", "r") == "not-found:ghost"
    assert len(backend.probes) == 3  # the negative cache answered the second miss
    assert backend.forwards == []


async def test_a_silent_pod_makes_the_session_unknown_never_placed_or_guessed(
    core, backend
) -> None:
    backend.silent.add("b")
    with pytest.raises(NotLocated) as caught:
        await core.session(call(), "s1", "r")
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert caught.value.located.status == UNKNOWN
    assert caught.value.located.unknown_pods == ("b",)
    assert "b" in caught.value.details and "did not answer" in caught.value.details
    assert backend.forwards == []
    assert core.locator.try_cached("s1") is None  # nothing was reserved or cached


async def test_stale_cached_route_is_relocated_and_retried_once(core, backend) -> None:
    core.locator.observe("a", "s1", OPEN)  # the cache says a, but c holds it now
    backend.holds["c"].add("s1")
    the_call = call()
    assert await core.session(the_call, "s1", "r") == "c:r"
    assert [pod for pod, _ in backend.forwards] == ["a", "c"]
    assert the_call.pod == "c"
    assert core.locator.try_cached("s1") == "c"


async def test_stale_route_with_no_other_holder_gives_the_pods_own_answer(core, backend) -> None:
    core.locator.observe("a", "s1", OPEN)  # nobody holds it any more
    with pytest.raises(Abort) as caught:
        await core.session(call(), "s1", "r")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert [pod for pod, _ in backend.forwards] == ["a"]  # never retried on the same pod
    assert core.locator.try_cached("s1") is None


async def test_stale_retry_happens_once_even_if_the_second_pod_is_stale_too(
    core, backend
) -> None:
    core.locator.observe("a", "s1", OPEN)
    backend.holds["c"].add("s1")
    real_forward = backend.forward

    async def forward_then_lose(the_call, pod, request):  # c loses it between probe and call
        if pod == "c":
            backend.holds["c"].discard("s1")
        return await real_forward(the_call, pod, request)

    backend.forward = forward_then_lose  # type: ignore[method-assign]
    with pytest.raises(Abort) as caught:
        await core.session(call(), "s1", "r")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert [pod for pod, _ in backend.forwards] == ["a", "c"]


async def test_start_reserves_forwards_and_confirms(core, backend) -> None:
    the_call = call("Send", "start")
    answer = await core.start(the_call, "new", "start")
    pod = the_call.pod
    assert answer == "ok" and pod in PODS
    assert backend.forwards == [(pod, "start")]
    assert core.locator.near.entry("new") == (pod, OPEN)


async def test_start_refused_by_the_pod_releases_the_reservation(core, backend) -> None:
    for pod in PODS:
        backend.start_answers[pod] = "refused"
    await core.start(call("Send", "start"), "new", "start")
    assert core.locator.near.entry("new") is None
    assert await core.locator.store.get("new") is None


async def test_start_that_never_reached_the_pod_releases_the_reservation(core, backend) -> None:
    for pod in PODS:
        backend.start_answers[pod] = "unreachable"
    with pytest.raises(Abort) as caught:
        await core.start(call("Send", "start"), "new", "start")
    assert caught.value.never_sent
    assert core.locator.near.entry("new") is None
    assert await core.locator.store.get("new") is None


async def test_start_with_an_unreadable_answer_keeps_the_reservation(core, backend) -> None:
    for pod in PODS:
        backend.start_answers[pod] = "unreadable"
    the_call = call("Send", "start")
    with pytest.raises(Abort) as caught:
        await core.start(the_call, "new", "start")
    assert caught.value.code is grpc.StatusCode.INTERNAL
    assert core.locator.near.entry("new") == (the_call.pod, RESERVED)  # left to its TTL


async def test_start_of_a_known_session_goes_to_its_pod_and_releases_nothing(
    core, backend
) -> None:
    core.locator.observe("b", "s1", OPEN)
    backend.start_answers["b"] = "refused"  # e.g. SESSION_ALREADY_EXISTS read as refused
    the_call = call("Send", "start")
    await core.start(the_call, "s1", "start")
    assert the_call.pod == "b"
    assert core.locator.near.entry("s1") == ("b", OPEN)  # not ours to release


async def test_start_without_a_placeable_pod_is_unavailable_naming_why(roster, backend) -> None:
    roster.draining.update(PODS)
    core = SessionRouter(make_locator(roster, backend), backend,
                         why_not_placeable=lambda: " (a: draining)")
    with pytest.raises(Abort) as caught:
        await core.start(call("Send", "start"), "new", "start")
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert "(a: draining)" in caught.value.details and "retry" in caught.value.details
    assert backend.forwards == []


async def test_start_without_a_session_id_is_invalid_and_never_placed(core, backend) -> None:
    with pytest.raises(Abort) as caught:
        await core.start(call("Send", "start"), "", "start")
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert backend.forwards == [] and len(core.locator.near) == 0


async def test_locate_reports_live_not_found_and_unknown(core, backend) -> None:
    backend.holds["a"].add("s1")
    assert await core.locate(call(), "s1") == "a"
    assert await core.locate(call(), "nobody") is None
    backend.silent.add("c")
    with pytest.raises(NotLocated):
        await core.locate(call(), "other", use_negative=False)
    assert {LIVE, NOT_FOUND, UNKNOWN} == {"live", "not_found", "unknown"}


async def test_route_of_a_cached_session_is_a_counted_near_cache_hit_with_no_probe(
    core, backend,
) -> None:
    core.locator.observe("b", "s1", OPEN)
    the_call = call("session/prompt", "session")
    located = await core.route(the_call, "s1")
    assert (located.status, located.pod, the_call.pod, the_call.sid) == (LIVE, "b", "b", "s1")
    assert backend.probes == [] and backend.forwards == []
    hits = core.locator.metrics.registry.get_sample_value(
        "macp_router_locate_total", {"protocol": "macp", "result": "hit"})
    assert hits == 1
    backend.silent.add("c")
    with pytest.raises(NotLocated):  # a miss with a silent pod is unknown, never a guess
        await core.route(call(), "s2")


async def test_choose_skips_pods_already_tried_and_reserves_nothing(core, roster) -> None:
    the_call = call("session/new", "new")
    assert core.choose(the_call, exclude=("a", "b")) == "c" == the_call.pod
    assert core.locator.near.open_counts() == {} and len(core.locator.near) == 0
    roster.draining.add("c")
    with pytest.raises(NoPlaceablePod):
        core.choose(the_call, exclude=("a", "b"))


async def test_adopt_reserves_a_pod_minted_id_in_the_store_and_confirms_it(core) -> None:
    assert await core.adopt(call("session/new", "new"), "minted", "b") == "b"
    location = await core.locator.store.get("minted")
    assert location is not None and (location.pod, location.state) == ("b", RESERVED)
    assert core.locator.near.entry("minted") == ("b", OPEN)
    await core.locator.store.reserve("taken", "a")
    assert await core.adopt(call("session/new", "new"), "taken", "c") == "a"
    assert core.locator.try_cached("taken") == "a"
