"""Connection limits: the runtime allows 128 concurrent streams per connection (and serves 64
requests per connection at a time); the router's channel pool grows with load so 300 streams
plus unary load to one pod all succeed, and health checks (own channel) never flap the pod.

The simulated pod enforces the stream cap with the HTTP/2 setting, as tonic does: a 129th stream
on one connection waits for a free slot. Real gRPC on loopback, deadlines on every call.
"""

from __future__ import annotations

import asyncio

import grpc
from macp.v1 import core_pb2, core_pb2_grpc

from router.pods import STREAM_SOFT_LIMIT, Pod, PodSpec
from tests.macp_calls import METADATA, TIMEOUT, proposal_envelope, send, start
from tests.waiting import eventually

OBSERVER = (("authorization", "Bearer observer"),)


async def open_subscription(stub: core_pb2_grpc.MACPRuntimeServiceStub, sid: str,
                            timeout: float = TIMEOUT * 3) -> grpc.aio.StreamStreamCall:
    """A StreamSession subscribed to `sid`; returns once the replayed start arrived."""
    call = stub.StreamSession(metadata=OBSERVER, timeout=timeout)
    await call.write(core_pb2.StreamSessionRequest(subscribe_session_id=sid))
    reply = await call.read()
    assert reply is not grpc.aio.EOF and reply.envelope.message_type == "SessionStart", reply
    return call


async def test_300_streams_and_unary_load_to_one_pod_all_succeed_without_health_flaps(
    sim_pods, make_router
):
    (pod,) = await sim_pods(1)
    router = await make_router([pod], channels_per_pod=1)
    routed = router.pods.get(pod.name)
    assert routed is not None and routed.channel_count == 1
    flaps: list[bool] = []
    router.pods.on_health_change.append(lambda p: flaps.append(p.healthy))

    # Three client connections (the router allows 256 streams per client connection); a
    # local subchannel pool each, or grpc would share one connection between them.
    channels = [grpc.aio.insecure_channel(router.address,
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(3)]
    try:
        sid = await start(channels[0])
        stubs = [core_pb2_grpc.MACPRuntimeServiceStub(channel) for channel in channels]

        async def unary_load() -> int:
            answered = 0
            for _ in range(5):
                replies = await asyncio.gather(*(
                    stubs[i % 3].GetSession(core_pb2.GetSessionRequest(session_id=sid),
                                            metadata=METADATA, timeout=TIMEOUT)
                    for i in range(60)))
                answered += sum(r.metadata.session_id == sid for r in replies)
            return answered

        streams_task = asyncio.gather(*(open_subscription(stubs[i % 3], sid)
                                        for i in range(300)))
        calls, answered = await asyncio.gather(streams_task, unary_load())
        assert len(calls) == 300 and answered == 300
        assert routed.in_flight()[1] == 300 + 1  # every stream open upstream, and the feed
        assert routed.channel_count >= 3  # 300 streams need 3+ connections of at most 128
        assert routed.healthy and flaps == []

        # The streams still relay: a message sent now reaches every subscriber.
        proposal = proposal_envelope(sid)
        assert (await send(channels[0], proposal)).ok
        relayed = await asyncio.gather(*(call.read() for call in calls))
        assert all(r.envelope.message_id == proposal.message_id for r in relayed)
        for call in calls:
            call.cancel()
    finally:
        for channel in channels:
            await channel.close()
    assert routed.healthy and flaps == []


async def test_one_connection_to_the_pod_holds_at_most_128_streams(sim_pods, make_router):
    """Why the pool must grow: on one connection the 129th stream gets no answer (it waits for
    a free stream slot), which is the runtime's limit the simulated pod enforces."""
    (pod,) = await sim_pods(1)
    router = await make_router([pod])
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await start(channel)
    single = Pod(PodSpec(pod.name, pod.address), channels=1, max_channels=1)
    calls = []
    try:
        path = "/macp.v1.MACPRuntimeService/StreamSession"
        for _ in range(128):
            call = single.stream_stream(path)(metadata=OBSERVER, timeout=TIMEOUT)
            await call.write(core_pb2.StreamSessionRequest(subscribe_session_id=sid)
                             .SerializeToString())
            calls.append(call)
        firsts = await asyncio.gather(*(call.read() for call in calls))
        assert all(isinstance(raw, bytes) for raw in firsts)
        extra = single.stream_stream(path)(metadata=OBSERVER, timeout=TIMEOUT)
        calls.append(extra)
        writer = asyncio.ensure_future(extra.write(core_pb2.StreamSessionRequest(
            subscribe_session_id=sid).SerializeToString()))
        read = asyncio.ensure_future(extra.read())
        done, _ = await asyncio.wait({read}, timeout=2)
        assert not done, "a 129th stream on one connection was answered"
        calls[0].cancel()  # a slot frees up: the waiting stream goes through
        assert isinstance(await asyncio.wait_for(read, TIMEOUT), bytes)
        await writer
    finally:
        for call in calls:
            call.cancel()
        await single.aclose()


async def test_the_pool_shrinks_back_once_the_added_connections_are_idle(sim_pods, make_router):
    (pod,) = await sim_pods(1)
    router = await make_router([pod])
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await start(channel)
    pooled = Pod(PodSpec(pod.name, pod.address), channels=1, max_channels=4,
                 idle_close_s=0.3, health_interval_s=0.1)
    pooled.start()
    calls = []
    try:
        path = "/macp.v1.MACPRuntimeService/StreamSession"
        for _ in range(150):
            call = pooled.stream_stream(path)(metadata=OBSERVER, timeout=TIMEOUT)
            await call.write(core_pb2.StreamSessionRequest(subscribe_session_id=sid)
                             .SerializeToString())
            calls.append(call)
        assert all(isinstance(raw, bytes) for raw in
                   await asyncio.gather(*(call.read() for call in calls)))
        assert pooled.channel_count == 2
        for call in calls:
            call.cancel()
        await eventually(lambda: pooled.channel_count == 1 and pooled.in_flight() == (0, 0),
                         what="the idle added connection closed")
        # And it grows again when needed.
        more = [pooled.stream_stream(path)(metadata=OBSERVER, timeout=TIMEOUT)
                for _ in range(STREAM_SOFT_LIMIT + 1)]
        calls += more
        assert pooled.channel_count == 2
    finally:
        for call in calls:
            call.cancel()
        await pooled.aclose()
