"""Faults of the shared store and of the routers themselves, under traffic.

Routers are `macp-router serve` processes sharing one real Redis; pods are in-process SimPods
(their records are the ground truth). Traffic mixes Send/GetSession on known sessions, new
SessionStarts, and *racing* starts: the same SessionStart sent through both routers at once (a
client retrying on another replica). Every check asks the pods: no session on two pods
(duplicate placement), no acked session missing (lost), no call answered not-found for a
session that exists (misroute), and every session routes through every router at the end.
"""

from __future__ import annotations

import time

import grpc

from router.redis_store import entry_key
from router.v1 import router_pb2
from tests.faults.conftest import (
    LOAD_LIMITS,
    Traffic,
    admin_stub,
    checked_outcome,
    eventually,
    report,
    start_sessions,
)

CLIENT_BACKOFF_S = 0.5  # the traffic clients' reconnect backoff (<= 250 ms) plus slack
# What a client sees from grpc when the router process is gone (not the router's own status).
CONNECTION_LOST = ("failed to connect", "Connection refused", "Socket closed",
                   "Connection reset", "Stream removed")


def pod_list(pods) -> str:  # type: ignore[no-untyped-def]
    return ",".join(f"{pod.name}={pod.address}" for pod in pods)


async def store_degraded(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await admin_stub(channel).ListPods(router_pb2.ListPodsRequest(), timeout=5)
    return reply.store_degraded


async def test_redis_killed_and_restarted_under_traffic_with_two_routers(
    sim_pods, routers, redis_proc
):
    server = redis_proc
    pods = await sim_pods(3, **LOAD_LIMITS)
    one = await routers.start(pod_list(pods), "--redis-url", server.url, name="r1")
    two = await routers.start(pod_list(pods), "--redis-url", server.url, name="r2")
    initial = await start_sessions(one.address, 20)
    async with Traffic([one.address, two.address], initial, workers=6, starts=0.08,
                       races=0.08) as traffic:
        await traffic.hold(1.0)
        # The instants Redis dies and comes back are left out for starts: a start racing
        # through both routers in the very millisecond one of them still reaches Redis and the
        # other no longer (or not yet) does has nothing to arbitrate it (see README).
        await traffic.pause_starts()
        server.kill()
        killed_at = time.monotonic()
        traffic.resume_starts()  # from now on every reservation fails on both routers
        await traffic.hold(1.5)
        await traffic.pause_starts()
        server.start()  # same port, empty (no persistence)
        back_at = time.monotonic()
        traffic.resume_starts()  # while the routers still think the store is down
        for router in (one, two):
            await eventually(lambda r=router: _not(store_degraded(r.address)), timeout=15,
                             what=f"{router.address} recovered the store")
        recovered_at = time.monotonic()
        await traffic.hold(1.0)
    result = await checked_outcome(pods, traffic, [one, two], initial)
    assert traffic.errors() == {}, traffic.errors()
    # The store was refilled from the routers' near-caches (it came back empty).
    with server.client() as client:
        missing = [sid for sid in result.held if not client.exists(entry_key(sid))]
    assert not missing, missing[:3]
    report(result.row(
        traffic,
        fault=f"Redis SIGKILLed for {back_at - killed_at:.1f} s, restarted empty; 2 routers",
        recovery=f"routers out of degraded mode {recovered_at - back_at:.2f} s after Redis "
                 "was back; store refilled",
    ))


async def test_redis_flushed_under_traffic_with_two_routers(sim_pods, routers,
                                                            redis_proc):
    server = redis_proc
    pods = await sim_pods(3, **LOAD_LIMITS)
    one = await routers.start(pod_list(pods), "--redis-url", server.url, name="r1")
    two = await routers.start(pod_list(pods), "--redis-url", server.url, name="r2")
    initial = await start_sessions(one.address, 20)
    async with Traffic([one.address, two.address], initial, workers=6, starts=0.08,
                       races=0.08) as traffic:
        await traffic.hold(1.0)
        # As for a kill: a start racing through both routers across the flush instant (one
        # reservation wiped, the other made after it) has nothing left to arbitrate it.
        await traffic.pause_starts()
        server.flushall()
        flushed_at = time.monotonic()
        traffic.resume_starts()  # the store is empty now: every race reserves in it afresh
        with server.client() as client:
            def refilled() -> bool:
                return all(client.exists(entry_key(sid)) for sid in list(traffic.known))

            await eventually(refilled, timeout=15, what="store refilled after FLUSHALL",
                             interval=0.1)
        refilled_at = time.monotonic()
        await traffic.hold(1.0)
    result = await checked_outcome(pods, traffic, [one, two], initial)
    assert traffic.errors() == {}, traffic.errors()
    report(result.row(
        traffic,
        fault="Redis FLUSHALL mid-run; 2 routers",
        recovery=f"every session back in the store {refilled_at - flushed_at:.2f} s "
                 "after the flush",
    ))


async def test_router_killed_and_restarted_under_traffic(sim_pods, routers,
                                                         redis_proc):
    server = redis_proc
    pods = await sim_pods(3, **LOAD_LIMITS)
    router = await routers.start(pod_list(pods), "--redis-url", server.url)
    initial = await start_sessions(router.address, 20)
    async with Traffic([router.address], initial, workers=6, starts=0.1) as traffic:
        await traffic.hold(1.0)
        router.process.kill()
        killed_at = time.monotonic()
        await traffic.hold(1.0)
        router = await routers.restart(router, pod_list(pods), wait=False)
        ready_at = time.monotonic()
        await traffic.hold(1.5)
    result = await checked_outcome(pods, traffic, [router], initial)
    failures = [call for call in traffic.calls if not call.ok]
    # Only while the router was away (plus the client's own reconnect backoff, at most
    # CLIENT_BACKOFF_S): the client could not connect (UNAVAILABLE); the starts that failed
    # were retried by the client until they were acked.
    assert {call.code for call in failures} <= {"UNAVAILABLE"}, traffic.errors()
    assert all(killed_at - 0.1 <= call.ended <= ready_at + CLIENT_BACKOFF_S
               for call in failures)
    assert all(any(mark in call.details for mark in CONNECTION_LOST) for call in failures), [
        call.details for call in failures if not any(m in call.details for m in CONNECTION_LOST)]
    assert not traffic.failed_starts
    after = [call for call in traffic.calls if call.started > ready_at + CLIENT_BACKOFF_S]
    assert after and all(call.ok for call in after)
    last_failure = max((call.ended for call in failures), default=ready_at)
    report(result.row(
        traffic,
        fault=f"router SIGKILLed, restarted on the same port {ready_at - killed_at:.1f} s later "
              "(Redis store)",
        recovery=f"last client failure {max(0.0, last_failure - ready_at):.2f} s after the "
                 "restarted router was ready (client reconnect backoff)",
    ))


async def test_one_of_two_routers_killed_under_traffic(sim_pods, routers,
                                                       redis_proc):
    server = redis_proc
    pods = await sim_pods(3, **LOAD_LIMITS)
    one = await routers.start(pod_list(pods), "--redis-url", server.url, name="r1")
    two = await routers.start(pod_list(pods), "--redis-url", server.url, name="r2")
    initial = await start_sessions(one.address, 20)
    async with Traffic([one.address, two.address], initial, workers=6, starts=0.08,
                       races=0.08, failover=True) as traffic:
        await traffic.hold(1.0)
        one.process.kill()
        killed_at = time.monotonic()
        await traffic.hold(1.5)
    result = await checked_outcome(pods, traffic, [one, two], initial)
    failures = [call for call in traffic.calls if not call.ok]
    # Calls to the dead replica fail to connect; the client's failover to r2 succeeds.
    assert {call.code for call in failures} <= {"UNAVAILABLE"}, traffic.errors()
    assert all(call.router == one.address and call.ended >= killed_at for call in failures)
    after = [call for call in traffic.calls if call.router == two.address
             and call.started > killed_at]
    assert after and all(call.ok for call in after)
    assert not traffic.failed_starts
    report(result.row(
        traffic,
        fault="one of 2 routers (shared Redis) SIGKILLed; clients fail over",
        recovery="immediate: every failed call on r1 was answered by r2 on failover",
    ))


async def _not(awaitable) -> bool:  # type: ignore[no-untyped-def]
    return not await awaitable
