"""A router bug never fails silently: the caller gets INTERNAL naming it, the log has the
traceback, and `macp_router_unexpected_errors_total` counts it; the router keeps serving.

A bug cannot be produced on demand, so each test injects one: a routing step of the MACP
front door raises an exception no code path expects (a `KeyError`), on a real router in front
of real simulated pods, over a real gRPC channel.
"""

from __future__ import annotations

import logging

import grpc
from macp.v1 import core_pb2

from tests import macp_calls
from tests.macp_calls import METADATA, TIMEOUT


def unexpected_count(router, method: str) -> float:  # type: ignore[no-untyped-def]
    return router.metrics.registry.get_sample_value(
        "macp_router_unexpected_errors_total", {"protocol": "macp", "method": method}) or 0.0


async def test_an_unexpected_exception_in_a_unary_call_is_internal_logged_and_counted(
    sim_pods, make_router, caplog, monkeypatch
) -> None:
    pods = await sim_pods(2)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await macp_calls.start(channel)
        healthy = router.proxy.core.session

        async def buggy(call, sid, request):  # type: ignore[no-untyped-def]
            raise KeyError("pod-7")

        monkeypatch.setattr(router.proxy.core, "session", buggy)
        with caplog.at_level(logging.ERROR, logger="macp_router.core"):
            try:
                await macp_calls.get_session(channel, sid)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
            else:
                raise AssertionError("a call that raised inside the router was answered OK")
        assert code is grpc.StatusCode.INTERNAL
        assert details.startswith("GetSession: macp-router internal error (KeyError")
        assert any(r.exc_info and "GetSession" in r.getMessage() for r in caplog.records)
        assert unexpected_count(router, "GetSession") == 1
        requests = router.metrics.registry.get_sample_value(
            "macp_router_requests_total", {"protocol": "macp", "method": "GetSession",
                                           "route": "session", "pod": "none",
                                           "code": "INTERNAL"})
        assert requests == 1

        monkeypatch.setattr(router.proxy.core, "session", healthy)
        reply = await macp_calls.get_session(channel, sid)  # the router still serves
        assert reply.metadata.session_id == sid


async def test_an_unexpected_exception_in_a_stream_is_internal_and_counted(
    sim_pods, make_router, monkeypatch
) -> None:
    pods = await sim_pods(2)
    router = await make_router(pods)

    async def buggy(call, first):  # type: ignore[no-untyped-def]
        raise KeyError("no such plan")

    monkeypatch.setattr(router.proxy.streams, "_plan", buggy)
    async with grpc.aio.insecure_channel(router.address) as channel:
        stream = macp_calls.stub(channel).StreamSession(metadata=METADATA, timeout=TIMEOUT)
        await stream.write(core_pb2.StreamSessionRequest(
            envelope=macp_calls.start_envelope()))
        await stream.done_writing()
        assert await stream.code() is grpc.StatusCode.INTERNAL
        assert "KeyError" in (await stream.details() or "")
    assert unexpected_count(router, "StreamSession") == 1
