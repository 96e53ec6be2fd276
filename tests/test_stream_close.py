"""How a relayed StreamSession ends: a client's half-close reaches the pod at once, a client's
cancel reaches it as a cancel.

grpc.aio gives a stream handler the same end-of-stream for both; the router must still pass a
half-close on without holding it (a stream through the router ends about as soon as one on the
pod itself) and a cancel on as a cancel (the pod drops the stream instead of finishing it).
Real simulated pods and an in-process router on loopback, every call with a deadline.
"""

from __future__ import annotations

import time

import grpc
from macp.v1 import core_pb2

from router.store import OPEN
from tests.macp_calls import METADATA, TIMEOUT, proposal_envelope, start, stub
from tests.waiting import eventually

STREAMS = 5
ROUTER_ALLOWANCE_S = 0.025
"""What the router may add to a half-closed stream's end (one hop on a busy loopback). A router
that holds a half-close on a timer adds its timer (50 ms before) to every stream."""


async def _half_close_to_end_s(channel: grpc.aio.Channel, sid: str) -> float:
    """One StreamSession: a Proposal and its echo, then the seconds from half-close to OK."""
    call = stub(channel).StreamSession(metadata=METADATA, timeout=TIMEOUT)
    proposal = proposal_envelope(sid)
    await call.write(core_pb2.StreamSessionRequest(envelope=proposal))
    assert (await call.read()).envelope.message_id == proposal.message_id
    started = time.perf_counter()
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() is grpc.StatusCode.OK
    return time.perf_counter() - started


async def test_a_half_closed_stream_ends_as_soon_through_the_router_as_on_the_pod(
    sim_pods, make_router
) -> None:
    (pod,) = await sim_pods(1)
    router = await make_router([pod])
    async with (grpc.aio.insecure_channel(router.address) as routed,
                grpc.aio.insecure_channel(pod.address) as direct):
        sid = await start(routed)
        on_pod = [await _half_close_to_end_s(direct, sid) for _ in range(STREAMS)]
        through = [await _half_close_to_end_s(routed, sid) for _ in range(STREAMS)]
    # The fastest of several streams: a busy machine slows some, never all of them.
    assert min(through) < min(on_pod) + ROUTER_ALLOWANCE_S, (
        f"half-close to end: router {[round(t * 1000, 1) for t in through]} ms, "
        f"pod {[round(t * 1000, 1) for t in on_pod]} ms")
    assert pod.cancelled_calls["StreamSession"] == 0  # every half-close arrived as one


async def test_every_cancelled_stream_reaches_the_pod_as_a_cancel(sim_pods, make_router) -> None:
    (pod,) = await sim_pods(1)
    router = await make_router([pod])
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await start(channel)
        for n in range(1, STREAMS + 1):
            call = stub(channel).StreamSession(metadata=METADATA, timeout=TIMEOUT)
            await call.write(core_pb2.StreamSessionRequest(envelope=proposal_envelope(sid)))
            await call.read()  # the pod's handler is running
            call.cancel()
            assert await call.code() is grpc.StatusCode.CANCELLED
            await eventually(lambda n=n: pod.cancelled_calls["StreamSession"] >= n,
                             what=f"the pod saw cancel {n} as a cancel")
        await eventually(lambda: not pod.sessions[sid].subs, what="the pod released every stream")


async def test_a_stream_half_closed_before_a_stale_answer_is_moved_and_ends_on_the_holder(
    sim_pods, make_router
) -> None:
    """The half-close goes upstream at once, before the stale pod's first answer: the moved
    stream gets the kept frames and the half-close too, and ends OK on the holder."""
    a, b = await sim_pods(2)
    router = await make_router([a, b])
    async with grpc.aio.insecure_channel(b.address) as direct:
        sid = await start(direct)
    for feed in router.feeds.values():  # no feed corrects the route: only the stream can
        await feed.aclose()
    router.locator.near.set(sid, "a", OPEN)
    async with grpc.aio.insecure_channel(router.address) as channel:
        call = stub(channel).StreamSession(metadata=METADATA, timeout=TIMEOUT)
        proposal = proposal_envelope(sid)
        await call.write(core_pb2.StreamSessionRequest(envelope=proposal))
        await call.done_writing()
        answer = await call.read()
        assert answer.envelope.message_id == proposal.message_id, answer  # the holder's echo
        assert await call.read() is grpc.aio.EOF
        assert await call.code() is grpc.StatusCode.OK
    assert router.locator.try_cached(sid) == "b"
    assert [env.message_id for env in b.sessions[sid].log[1:]] == [proposal.message_id]
    assert a.calls["StreamSession"] == 1 and b.calls["StreamSession"] == 1
