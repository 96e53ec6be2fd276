"""Routers sharing a real Redis: atomic placement across replicas, store hits, Redis faults."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from router.redis_store import entry_key
from router.sim import SimPod
from tests import macp_calls
from tests.procs import router_process
from tests.waiting import eventually


def holders(pods: list[SimPod], sid: str) -> list[str]:
    return [pod.name for pod in pods if sid in pod.sessions]


def pod_list(pods: list[SimPod]) -> str:
    return ",".join(f"{pod.name}={pod.address}" for pod in pods)


@pytest.mark.parametrize("topology", ["redis_url", "redis_cluster_url"])
async def test_two_router_processes_racing_200_starts_place_each_session_once(
    sim_pods, tmp_path, request, topology
):
    redis_url = request.getfixturevalue(topology)
    pods = await sim_pods(3, start_limit_per_minute=10_000)  # 400 starts from one sender
    first, first_address = router_process(tmp_path, pod_list(pods), "--redis-url", redis_url,
                                          name="r1")
    second, second_address = router_process(tmp_path, pod_list(pods), "--redis-url", redis_url,
                                            name="r2")
    await asyncio.to_thread(first.start)
    await asyncio.to_thread(second.start)
    try:
        async with (grpc.aio.insecure_channel(first_address) as one,
                    grpc.aio.insecure_channel(second_address) as two):

            async def race(sid: str) -> list:
                envelope = macp_calls.start_envelope(sid)
                return await asyncio.gather(
                    macp_calls.send(one, envelope), macp_calls.send(two, envelope),
                    return_exceptions=True,
                )

            sids = [str(uuid.uuid4()) for _ in range(200)]
            results = await asyncio.gather(*(race(sid) for sid in sids))
        errors = [r for pair in results for r in pair if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        for sid, (ack_one, ack_two) in zip(sids, results, strict=True):
            # One router's start created it; the other reached the same pod (duplicate message).
            assert ack_one.ok and ack_two.ok, (sid, ack_one, ack_two)
            assert len(holders(pods, sid)) == 1, (sid, holders(pods, sid))
        assert len({holders(pods, sid)[0] for sid in sids}) >= 2
    finally:
        first.terminate()
        second.terminate()


async def test_router_b_routes_a_session_router_a_placed_from_the_store_without_probing(
    sim_pods, make_router, redis_url
):
    pods = await sim_pods(3)
    router_a = await make_router(pods, redis_url=redis_url)
    router_b = await make_router(pods, redis_url=redis_url)
    for feed in list(router_b.feeds.values()):
        await feed.aclose()  # B can only learn from the store now
    async with grpc.aio.insecure_channel(router_a.address) as channel_a:
        sid = await macp_calls.start(channel_a)
    await router_a.locator.flush()
    probes_before = sum(pod.calls["GetSession"] for pod in pods)
    async with grpc.aio.insecure_channel(router_b.address) as channel_b:
        ack = await macp_calls.send(channel_b, macp_calls.proposal_envelope(sid))
    assert ack.ok, ack
    assert sum(pod.calls["GetSession"] for pod in pods) == probes_before
    samples = router_b.metrics.registry
    assert samples.get_sample_value(
        "macp_router_locate_total", {"protocol": "macp", "result": "store_hit"}) == 1
    assert not samples.get_sample_value("macp_router_probe_fanouts_total", {"protocol": "macp"})


@pytest.mark.parametrize(("servers", "topology"), [("redis_server", "redis_url"),
                                                    ("redis_cluster", "redis_cluster_url")])
async def test_cache_hits_send_zero_redis_commands(sim_pods, make_router, request, servers,
                                                   topology):
    redis_url = request.getfixturevalue(topology)
    redis_server = request.getfixturevalue(servers)  # every node of a cluster is counted
    pods = await sim_pods(3)
    router = await make_router(pods, redis_url=redis_url)
    async with grpc.aio.insecure_channel(router.address) as channel:
        sids = [await macp_calls.start(channel) for _ in range(5)]
        await router.locator.flush()
        for sid in sids:  # wait until the feeds have confirmed and written everything
            await eventually(lambda s=sid: router.locator.near.entry(s) == (holders(pods, s)[0],
                                                                              "open"))
        await router.locator.flush()
        # The start's own confirm already made the near-cache entry "open"; the feed's CREATED
        # event (one per session) is written again when it arrives. Only then is nothing left.
        await eventually(lambda: sum(f.applied_events for f in router.feeds.values())
                         >= len(sids), what="every CREATED event applied")
        await router.locator.flush()
        # The store's background health PING and marker EXISTS run on a timer, not per hit, and
        # so do a replica's REPLCONF ACK (every second) and its master's PINGs; every other
        # command, connection handshakes included, counts.
        background = {"ping", "exists", "replconf"}
        with redis_server.command_counter() as counter:
            # flush() returns once nothing is pending, not once the write loop's own batch in
            # flight has landed: wait until Redis has seen no command for 300 ms.
            before = await eventually(lambda: _quiet(counter, background), what="store idle")
            for _ in range(20):
                for sid in sids:
                    assert (await macp_calls.send(channel, macp_calls.proposal_envelope(sid))).ok
                    await macp_calls.get_session(channel, sid)
            after = counter.sample()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if k not in background}
    assert sum(delta.values()) == 0, f"Redis commands during 200 cache hits: {delta}"


async def _quiet(counter, background: set[str]) -> dict[str, int] | None:  # type: ignore[no-untyped-def]
    """The counts when no command (but `background`) ran for 300 ms, else None."""
    first = counter.sample()
    await asyncio.sleep(0.3)
    second = counter.sample()
    moved = [k for k in second if k not in background and second[k] != first.get(k, 0)]
    return None if moved else second


async def test_router_restart_with_redis_needs_no_probe_for_known_sessions(
    sim_pods, make_router, redis_url
):
    pods = await sim_pods(3)
    router = await make_router(pods, redis_url=redis_url)
    async with grpc.aio.insecure_channel(router.address) as channel:
        sids = [await macp_calls.start(channel) for _ in range(10)]
    await router.locator.flush()
    await router.stop(grace=0)

    restarted = await make_router(pods, redis_url=redis_url, wait=False)
    probes_before = sum(pod.calls["GetSession"] for pod in pods)
    async with grpc.aio.insecure_channel(restarted.address) as channel:
        for sid in sids:
            assert (await macp_calls.send(channel, macp_calls.proposal_envelope(sid))).ok
    assert sum(pod.calls["GetSession"] for pod in pods) == probes_before
    assert not restarted.metrics.registry.get_sample_value(
        "macp_router_probe_fanouts_total", {"protocol": "macp"})


async def test_redis_killed_and_restarted_routing_continues_and_store_is_repopulated(
    sim_pods, make_router, redis_server_factory
):
    server = redis_server_factory()
    pods = await sim_pods(3)
    router = await make_router(pods, redis_url=server.url)
    async with grpc.aio.insecure_channel(router.address) as channel:
        known = [await macp_calls.start(channel) for _ in range(6)]
        await router.locator.flush()

        server.kill()
        # Known sessions keep routing from the near-cache; new starts still work.
        for sid in known:
            assert (await macp_calls.send(channel, macp_calls.proposal_envelope(sid))).ok
        fresh = [await macp_calls.start(channel) for _ in range(4)]
        for sid in fresh:
            assert len(holders(pods, sid)) == 1
            assert (await macp_calls.send(channel, macp_calls.proposal_envelope(sid))).ok
        await eventually(lambda: router.store.degraded, what="store degraded")
        assert router.metrics.registry.get_sample_value("macp_router_store_degraded") == 1 or \
            router.store.degraded

        server.start()  # same port
        await eventually(lambda: not router.store.degraded, timeout=15, what="store recovered")
        with server.client() as client:
            await eventually(
                lambda: all(client.exists(entry_key(sid)) for sid in known + fresh),
                timeout=10, what="store repopulated",
            )
        for sid in known + fresh:
            assert (await macp_calls.send(channel, macp_calls.proposal_envelope(sid))).ok


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "notaurl://x"])
async def test_unusable_redis_at_startup(sim_pods, make_router, url):
    pods = await sim_pods(1)
    if url.startswith("notaurl"):
        with pytest.raises(ValueError):
            await make_router(pods, redis_url=url)
        return
    router = await make_router(pods, redis_url=url)  # starts degraded, still routes
    assert router.store.degraded
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await macp_calls.start(channel)
        assert (await macp_calls.send(channel, macp_calls.proposal_envelope(sid))).ok


async def test_flushed_redis_is_repopulated_from_the_near_cache(sim_pods, redis_server_factory):
    from router.app import Router
    from router.config import RouterConfig
    from router.pods import PodSpec

    server = redis_server_factory()
    pods = await sim_pods(2)
    config = RouterConfig(listen="127.0.0.1:0", token="router", redis_url=server.url,
                          pods=tuple(PodSpec(p.name, p.address) for p in pods))
    router = Router(config)
    router.store._link.marker_interval_s = 0.2  # type: ignore[attr-defined]
    await router.start()
    try:
        assert await router.wait_ready(10)
        async with grpc.aio.insecure_channel(router.address) as channel:
            sids = [await macp_calls.start(channel) for _ in range(5)]
        await router.locator.flush()
        server.flushall()
        with server.client() as client:
            await eventually(
                lambda: all(client.exists(entry_key(sid)) for sid in sids),
                timeout=10, what="store repopulated after FLUSHALL",
            )
    finally:
        await router.stop(grace=0)


async def test_a_drain_on_one_router_applies_to_every_router_sharing_redis(
    sim_pods, make_router, redis_url
):
    from router.v1 import router_pb2, router_pb2_grpc

    pods = await sim_pods(3)
    router_a = await make_router(pods, redis_url=redis_url, drain_sync_s=0.1)
    router_b = await make_router(pods, redis_url=redis_url, drain_sync_s=0.1)
    async with grpc.aio.insecure_channel(router_a.address) as channel:
        await router_pb2_grpc.RouterAdminStub(channel).DrainPod(
            router_pb2.DrainPodRequest(name="b"), timeout=5)
    await eventually(lambda: router_b.pods.get("b").draining, what="b drained on router B")  # type: ignore[union-attr]
    async with grpc.aio.insecure_channel(router_b.address) as channel:
        sids = [await macp_calls.start(channel) for _ in range(12)]
    assert not any(sid in pods[1].sessions for sid in sids)
    async with grpc.aio.insecure_channel(router_b.address) as channel:
        await router_pb2_grpc.RouterAdminStub(channel).UndrainPod(
            router_pb2.DrainPodRequest(name="b"), timeout=5)
    await eventually(lambda: not router_a.pods.get("b").draining, what="undrained on A")  # type: ignore[union-attr]
