"""Bounded memory through a real router: the near-cache bound costs only misses, and ended
sessions leave the near-cache and the in-memory store after --retention-s.

Real grpc.aio servers on loopback (simulated pods, an in-process router with its default
in-memory store), raw `MACPRuntimeService` calls with a deadline each. Sizes and counters are
read from the router's own metrics registry, as a scrape would read them.
"""

from __future__ import annotations

import uuid

import grpc
from macp.v1 import envelope_pb2

from router.app import Router
from router.pods import PodSpec
from router.sim import SimPod
from tests.macp_calls import AGENT, MODE, get_session, proposal_envelope, send, start
from tests.waiting import eventually


def value(router: Router, name: str, **labels: str) -> float:
    found = router.metrics.registry.get_sample_value(name, labels)
    assert found is not None, f"{name}{labels} is not exported"
    return found


def commitment(sid: str) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope(
        macp_version="1.0", mode=MODE, message_type="Commitment", message_id=str(uuid.uuid4()),
        session_id=sid, sender=AGENT, payload=b"")


def holder(pods: list[SimPod], sid: str) -> SimPod:
    (pod,) = [pod for pod in pods if sid in pod.sessions]
    return pod


async def test_sessions_evicted_from_a_full_near_cache_still_route_to_their_pods(
        sim_pods, make_router) -> None:
    """Eight sessions through a router whose near-cache (and in-memory store) hold three: the
    five evicted ones are still answered by their own pods, each found by one probe round;
    neither structure ever holds more than its bound."""
    pods = await sim_pods(2, start_limit_per_minute=1000)
    router = await make_router(pods, cache_max_sessions=3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        sids = [await start(channel) for _ in range(8)]
        await eventually(lambda: value(router, "macp_router_cache_evictions_total",
                                       protocol="macp", reason="live") >= 5,
                         timeout=5, what="five live sessions evicted")
        await router.locator.flush()
        assert len(router.locator.near) <= 3
        assert value(router, "macp_router_store_entries", protocol="macp") <= 3
        evicted = [sid for sid in sids if router.locator.try_cached(sid) is None]
        assert len(evicted) >= 5
        probe_hits = value(router, "macp_router_locate_total", protocol="macp",
                           result="probe_hit")
        first = evicted[0]
        reply = await get_session(channel, first)
        assert reply.metadata.session_id == first
        assert value(router, "macp_router_locate_total", protocol="macp",
                     result="probe_hit") == probe_hits + 1
        second = evicted[1]
        owner = holder(pods, second)
        sends_before = owner.calls["Send"]
        ack = await send(channel, proposal_envelope(second))
        assert ack.ok, ack
        assert owner.calls["Send"] == sends_before + 1  # the proposal reached its own pod
        assert value(router, "macp_router_locate_total", protocol="macp",
                     result="probe_hit") == probe_hits + 2
        await router.locator.flush()
        assert len(router.locator.near) <= 3
        assert value(router, "macp_router_store_entries", protocol="macp") <= 3


async def test_ended_sessions_leave_the_near_cache_and_the_memory_store_after_retention(
        sim_pods, make_router) -> None:
    pods = await sim_pods(2, start_limit_per_minute=1000)
    router = await make_router(pods, retention_s=1.0)
    assert router.supervisor.running("store_sweeper:macp")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        sids = [await start(channel) for _ in range(4)]
        await router.locator.flush()
        assert value(router, "macp_router_store_entries", protocol="macp") == 4
        for sid in sids[:3]:
            ack = await send(channel, commitment(sid))
            assert ack.ok and ack.session_state == envelope_pb2.SESSION_STATE_RESOLVED, ack
        # Ended: remembered for the retention (a call on it gets its pod's own answer) ...
        await eventually(lambda: sum(n for (_, state), n in router.locator.near.counts().items()
                                     if state == "resolved") == 3,
                         timeout=5, what="the feeds reported three resolved sessions")
        # ... then gone from both, with nobody reading them again.
        await eventually(lambda: value(router, "macp_router_store_entries",
                                       protocol="macp") == 1,
                         timeout=10, what="the store sweeper removed the ended sessions")
        await eventually(lambda: len(router.locator.near) == 1, timeout=10,
                         what="the near-cache sweeper removed the ended sessions")
        assert value(router, "macp_router_cache_evictions_total", protocol="macp",
                     reason="expired") >= 3
        assert (await get_session(channel, sids[3])).metadata.session_id == sids[3]


async def test_pods_that_left_leave_no_replay_lock_behind(sim_pods, make_router) -> None:
    """Pod names churn with discovery; the registry replay kept one lock per pod ever seen."""
    pods = await sim_pods(3)
    router = await make_router(pods[:1])
    locks = router.proxy.broadcasts._replay_locks
    await eventually(lambda: set(locks) == {"a"}, timeout=10, what="pod a's replay ran")
    for pod in pods[1:]:  # b joins and leaves, then c joins: its replay tidies up
        router.pods.add(PodSpec(pod.name, pod.address))
        await eventually(lambda name=pod.name: name in locks, timeout=10,
                         what=f"pod {pod.name}'s replay ran")
        if pod is pods[1]:
            await router.pods.remove(pod.name)
    assert set(locks) == {"a", "c"}
