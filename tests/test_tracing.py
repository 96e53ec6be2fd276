"""Traces: one call through a real router gives the expected span tree (SDK in-memory exporter).

The client's W3C `traceparent` is continued by the router's SERVER span, and the pod receives
the `traceparent` of the router's `forward` span (checked on a recording gRPC server standing in
for a pod, which keeps the metadata of every call it receives).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from macp.v1 import core_pb2

from router import tracing
from router.app import Router
from router.config import RouterConfig
from router.pods import PodSpec
from tests import macp_calls
from tests.waiting import eventually

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind

SERVICE = "macp.v1.MACPRuntimeService"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on (before the router is built), spans kept in memory; off afterwards."""
    exporter = InMemorySpanExporter()
    tracing.configure(span_processors=[SimpleSpanProcessor(exporter)])
    yield exporter
    tracing.shutdown()


def client_traceparent() -> tuple[str, int, int]:
    trace_id, span_id = secrets.randbits(128) | 1, secrets.randbits(64) | 1
    return f"00-{trace_id:032x}-{span_id:016x}-01", trace_id, span_id


def children(all_spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in all_spans
            if s.parent is not None and s.parent.span_id == parent.context.span_id]


def one(found: list[ReadableSpan], name: str) -> ReadableSpan:
    matching = [s for s in found if s.name == name]
    assert len(matching) == 1, [s.name for s in found]
    return matching[0]


def holder(router: Router, sid: str) -> str:
    entry = router.locator.near.entry(sid)
    assert entry is not None
    return entry[0]


async def test_a_routed_miss_is_a_server_span_with_locate_store_probe_and_forward_children(
    spans, sim_pods, make_router,
):
    pods = await sim_pods(3)
    router = await make_router(pods)
    traceparent, trace_id, client_span_id = client_traceparent()
    metadata = (*macp_calls.METADATA, ("traceparent", traceparent))
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await macp_calls.start(channel)
        owner = holder(router, sid)
        await router.locator.invalidate(sid, owner)  # forgotten: the next call is a miss
        spans.clear()
        # A Send: a GetSession miss is answered by its own probe (no forward; the next test)
        await macp_calls.stub(channel).Send(
            core_pb2.SendRequest(envelope=macp_calls.proposal_envelope(sid)),
            metadata=metadata, timeout=10)
    finished = list(spans.get_finished_spans())
    server = one([s for s in finished if s.kind is SpanKind.SERVER], f"{SERVICE}/Send")
    assert server.context.trace_id == trace_id, "the client's trace is continued"
    assert server.parent is not None and server.parent.span_id == client_span_id
    assert server.attributes["rpc.method"] == "Send"
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert all(s.context.trace_id == trace_id for s in finished)

    top = children(finished, server)
    locate, forward = one(top, "locate"), one(top, "forward")
    assert locate.attributes["macp.locate.status"] == "live"
    assert locate.attributes["macp.pod"] == owner
    assert locate.attributes["macp.session"] == sid[:8] + "…"
    steps = children(finished, locate)
    one(steps, "store.get")
    fanout = one(steps, "probe.fanout")
    assert fanout.attributes["pods"] == 3
    probes = children(finished, fanout)
    assert {p.name for p in probes} == {"probe"} and owner in {
        p.attributes["macp.pod"] for p in probes}
    assert forward.kind is SpanKind.CLIENT
    assert forward.attributes["macp.pod"] == owner
    assert forward.attributes["rpc.method"] == "Send"
    assert locate.end_time <= forward.start_time, "located first, then forwarded"
    for span in finished:
        assert sid not in span.to_json(), "never a full session id"


async def test_a_get_session_miss_is_answered_by_the_owners_probe_span_without_a_forward(
    spans, sim_pods, make_router,
):
    pods = await sim_pods(3)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await macp_calls.start(channel)
        owner = holder(router, sid)
        await router.locator.invalidate(sid, owner)  # forgotten: the next call is a miss
        spans.clear()
        reply = await macp_calls.get_session(channel, sid)
    assert reply.metadata.session_id == sid
    # The reply came with the owner's answer; the other probes end after it.
    await eventually(lambda: len([s for s in spans.get_finished_spans() if s.name == "probe"])
                     == 3, what="all 3 probe spans ended")
    finished = list(spans.get_finished_spans())
    server = one([s for s in finished if s.kind is SpanKind.SERVER], f"{SERVICE}/GetSession")
    top = children(finished, server)
    assert [s.name for s in top] == ["locate"], "the owner's probe answer is the reply"
    fanout = one(children(finished, top[0]), "probe.fanout")
    probes = children(finished, fanout)
    assert len(probes) == 3
    answered = [p for p in probes if p.attributes["macp.pod"] == owner]
    assert len(answered) == 1 and answered[0].attributes["rpc.grpc.status_code"] == 0


async def test_a_session_no_pod_holds_leaves_no_full_session_id_in_any_span(
    spans, sim_pods, make_router,
):
    pods = await sim_pods(2)
    router = await make_router(pods)
    missing = str(uuid.uuid4())
    async with grpc.aio.insecure_channel(router.address) as channel:
        spans.clear()
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await macp_calls.get_session(channel, missing)
    assert lost.value.code() is grpc.StatusCode.NOT_FOUND
    finished = list(spans.get_finished_spans())
    server = one([s for s in finished if s.kind is SpanKind.SERVER], f"{SERVICE}/GetSession")
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    locate = one(children(finished, server), "locate")
    assert locate.attributes["macp.locate.status"] == "not_found"
    probes = [s for s in finished if s.name == "probe"]
    assert len(probes) == 2
    assert all(p.attributes["rpc.grpc.status_code"] == 5 for p in probes)
    for span in finished:
        assert missing not in span.to_json(), span.to_json()


async def test_a_session_start_is_reserved_then_forwarded_to_the_placed_pod(
    spans, sim_pods, make_router,
):
    pods = await sim_pods(2)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        spans.clear()
        sid = await macp_calls.start(channel)
    finished = list(spans.get_finished_spans())
    server = one([s for s in finished if s.kind is SpanKind.SERVER], f"{SERVICE}/Send")
    assert server.parent is None, "no traceparent from the client: a new trace"
    top = children(finished, server)
    reserve = one(top, "store.reserve")
    forward = one(top, "forward")
    assert reserve.attributes["pod"] == forward.attributes["macp.pod"] == holder(router, sid)


async def test_a_relayed_stream_session_names_its_pod_on_a_forward_open_span(
    spans, sim_pods, make_router,
):
    pods = await sim_pods(2)
    router = await make_router(pods)
    traceparent, trace_id, client_span_id = client_traceparent()
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await macp_calls.start(channel)
        spans.clear()
        call = macp_calls.stub(channel).StreamSession(
            metadata=(*macp_calls.METADATA, ("traceparent", traceparent)), timeout=10)
        proposal = macp_calls.proposal_envelope(sid)
        await call.write(core_pb2.StreamSessionRequest(envelope=proposal))
        assert (await call.read()).envelope.message_id == proposal.message_id
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() is grpc.StatusCode.OK
    finished = list(spans.get_finished_spans())
    server = one([s for s in finished if s.kind is SpanKind.SERVER],
                 f"{SERVICE}/StreamSession")
    assert server.context.trace_id == trace_id and server.parent.span_id == client_span_id
    opened = one(children(finished, server), "forward.open")
    assert opened.kind is SpanKind.CLIENT
    assert opened.attributes["macp.pod"] == holder(router, sid)
    assert opened.end_time <= server.end_time


class RecordingPod:
    """A real gRPC server standing in for a pod: answers GetSession live, health SERVING, and
    keeps the metadata of every GetSession it receives (everything else UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.received: list[dict[str, str]] = []
        self.server = grpc.aio.server()
        self.port = 0

    async def start(self) -> None:
        async def get_session(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.received.append({k: v for k, v in context.invocation_metadata()
                                  if isinstance(v, str)})
            sid = core_pb2.GetSessionRequest.FromString(request).session_id
            return core_pb2.GetSessionResponse(
                metadata=core_pb2.SessionMetadata(session_id=sid)).SerializeToString()

        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "GetSession": grpc.unary_unary_rpc_method_handler(get_session),
        })
        self.server.add_generic_rpc_handlers((handler,))
        checker = health.aio.HealthServicer()
        await checker.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(0)


@pytest.fixture
async def recording_pod() -> AsyncIterator[RecordingPod]:
    pod = RecordingPod()
    await pod.start()
    yield pod
    await pod.stop()


async def test_pod_receives_the_traceparent_of_the_routers_span_for_the_call(
    spans, recording_pod
):
    config = RouterConfig(listen="127.0.0.1:0", token="router", health_interval_ms=200,
                          pods=(PodSpec("rec", f"127.0.0.1:{recording_pod.port}"),))
    router = Router(config)
    await router.start()
    try:
        traceparent, trace_id, _ = client_traceparent()
        sid = "0b6b5f36-3f7b-4d71-9d1e-2f0a9f8c1d2e"
        metadata = (("authorization", "Bearer client-token"), ("traceparent", traceparent))
        async with grpc.aio.insecure_channel(router.address) as channel:
            # A miss: the client's own GetSession is the probe; then a hit: it is forwarded.
            for _ in range(2):
                await macp_calls.stub(channel).GetSession(
                    core_pb2.GetSessionRequest(session_id=sid), metadata=metadata, timeout=10)
    finally:
        await router.stop(grace=0)
    finished = list(spans.get_finished_spans())
    probe, forward = one(finished, "probe"), one(finished, "forward")
    assert probe.attributes["macp.pod"] == forward.attributes["macp.pod"] == "rec"
    calls = [m for m in recording_pod.received
             if m.get("authorization") == "Bearer client-token"]
    assert len(calls) == 2, recording_pod.received
    assert [m["traceparent"] for m in calls] == [
        f"00-{trace_id:032x}-{span.context.span_id:016x}-01" for span in (probe, forward)]
    assert probe.context.trace_id == forward.context.trace_id == trace_id


def test_tracing_off_leaves_handlers_untouched():
    assert not tracing.enabled
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    assert tracing.traced_handler("Send", handler) is handler
    marker = object()
    assert tracing.traced("locate", marker) is marker  # type: ignore[arg-type]
