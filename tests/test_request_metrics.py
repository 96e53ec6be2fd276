"""Every call through the MACP front door records exactly one request metric, with the status
the caller saw: also a call that hit its deadline (DEADLINE_EXCEEDED, not CANCELLED), one the
client cancelled (CANCELLED) and one that ended in a router bug (INTERNAL).

grpc.aio ends a handler whose client cancelled, or whose deadline passed, by cancelling its task
(`asyncio.CancelledError`): the front door must still record the call, and tell the two apart.
Real simulated pods (one made to hang, so the call is in the router when it ends) and an
in-process router on loopback; every call has a deadline.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from macp.v1 import core_pb2

from router.app import Router
from tests.macp_calls import METADATA, TIMEOUT, get_session, start, stub
from tests.metric_samples import requests_total
from tests.waiting import eventually

SHORT_DEADLINE_S = 0.5


def requests(router: Router, method: str, code: str) -> float:
    """`macp_router_requests_total` for MACP `method` ended with `code`, any route and pod."""
    return requests_total(router.metrics.registry, "macp", method, code)


async def _expect_code(call: object, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await call  # type: ignore[misc]
    assert excinfo.value.code() is code, excinfo.value


async def test_a_unary_call_past_its_deadline_is_recorded_deadline_exceeded(
    sim_pods, make_router
) -> None:
    (pod,) = await sim_pods(1)
    router = await make_router([pod])
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await start(channel)
        pod.hang = True
        await _expect_code(
            stub(channel).GetSession(core_pb2.GetSessionRequest(session_id=sid),
                                     metadata=METADATA, timeout=SHORT_DEADLINE_S),
            grpc.StatusCode.DEADLINE_EXCEEDED)
        await eventually(lambda: requests(router, "GetSession", "DEADLINE_EXCEEDED") == 1,
                         what="the GetSession past its deadline was recorded")
        pod.hang = False
        assert requests(router, "GetSession", "CANCELLED") == 0
        assert (await get_session(channel, sid)).metadata.session_id == sid
        await eventually(lambda: requests(router, "GetSession", "OK") == 1,
                         what="the next GetSession recorded OK")


async def test_a_unary_call_the_client_cancels_is_recorded_cancelled(
    sim_pods, make_router
) -> None:
    (pod,) = await sim_pods(1)
    router = await make_router([pod])
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await start(channel)
        pod.hang = True
        before = pod.calls["GetSession"]
        call = stub(channel).GetSession(core_pb2.GetSessionRequest(session_id=sid),
                                        metadata=METADATA, timeout=TIMEOUT)
        await eventually(lambda: pod.calls["GetSession"] > before,
                         what="the GetSession reached the pod (in the router now)")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await eventually(lambda: requests(router, "GetSession", "CANCELLED") == 1,
                         what="the cancelled GetSession was recorded")
        assert requests(router, "GetSession", "DEADLINE_EXCEEDED") == 0
        pod.hang = False


async def test_a_stream_past_its_deadline_is_recorded_deadline_exceeded(
    sim_pods, make_router
) -> None:
    (pod,) = await sim_pods(1)
    router = await make_router([pod])
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await start(channel)
        # A subscription the pod keeps open: the stream ends only by its deadline.
        call = stub(channel).StreamSession(metadata=METADATA, timeout=SHORT_DEADLINE_S)
        await call.write(core_pb2.StreamSessionRequest(subscribe_session_id=sid))
        assert (await call.read()).envelope.message_type == "SessionStart"
        assert await call.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually(lambda: requests(router, "StreamSession", "DEADLINE_EXCEEDED") == 1,
                         what="the stream past its deadline was recorded")
        assert requests(router, "StreamSession", "CANCELLED") == 0


async def test_a_stream_the_client_cancels_is_recorded_cancelled(sim_pods, make_router) -> None:
    (pod,) = await sim_pods(1)
    router = await make_router([pod])
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await start(channel)
        call = stub(channel).StreamSession(metadata=METADATA, timeout=TIMEOUT)
        await call.write(core_pb2.StreamSessionRequest(subscribe_session_id=sid))
        await call.read()
        call.cancel()
        assert await call.code() is grpc.StatusCode.CANCELLED
        await eventually(lambda: requests(router, "StreamSession", "CANCELLED") == 1,
                         what="the cancelled stream was recorded")
        assert requests(router, "StreamSession", "DEADLINE_EXCEEDED") == 0
