"""A GetSession on a session the router does not know is answered by its own probe fan-out.

The client's request and credentials go to every pod as the probe; the holder's answer to it
(OK, or PERMISSION_DENIED: here, but not this client's) is the client's reply, and when no pod
holds the session a pod's own NOT_FOUND is. So a miss costs one call per pod and no forward
after it. Callers that join a fan-out already in flight are forwarded with their own
credentials. Real simulated pods (`SimPod.calls` counts what each pod received) and an
in-process router on loopback, every call with a deadline.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from macp.v1 import core_pb2

from router.app import Router
from router.sim import SimPod
from tests.macp_calls import TIMEOUT, start, stub
from tests.waiting import eventually

COORDINATOR = (("authorization", "Bearer coordinator"),)
"""The session's initiator: GetSession is answered OK."""
OUTSIDER = (("authorization", "Bearer outsider"),)
"""An authenticated agent outside the session: PERMISSION_DENIED."""
UNKNOWN_TOKEN = (("authorization", "Bearer nobody-configured-this"),)
"""A token no pod knows: UNAUTHENTICATED, which says nothing about where the session is."""


async def forget_feeds(router: Router) -> None:
    """Stop learning from the pods' feeds: sessions started from now on are misses."""
    for feed in router.feeds.values():
        await feed.aclose()


def get_session_calls(pods: list[SimPod]) -> dict[str, int]:
    return {pod.name: pod.calls["GetSession"] for pod in pods}


async def pods_got(pods: list[SimPod], expected: dict[str, int]) -> None:
    """Wait until the pods counted exactly `expected` GetSession calls. The reply came with
    the first live answer, so the other pods' probes may still be on their way; a forward
    would have come before the reply, so waiting cannot hide one."""
    await eventually(lambda: get_session_calls(pods) == expected,
                     what=f"GetSession calls per pod {expected}")


def probes(router: Router) -> float:
    return sum(router.metrics.registry.get_sample_value(
        "macp_router_probes_total", {"protocol": "macp", "pod": pod.name, "result": result})
        or 0.0 for pod in router.pods for result in ("live", "not_found", "unknown"))


async def get(channel: grpc.aio.Channel, sid: str,
              metadata: tuple[tuple[str, str], ...]) -> core_pb2.GetSessionResponse:
    return await stub(channel).GetSession(core_pb2.GetSessionRequest(session_id=sid),
                                          metadata=metadata, timeout=TIMEOUT)


async def started_unknown(pods: list[SimPod], router: Router, holder: SimPod) -> str:
    """A session started on `holder` directly, after the router stopped learning."""
    await forget_feeds(router)
    async with grpc.aio.insecure_channel(holder.address) as direct:
        sid = await start(direct)
    assert router.locator.try_cached(sid) is None
    assert get_session_calls(pods) == {pod.name: 0 for pod in pods}
    return sid


async def test_a_get_session_miss_is_the_holders_answer_to_its_probe_without_a_forward(
    sim_pods, make_router
) -> None:
    pods = await sim_pods(3)
    router = await make_router(pods)
    b = pods[1]
    sid = await started_unknown(pods, router, b)
    async with grpc.aio.insecure_channel(router.address) as channel:
        reply = await get(channel, sid, COORDINATOR)
    assert reply.metadata.session_id == sid
    # One call per pod, all of them the probe: the holder's answer was the reply.
    await pods_got(pods, {"a": 1, "b": 1, "c": 1})
    # The first live answer wins; the others are counted as they finish (duplicate check).
    await eventually(lambda: probes(router) == 3, what="3 probes counted by the router")
    assert router.locator.try_cached(sid) == "b"


async def test_a_miss_is_answered_with_the_callers_own_credentials(
    sim_pods, make_router
) -> None:
    pods = await sim_pods(3)
    router = await make_router(pods)
    sid = await started_unknown(pods, router, pods[2])
    async with grpc.aio.insecure_channel(router.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await get(channel, sid, OUTSIDER)
    # The router's own token is an observer's (the pod would answer it OK): the one call the
    # holder got carried the outsider's token, and its PERMISSION_DENIED is the reply.
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED, denied.value
    await pods_got(pods, {"a": 1, "b": 1, "c": 1})
    assert router.locator.try_cached(sid) == "c"  # PERMISSION_DENIED: it is there


async def test_a_miss_on_a_session_no_pod_holds_is_a_pods_own_not_found(
    sim_pods, make_router
) -> None:
    pods = await sim_pods(3)
    router = await make_router(pods)
    await forget_feeds(router)
    missing = str(uuid.uuid4())
    async with grpc.aio.insecure_channel(router.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as not_found:
            await get(channel, missing, COORDINATOR)
    assert not_found.value.code() is grpc.StatusCode.NOT_FOUND, not_found.value
    assert missing in (not_found.value.details() or "")
    await pods_got(pods, {"a": 1, "b": 1, "c": 1})


async def test_callers_joining_a_miss_are_forwarded_with_their_own_credentials(
    sim_pods, make_router
) -> None:
    pods = await sim_pods(3)
    router = await make_router(pods)
    sid = await started_unknown(pods, router, pods[1])
    callers = [COORDINATOR, OUTSIDER] * 5
    async with grpc.aio.insecure_channel(router.address) as channel:
        results = await asyncio.gather(*(get(channel, sid, md) for md in callers),
                                       return_exceptions=True)
    for metadata, result in zip(callers, results, strict=True):
        if metadata is COORDINATOR:
            assert isinstance(result, core_pb2.GetSessionResponse), result
            assert result.metadata.session_id == sid
        else:
            assert isinstance(result, grpc.aio.AioRpcError), result
            assert result.code() is grpc.StatusCode.PERMISSION_DENIED, result
    # One fan-out (a probe on each pod); the prober's reply was its probe's answer, the nine
    # callers that joined it were forwarded to the holder once each.
    await pods_got(pods, {"a": 1, "b": 10, "c": 1})
    await eventually(lambda: probes(router) == 3, what="3 probes counted by the router")


async def test_a_token_the_pods_reject_is_rejected_and_never_blamed_on_a_pod(
    sim_pods, make_router
) -> None:
    pods = await sim_pods(2)
    router = await make_router(pods)
    sid = await started_unknown(pods, router, pods[0])
    async with grpc.aio.insecure_channel(router.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await get(channel, sid, UNKNOWN_TOKEN)
        # UNAUTHENTICATED says nothing about the session: the router asked with its own token,
        # found the holder, and the client got the holder's answer to the client's token.
        assert rejected.value.code() is grpc.StatusCode.UNAUTHENTICATED, rejected.value
        assert router.locator.try_cached(sid) == "a"
        assert not any(pod.credentials_rejected for pod in router.pods)
        assert (await get(channel, sid, COORDINATOR)).metadata.session_id == sid
