"""Bad input gets a clear status from the router and never reaches a pod.

Every case checks the status code and that the details say what is wrong (the method, the
missing field, the pods that did not answer). Raw bytes go through `channel.unary_unary(path)`
without serializers, so the router sees exactly what a broken client would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid

import grpc
import pytest
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2

from router.sim import SimPod
from tests.macp_calls import AGENT, METADATA, TIMEOUT, proposal_envelope, start_envelope

SERVICE = "macp.v1.MACPRuntimeService"
ROUTED_METHODS = ("Send", "GetSession", "StreamSession", "CancelSession")

GARBAGE = [
    pytest.param(b"\xff\xff\xff", id="truncated-varint"),
    pytest.param(b"\x0a\x05ab", id="length-past-end"),
    pytest.param(b"\x00\x01", id="field-zero"),
    pytest.param(b"\x0f", id="bad-wire-type"),
    pytest.param(b"\x0a\x02\xff\xff", id="garbage-inside-the-first-field"),
]


def pod_calls(pods: list[SimPod]) -> int:
    """Calls the pods received on the methods a client request would be forwarded to."""
    return sum(pod.calls[method] for pod in pods for method in ROUTED_METHODS)


async def expect_error(call, code: grpc.StatusCode) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await call
    assert excinfo.value.code() is code, (excinfo.value.code(), excinfo.value.details())
    return excinfo.value.details() or ""


async def stream_status(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    """Drain a streaming call; its final status code and details."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        while await call.read() is not grpc.aio.EOF:
            pass
    return await call.code(), await call.details() or ""


def names(details: str, *words: str) -> bool:
    return all(re.search(rf"\b{re.escape(word)}\b", details) for word in words)


# -- frames that do not parse ------------------------------------------------------------------
@pytest.mark.parametrize("garbage", GARBAGE)
async def test_unparsable_requests_are_invalid_argument_and_not_forwarded(
    sim_pods, make_router, garbage
):
    pods = await sim_pods(2)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        for method, message in (("Send", "SendRequest"), ("GetSession", "GetSessionRequest"),
                                ("CancelSession", "CancelSessionRequest")):
            details = await expect_error(
                channel.unary_unary(f"/{SERVICE}/{method}")(garbage, metadata=METADATA,
                                                            timeout=TIMEOUT),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert details.startswith(f"{method}:") and message in details, details

        call = channel.stream_stream(f"/{SERVICE}/StreamSession")(metadata=METADATA,
                                                                 timeout=TIMEOUT)
        await call.write(garbage)
        code, details = await stream_status(call)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "StreamSession" in details and "first frame" in details, details
    assert pod_calls(pods) == 0


async def test_missing_session_ids(sim_pods, make_router):
    pods = await sim_pods(2)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        details = await expect_error(
            stub.Send(core_pb2.SendRequest(envelope=proposal_envelope("")), metadata=METADATA,
                      timeout=TIMEOUT),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "session_id is required" in details and "Proposal" in details, details

        details = await expect_error(
            stub.Send(core_pb2.SendRequest(), metadata=METADATA, timeout=TIMEOUT),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "envelope is required" in details, details

        for method, request in (("GetSession", core_pb2.GetSessionRequest()),
                                ("CancelSession", core_pb2.CancelSessionRequest())):
            details = await expect_error(
                getattr(stub, method)(request, metadata=METADATA, timeout=TIMEOUT),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert details == f"{method}: session_id is required", details

        start = start_envelope()
        start.session_id = ""
        details = await expect_error(
            stub.Send(core_pb2.SendRequest(envelope=start), metadata=METADATA, timeout=TIMEOUT),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "SessionStart" in details and "session_id is required" in details, details

        call = stub.StreamSession(metadata=METADATA, timeout=TIMEOUT)
        await call.write(core_pb2.StreamSessionRequest())
        code, details = await stream_status(call)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "must name a session" in details
    assert pod_calls(pods) == 0


async def test_signal_without_session_is_ambient_and_forwarded(sim_pods, make_router):
    pods = await sim_pods(2)
    router = await make_router(pods)
    envelope = envelope_pb2.Envelope(
        macp_version="1.0", message_type="Signal", message_id=str(uuid.uuid4()), sender=AGENT,
        payload=core_pb2.SignalPayload(signal_type="heartbeat").SerializeToString(),
    )
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        reply = await stub.Send(core_pb2.SendRequest(envelope=envelope), metadata=METADATA,
                                timeout=TIMEOUT)
    assert reply.ack.ok, reply
    assert [pod.calls["Send"] for pod in pods].count(1) == 1
    assert sum(pod.calls["Send"] for pod in pods) == 1


# -- unknown methods ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", [f"/{SERVICE}/NoSuchMethod", "/other.Service/X"])
async def test_unknown_methods_are_unimplemented_naming_the_method(sim_pods, make_router, path):
    pods = await sim_pods(1)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        details = await expect_error(
            channel.unary_unary(path)(b"", metadata=METADATA, timeout=TIMEOUT),
            grpc.StatusCode.UNIMPLEMENTED,
        )
        assert path in details, details

        stream = channel.stream_stream(path)(metadata=METADATA, timeout=TIMEOUT)
        await stream.write(b"\x0a\x00")
        code, details = await stream_status(stream)
        assert code is grpc.StatusCode.UNIMPLEMENTED and path in details, details

        server_stream = channel.unary_stream(path)(b"", metadata=METADATA, timeout=TIMEOUT)
        code, details = await stream_status(server_stream)
        assert code is grpc.StatusCode.UNIMPLEMENTED and path in details, details
    assert set(pods[0].calls) <= {"WatchSessions", "ListSessions"}  # only the router's feed


# -- no pod can answer -------------------------------------------------------------------------
async def test_no_healthy_pod_is_unavailable_naming_the_pods(named_pods, make_router):
    pods = await named_pods("alpha", "bravo", "charlie")
    router = await make_router(pods)
    for pod in pods:
        await pod.stop()
    deadline = time.monotonic() + 10
    while any(pod.healthy for pod in router.pods):
        assert time.monotonic() < deadline, "the router still thinks a stopped pod is healthy"
        await asyncio.sleep(0.02)

    pod_names = ("alpha", "bravo", "charlie")
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        calls = {
            "Initialize": lambda: stub.Initialize(
                core_pb2.InitializeRequest(supported_protocol_versions=["1.0"]),
                metadata=METADATA, timeout=TIMEOUT),
            "GetSession": lambda: stub.GetSession(
                core_pb2.GetSessionRequest(session_id=str(uuid.uuid4())),
                metadata=METADATA, timeout=TIMEOUT),
            "Send": lambda: stub.Send(
                core_pb2.SendRequest(envelope=proposal_envelope(str(uuid.uuid4()))),
                metadata=METADATA, timeout=TIMEOUT),
            "Send SessionStart": lambda: stub.Send(
                core_pb2.SendRequest(envelope=start_envelope()), metadata=METADATA,
                timeout=TIMEOUT),
            "ListSessions": lambda: stub.ListSessions(
                core_pb2.ListSessionsRequest(), metadata=METADATA, timeout=TIMEOUT),
        }
        for what, call in calls.items():
            details = await expect_error(call(), grpc.StatusCode.UNAVAILABLE)
            assert names(details, *pod_names), f"{what}: {details}"
            assert "retry" in details, f"{what}: {details}"
    assert router.locator.near.open_counts() == {}  # nothing was placed or reserved
