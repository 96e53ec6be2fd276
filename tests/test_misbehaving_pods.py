"""Faults from the pod's side: garbage bytes, an Ack without `ok`, a stream that goes silent.

The misbehaving pod is a small raw-bytes grpc.aio server on loopback (`FaultyPod`): it answers
the calls a router needs to follow it (health SERVING, an open WatchSessions, an empty
ListSessions and registry listings for the router's own token) correctly, and the call under
test wrongly. Each fault must give the client a clear error or the operator a log line naming
the pod and what to do; the router never hangs and never crashes (it keeps answering after).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2, policy_pb2

from router.app import Router
from router.config import RouterConfig
from router.pods import PodSpec
from router.store import RESERVED
from tests.macp_calls import METADATA, MODE, TIMEOUT, start_envelope
from tests.waiting import eventually

SERVICE = "macp.v1.MACPRuntimeService"
GARBAGE = b"\xff\xff\xff\xff"  # a truncated varint: no protobuf message parses from it


def _token(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value).removeprefix("Bearer ")
    return ""


class FaultyPod:
    """A pod that answers `faults` (method -> "garbage" | "ack_without_ok" | "silent") wrongly."""

    def __init__(self, faults: dict[str, str]) -> None:
        self.faults = faults
        self.address = ""
        self.port = 0
        self.cancelled: list[str] = []
        self.registered = 0
        """RegisterPolicy calls accepted (fault "accept")."""
        self._server: grpc.aio.Server | None = None
        self._drop = asyncio.Event()

    async def start(self) -> None:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_generic_rpc_handlers((self._handler(),))
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.address, self._server = f"127.0.0.1:{self.port}", server

    def drop_watches(self) -> None:
        """End the open WatchSessions streams (OK), as a runtime drops a slow consumer."""
        self._drop.set()
        self._drop = asyncio.Event()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    def _handler(self) -> grpc.GenericRpcHandler:
        pod = self

        async def unary(method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            fault = pod.faults.get(method)
            router_call = _token(context) == "router"
            if method == "ListSessions" and fault == "garbage_to_router":
                return GARBAGE if router_call else b""
            if method == "ListSessions" and (router_call or fault is None):
                return b""  # an empty, valid ListSessionsResponse
            if method in ("ListPolicies", "ListExtModes", "ListModes") and fault is None:
                return b""
            if fault == "accept":
                pod.registered += 1
                return policy_pb2.RegisterPolicyResponse(ok=True).SerializeToString()
            if method == "GetSession":
                await context.abort(grpc.StatusCode.NOT_FOUND, "Session not found")
            if fault == "garbage":
                return GARBAGE
            if fault == "ack_without_ok":
                envelope = core_pb2.SendRequest.FromString(request).envelope
                return core_pb2.SendResponse(ack=envelope_pb2.Ack(
                    message_id=envelope.message_id, session_id=envelope.session_id)
                ).SerializeToString()
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} not simulated")
            return b""

        async def watch(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            if pod.faults.get("WatchSessions") == "garbage":
                yield GARBAGE
            else:
                await context.send_initial_metadata(())  # subscribed: headers, as the runtime
            await pod._drop.wait()  # an idle pod: no events until the stream is dropped

        async def stream(requests: AsyncIterator[bytes],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            fault = pod.faults.get("StreamSession")
            try:
                async for _frame in requests:
                    if fault == "garbage":
                        yield GARBAGE
                    # "silent": read every frame, answer none
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                pod.cancelled.append("StreamSession")
                raise

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):  # type: ignore[no-untyped-def]
                method = details.method.rsplit("/", 1)[-1]
                if not details.method.startswith(f"/{SERVICE}/"):
                    return None
                if method == "WatchSessions":
                    return grpc.unary_stream_rpc_method_handler(watch)
                if method == "StreamSession":
                    return grpc.stream_stream_rpc_method_handler(stream)

                async def behaviour(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                    return await unary(method, request, context)

                return grpc.unary_unary_rpc_method_handler(behaviour)

        return Handler()


@pytest.fixture
async def faulty_router():  # type: ignore[no-untyped-def]
    """`await faulty_router(faults)` -> (pod, router) with the feed of the pod up."""
    made: list[tuple[FaultyPod, Router]] = []

    async def make(faults: dict[str, str], *, wait: bool = True) -> tuple[FaultyPod, Router]:
        pod = FaultyPod(faults)
        await pod.start()
        router = Router(RouterConfig(listen="127.0.0.1:0", pods=(PodSpec("bad", pod.address),),
                                     token="router", health_interval_ms=200))
        made.append((pod, router))
        await router.start()
        if wait:
            assert await router.wait_ready(10), router.feeds["bad"].last_error
        return pod, router

    yield make
    for pod, router in made:
        await router.stop(grace=0)
        await pod.stop()


async def still_answers(router: Router) -> None:
    """The router is alive: a call for an unknown session gets the pod's NOT_FOUND."""
    async with grpc.aio.insecure_channel(router.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await core_pb2_grpc.MACPRuntimeServiceStub(channel).GetSession(
                core_pb2.GetSessionRequest(session_id="0e3c1cb5-6a5d-4b34-9a8e-0c1f3c2b9d10"),
                metadata=METADATA, timeout=TIMEOUT)
        assert excinfo.value.code() is grpc.StatusCode.NOT_FOUND


async def test_a_pod_answering_garbage_gets_errors_naming_it_and_the_router_stays_up(
    faulty_router
):
    _pod, router = await faulty_router({"Send": "garbage", "StreamSession": "garbage",
                                        "ListSessions": "garbage", "RegisterPolicy": "garbage"})
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as sent:
            await stub.Send(core_pb2.SendRequest(envelope=start_envelope()), metadata=METADATA,
                            timeout=TIMEOUT)
        assert sent.value.code() is grpc.StatusCode.INTERNAL
        assert "pod bad" in sent.value.details() and "not a SendResponse" in sent.value.details()

        call = stub.StreamSession(metadata=METADATA, timeout=TIMEOUT)
        await call.write(core_pb2.StreamSessionRequest(envelope=start_envelope()))
        assert await call.code() is grpc.StatusCode.INTERNAL
        assert "pod bad" in await call.details()
        assert "not a StreamSessionResponse" in await call.details()

        with pytest.raises(grpc.aio.AioRpcError) as listed:
            await stub.ListSessions(core_pb2.ListSessionsRequest(), metadata=METADATA,
                                    timeout=TIMEOUT)
        assert listed.value.code() is grpc.StatusCode.INTERNAL
        assert "pod bad" in listed.value.details()

        with pytest.raises(grpc.aio.AioRpcError) as registered:
            await stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(
                policy_descriptor=policy_pb2.PolicyDescriptor(
                    policy_id="p.garbage", mode=MODE, rules=b"{}", schema_version=1)),
                metadata=METADATA, timeout=TIMEOUT)
        assert registered.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "bad (answered bytes that are not a RegisterPolicyResponse" in (
            registered.value.details())
    assert await router.store.broadcasts() == []
    await still_answers(router)


async def test_garbage_on_the_watch_feed_is_a_warning_naming_the_pod(faulty_router, caplog):
    caplog.set_level(logging.WARNING, logger="macp_router.watch")
    _pod, router = await faulty_router({"WatchSessions": "garbage"}, wait=False)
    feed = router.feeds["bad"]
    assert await feed.wait_for(lambda f: f.reconnects >= 2, 15)  # it retries, it does not die
    lines = [r.getMessage() for r in caplog.records if "WatchSessionsResponse" in r.getMessage()]
    assert lines and "pod bad" in lines[0]
    pod = router.pods.get("bad")
    assert pod is not None and not pod.placeable and "feed" in pod.not_placeable_reason
    await still_answers(router)


async def test_a_garbage_reconcile_listing_is_a_warning_naming_the_pod(faulty_router, caplog):
    caplog.set_level(logging.WARNING, logger="macp_router.watch")
    _pod, router = await faulty_router({"ListSessions": "garbage_to_router"}, wait=False)
    feed = router.feeds["bad"]
    assert await feed.wait_for(lambda f: f.reconnects >= 2, 15)
    lines = [r.getMessage() for r in caplog.records if "ListSessionsResponse" in r.getMessage()]
    assert lines and "pod bad" in lines[0]
    pod = router.pods.get("bad")
    assert pod is not None and not pod.placeable
    await still_answers(router)


async def test_an_ack_without_ok_is_never_taken_for_an_accepted_start(faulty_router, caplog):
    caplog.set_level(logging.WARNING, logger="macp_router.proxy")
    _pod, router = await faulty_router({"Send": "ack_without_ok"})
    envelope = start_envelope()
    async with grpc.aio.insecure_channel(router.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as sent:
            await core_pb2_grpc.MACPRuntimeServiceStub(channel).Send(
                core_pb2.SendRequest(envelope=envelope), metadata=METADATA, timeout=TIMEOUT)
    assert sent.value.code() is grpc.StatusCode.INTERNAL
    assert "pod bad" in sent.value.details() and "neither ok nor an error code" in (
        sent.value.details())
    assert any("pod bad" in r.getMessage() and "neither ok" in r.getMessage()
               for r in caplog.records)
    # Not confirmed as open (nobody knows whether it started): the reservation runs out.
    assert router.locator.near.entry(envelope.session_id) == ("bad", RESERVED)
    await still_answers(router)


async def test_a_stream_silent_after_its_first_frame_is_logged_and_ends_at_the_deadline(
    faulty_router, caplog
):
    caplog.set_level(logging.WARNING, logger="macp_router.proxy")
    pod, router = await faulty_router({"StreamSession": "silent"})
    router.proxy.first_answer_warn_s = 0.3
    async with grpc.aio.insecure_channel(router.address) as channel:
        call = core_pb2_grpc.MACPRuntimeServiceStub(channel).StreamSession(
            metadata=METADATA, timeout=2)
        await call.write(core_pb2.StreamSessionRequest(envelope=start_envelope()))
        assert await call.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    lines = [r.getMessage() for r in caplog.records if "first frame" in r.getMessage()]
    assert lines and "pod bad" in lines[0] and "check its logs" in lines[0]
    await eventually(lambda: pod.cancelled == ["StreamSession"],
                     what="the pod saw the relayed stream end")
    await eventually(lambda: router.metrics.registry.get_sample_value(
        "macp_router_active_streams", {"protocol": "macp", "method": "StreamSession"}) == 0,
        what="the router's stream handler ended")
    await still_answers(router)


async def test_a_pod_that_cannot_list_its_registry_gets_one_replay_per_incarnation(
    faulty_router
):
    unlistable = {"ListPolicies": "unimplemented", "ListExtModes": "unimplemented",
                  "ListModes": "unimplemented"}
    pod, router = await faulty_router({"RegisterPolicy": "accept", **unlistable})
    async with grpc.aio.insecure_channel(router.address) as channel:
        reply = await core_pb2_grpc.MACPRuntimeServiceStub(channel).RegisterPolicy(
            policy_pb2.RegisterPolicyRequest(policy_descriptor=policy_pb2.PolicyDescriptor(
                policy_id="p.once", mode=MODE, rules=b"{}", schema_version=1)),
            metadata=METADATA, timeout=TIMEOUT)
    assert reply.ok and pod.registered == 1
    feed = router.feeds["bad"]

    # The feed reconnects while the pod process stays up: nothing is replayed.
    reconciles = feed.reconciles
    pod.drop_watches()
    assert await feed.wait_for(lambda f: f.reconciles > reconciles and f.up, 10)
    assert pod.registered == 1

    # A new incarnation (the pod goes away, the router sees it down, it comes back empty).
    routed = router.pods.get("bad")
    assert routed is not None
    await pod.stop()
    await eventually(lambda: not routed.healthy, what="the router saw the pod down")
    await pod.start()
    await eventually(lambda: pod.registered == 2 and routed.placeable,
                     what="one replay to the new incarnation")
    assert pod.registered == 2
