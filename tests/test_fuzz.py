"""Hostile and broken input: random, truncated, mutated and oversized frames.

Raw bytes go to every route class through `channel.unary_unary(path)` / `unary_stream` /
`stream_stream` without serializers, so the router sees exactly what a broken client sends.
The oracle for "unparsable" is protobuf itself (`RequestClass.FromString` raises).

Expected answers, by route class:
- session routing (Send, GetSession, StreamSession's first frame), fan-out (ListSessions,
  WatchSessions) and broadcast (RegisterPolicy): the router parses what it routes on; an
  unparsable frame is answered INVALID_ARGUMENT by the router and never forwarded (the pods'
  counters for those methods do not move); a parsable one gets the router's or the pod's
  answer, never INTERNAL / UNKNOWN / UNAVAILABLE.
- "any" methods (Initialize, GetManifest, ListModes, ...): forwarded unparsed to one pod, so
  an unparsable frame gets the pod's own answer (the pod's gRPC deserializer: UNKNOWN from the
  Python sim, INTERNAL from a tonic runtime). Noted, not a router decision.
- frames over `max_message_bytes`: RESOURCE_EXHAUSTED from the router, nothing forwarded.
Whatever is sent, the router keeps answering, and the active-streams gauge returns to 0.
Client cancellation and deadline expiry reach the pod, for unary calls and for streams.

One router (and its pods) serves the whole module; hypothesis runs are bounded.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from macp.v1 import core_pb2, policy_pb2

from router.app import Router
from router.cli import build_parser
from router.config import RouterConfig
from router.pods import PodSpec
from router.sim import SimPod
from tests.macp_calls import METADATA, proposal_envelope, start, start_envelope
from tests.pod_auth import pod_options
from tests.waiting import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVICE = "macp.v1.MACPRuntimeService"
ROUTED = ("Send", "GetSession", "StreamSession")  # session-routing methods
NEVER = frozenset({"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS"})
SMALL_LIMIT = 64 * 1024
# Bounded, and the same examples on every run (derandomize): CI results are reproducible.
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


# -- one router for the module -----------------------------------------------------------------
class Cluster:
    def __init__(self, pods: list[SimPod], router: Router, small: Router) -> None:
        self.pods = pods
        self.router = router
        self.small = small  # the same pods behind a router with a 64 KiB message limit
        self.channel = grpc.aio.insecure_channel(router.address)
        self.known = ""

    def routed_calls(self) -> int:
        return sum(pod.calls[m] for pod in self.pods for m in ROUTED)

    def gauge(self, router: Router | None = None, method: str = "StreamSession") -> float:
        registry = (router or self.router).metrics.registry
        return registry.get_sample_value(
            "macp_router_active_streams", {"protocol": "macp", "method": method}) or 0.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    pods = [SimPod(name, "127.0.0.1:0", **pod_options()) for name in ("a", "b")]
    for pod in pods:
        await pod.start()
    specs = tuple(PodSpec(pod.name, pod.address) for pod in pods)
    routers = []
    for limit in (16 * 1024 * 1024, SMALL_LIMIT):
        router = Router(RouterConfig(listen="127.0.0.1:0", pods=specs, token="router",
                                     health_interval_ms=200, max_message_bytes=limit))
        await router.start()
        routers.append(router)
        assert await router.wait_ready(10)
    state = Cluster(pods, *routers)
    state.known = await start(state.channel)
    try:
        yield state
    finally:
        await state.channel.close()
        for router in routers:
            await router.stop(grace=0)
        for pod in pods:
            await pod.stop()


# -- calling with raw bytes --------------------------------------------------------------------
async def unary(channel: grpc.aio.Channel, method: str, data: bytes,
                timeout: float = 5.0) -> tuple[str, str]:
    try:
        await channel.unary_unary(f"/{SERVICE}/{method}")(data, metadata=METADATA,
                                                          timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


async def server_stream(channel: grpc.aio.Channel, method: str, data: bytes,
                        timeout: float = 0.5) -> tuple[str, str]:
    """Open the stream, read what comes for `timeout`; a live stream ends DEADLINE_EXCEEDED."""
    call = channel.unary_stream(f"/{SERVICE}/{method}")(data, metadata=METADATA,
                                                         timeout=timeout)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


async def first_frame(channel: grpc.aio.Channel, data: bytes,
                      timeout: float = 5.0) -> tuple[str, str]:
    """StreamSession with `data` as the only client frame (then half-close)."""
    call = channel.stream_stream(f"/{SERVICE}/StreamSession")(metadata=METADATA,
                                                               timeout=timeout)
    try:
        await call.write(data)
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass
        return (await call.code()).name, await call.details() or ""
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    except grpc.aio.UsageError:  # the router already ended the call while we wrote
        return (await call.code()).name, await call.details() or ""


def parses(request_class: type, data: bytes) -> bool:
    try:
        request_class.FromString(data)
    except DecodeError:
        return False
    return True


async def still_answers(cluster: Cluster) -> None:
    """The router is alive and routing: a known session answers through it."""
    code, details = await unary(cluster.channel, "GetSession",
                                core_pb2.GetSessionRequest(
                                    session_id=cluster.known).SerializeToString())
    assert code == "OK", (code, details)


# -- frames: valid ones, then broken ---------------------------------------------------------
def valid_frames(method: str) -> list[bytes]:
    sid = str(uuid.uuid4())
    envelopes = [start_envelope(sid), proposal_envelope(sid)]
    if method == "Send":
        return [core_pb2.SendRequest(envelope=e).SerializeToString() for e in envelopes]
    if method == "StreamSession":
        return [core_pb2.StreamSessionRequest(envelope=e).SerializeToString()
                for e in envelopes] + [
            core_pb2.StreamSessionRequest(subscribe_session_id=sid,
                                          after_sequence=1).SerializeToString()]
    if method == "GetSession":
        return [core_pb2.GetSessionRequest(session_id=sid).SerializeToString()]
    if method == "ListSessions":
        return [core_pb2.ListSessionsRequest(page_size=5, page_token="r1.abc")
                .SerializeToString()]
    if method == "WatchSessions":
        return [core_pb2.WatchSessionsRequest().SerializeToString() + b"\x08\x01"]
    if method == "RegisterPolicy":
        descriptor = policy_pb2.PolicyDescriptor(policy_id=f"fuzz-{sid}",
                                                 mode="macp.mode.decision.v1")
        return [policy_pb2.RegisterPolicyRequest(policy_descriptor=descriptor)
                .SerializeToString()]
    if method == "Initialize":
        return [core_pb2.InitializeRequest(supported_protocol_versions=["1.0"])
                .SerializeToString()]
    raise AssertionError(method)


@st.composite
def broken(draw: st.DrawFn, method: str) -> bytes:
    """Random bytes, or a valid frame truncated / with bytes flipped / with garbage appended."""
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "appended"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    frame = draw(st.sampled_from(valid_frames(method)))
    if kind == "truncated":
        return frame[: draw(st.integers(0, max(0, len(frame) - 1)))]
    if kind == "flipped":
        data = bytearray(frame)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return frame + draw(st.binary(min_size=1, max_size=16))


# -- session routing: parsed by the router, never forwarded when broken -----------------------
REQUEST_CLASSES = {
    "Send": core_pb2.SendRequest,
    "GetSession": core_pb2.GetSessionRequest,
    "StreamSession": core_pb2.StreamSessionRequest,
    "ListSessions": core_pb2.ListSessionsRequest,
    "WatchSessions": core_pb2.WatchSessionsRequest,
    "RegisterPolicy": policy_pb2.RegisterPolicyRequest,
}


async def check_session_frame(cluster: Cluster, method: str, data: bytes) -> bool:
    """Send one frame to a session-routing method; assert the rules; True if unparsable."""
    before = cluster.routed_calls()
    if method == "StreamSession":
        code, details = await first_frame(cluster.channel, data)
    else:
        code, details = await unary(cluster.channel, method, data)
    unparsable = not parses(REQUEST_CLASSES[method], data)
    if unparsable:
        assert code == "INVALID_ARGUMENT", (data, code, details)
        assert cluster.routed_calls() == before, f"{data!r} was forwarded ({details})"
    else:
        assert code not in NEVER, (data, code, details)
    if method == "StreamSession":
        await eventually(lambda: cluster.gauge() == 0, what="active streams back to 0")
    return unparsable


@pytest.mark.parametrize("method", ["Send", "GetSession", "StreamSession"])
@FUZZ
@given(draw=st.data())
async def test_broken_session_frames_are_invalid_argument_and_never_forwarded(
    cluster, method, draw
):
    await check_session_frame(cluster, method, draw.draw(broken(method)))


@pytest.mark.parametrize("method", ["Send", "GetSession", "StreamSession"])
async def test_every_truncation_of_a_session_frame_is_refused_unforwarded(cluster, method):
    unparsable = 0
    for frame in valid_frames(method):
        for cut in range(1, len(frame), 3):
            unparsable += await check_session_frame(cluster, method, frame[:cut])
    assert unparsable >= 10
    await still_answers(cluster)


MARK, BAD = "\x01MARK\x01", b"\xff\xfe\xfd\x01\x01\x01"  # same length: prefixes stay right


def bad_utf8(message: Any, holder: Any, field: str) -> bytes:
    """`message` serialized with the string `holder.field` (holder: the message or one of its
    sub-messages) holding bytes that are not UTF-8; everything else is well-formed."""
    setattr(holder, field, MARK)
    data = message.SerializeToString()
    assert data.count(MARK.encode()) == 1
    return data.replace(MARK.encode(), BAD)


ENVELOPE_STRINGS = ("macp_version", "mode", "message_type", "message_id", "session_id", "sender")


@pytest.mark.parametrize("field", ENVELOPE_STRINGS)
async def test_bad_utf8_in_any_envelope_string_is_refused_unforwarded(cluster, field):
    for envelope in (start_envelope(), proposal_envelope(cluster.known)):
        send = core_pb2.SendRequest(envelope=envelope)
        assert await check_session_frame(cluster, "Send", bad_utf8(send, send.envelope, field))
        frame = core_pb2.StreamSessionRequest(envelope=envelope)
        assert await check_session_frame(cluster, "StreamSession",
                                         bad_utf8(frame, frame.envelope, field))


async def test_bad_utf8_beside_the_routed_fields_is_refused_unforwarded(cluster):
    frame = core_pb2.StreamSessionRequest(envelope=proposal_envelope(cluster.known))
    assert await check_session_frame(cluster, "StreamSession",
                                     bad_utf8(frame, frame, "subscribe_session_id"))
    before = sum(pod.calls["CancelSession"] for pod in cluster.pods)
    cancel = core_pb2.CancelSessionRequest(session_id=cluster.known)
    code, _ = await unary(cluster.channel, "CancelSession", bad_utf8(cancel, cancel, "reason"))
    assert code == "INVALID_ARGUMENT"
    assert sum(pod.calls["CancelSession"] for pod in cluster.pods) == before
    for method in ("WatchSessions", "WatchSignals"):
        before = sum(pod.calls[method] for pod in cluster.pods)
        code, _ = await server_stream(cluster.channel, method, b"\x0a\x05ab")
        assert code == "INVALID_ARGUMENT", method
        assert sum(pod.calls[method] for pod in cluster.pods) == before
    await still_answers(cluster)


# -- fan-out and broadcast: parsed by the router ---------------------------------------------
@pytest.mark.parametrize("method", ["ListSessions", "WatchSessions", "RegisterPolicy"])
@FUZZ
@given(draw=st.data())
async def test_broken_fanout_and_broadcast_frames_are_invalid_argument(cluster, method, draw):
    data = draw.draw(broken(method))
    before = sum(pod.calls[method] for pod in cluster.pods)
    if method == "WatchSessions":
        code, details = await server_stream(cluster.channel, method, data)
    else:
        code, details = await unary(cluster.channel, method, data)
    if not parses(REQUEST_CLASSES[method], data):
        assert code == "INVALID_ARGUMENT", (data, code, details)
        assert sum(pod.calls[method] for pod in cluster.pods) == before
    elif method == "WatchSessions":
        assert code == "DEADLINE_EXCEEDED", (data, code, details)  # a live stream
    else:
        assert code not in NEVER, (data, code, details)
    if method == "WatchSessions":
        await eventually(lambda: cluster.gauge(method="WatchSessions") == 0,
                         what="active streams back to 0")


# -- "any" methods: forwarded unparsed to one pod ----------------------------------------------
@FUZZ
@given(data=broken("Initialize"))
async def test_broken_frames_to_any_route_methods_get_one_pods_own_answer(cluster, data):
    before = sum(pod.calls["Initialize"] for pod in cluster.pods)
    code, details = await unary(cluster.channel, "Initialize", data)
    if parses(core_pb2.InitializeRequest, data):
        # The pod's answer to a parsable request: OK or its own validation error.
        assert code in ("OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION"), (code, details)
        assert sum(pod.calls["Initialize"] for pod in cluster.pods) == before + 1
    else:
        # Forwarded unparsed: the pod's gRPC layer rejects it before its handler runs.
        assert code == "UNKNOWN" and "DecodeError" in details, (code, details)
        assert sum(pod.calls["Initialize"] for pod in cluster.pods) == before


async def test_router_keeps_answering_after_the_fuzzing(cluster):
    await still_answers(cluster)
    code, _ = await unary(cluster.channel, "Initialize", valid_frames("Initialize")[0])
    assert code == "OK"
    for method in ("StreamSession", "WatchSessions"):
        assert cluster.gauge(method=method) == 0


# -- sizes -----------------------------------------------------------------------------------
def oversized_send(size: int) -> bytes:
    envelope = start_envelope()
    envelope.payload = b"\x00" * size
    return core_pb2.SendRequest(envelope=envelope).SerializeToString()


async def test_frames_over_the_message_limit_are_resource_exhausted_and_not_forwarded(cluster):
    async with grpc.aio.insecure_channel(cluster.small.address) as small:
        before = cluster.routed_calls()
        code, details = await unary(small, "Send", oversized_send(SMALL_LIMIT + 1))
        assert code == "RESOURCE_EXHAUSTED", (code, details)
        code, details = await first_frame(small, oversized_send(SMALL_LIMIT + 1))
        assert code == "RESOURCE_EXHAUSTED", (code, details)
        code, details = await unary(small, "Initialize", b"\x00" * (SMALL_LIMIT + 1))
        assert code == "RESOURCE_EXHAUSTED", (code, details)
        assert cluster.routed_calls() == before
        # Just under the limit is routed normally; the router is alive.
        code, details = await unary(small, "Send", oversized_send(SMALL_LIMIT - 1024))
        assert code == "OK", (code, details)
        await eventually(lambda: cluster.gauge(cluster.small) == 0, what="gauge back to 0")
    # The default limit (16 MiB) holds on the default router too.
    code, details = await unary(cluster.channel, "Send", oversized_send(16 * 1024 * 1024 + 1))
    assert code == "RESOURCE_EXHAUSTED", (code, details)
    await still_answers(cluster)


async def test_limits_are_configurable_with_safe_defaults():
    config = RouterConfig(pods=(PodSpec("a", "127.0.0.1:1"),))
    assert config.max_message_bytes == 16 * 1024 * 1024
    assert config.max_concurrent_streams == 256
    args = build_parser().parse_args(["serve", "--pods", "a=127.0.0.1:1",
                                      "--max-message-bytes", "65536",
                                      "--max-concurrent-streams", "8"])
    assert (args.max_message_bytes, args.max_concurrent_streams) == (65536, 8)
    for bad in ({"max_message_bytes": 10}, {"max_concurrent_streams": 0}):
        with pytest.raises(ValueError):
            RouterConfig(pods=(PodSpec("a", "127.0.0.1:1"),), **bad)  # type: ignore[arg-type]


async def test_concurrent_streams_per_connection_are_limited(cluster):
    """--max-concurrent-streams N: one connection gets N concurrent calls, another is unaffected."""
    specs = tuple(PodSpec(pod.name, pod.address) for pod in cluster.pods)
    router = Router(RouterConfig(listen="127.0.0.1:0", pods=specs, token="router",
                                 health_interval_ms=200, max_concurrent_streams=4))
    await router.start()
    try:
        assert await router.wait_ready(10)
        # Two connections (channels with identical settings would share one subchannel).
        own = [("grpc.use_local_subchannel_pool", 1)]
        async with (grpc.aio.insecure_channel(router.address, options=own) as greedy,
                    grpc.aio.insecure_channel(router.address, options=own) as other):
            await still_answers_on(greedy, cluster.known)  # the connection is up, limit known
            watches = [greedy.unary_stream(f"/{SERVICE}/WatchSessions")(
                b"", metadata=METADATA, timeout=20) for _ in range(4)]
            for watch in watches:
                await watch.read()
            # A fifth call on the same connection waits for a free stream; it gets none.
            code, _ = await unary(greedy, "GetSession",
                                  core_pb2.GetSessionRequest(session_id=cluster.known)
                                  .SerializeToString(), timeout=0.5)
            assert code in ("DEADLINE_EXCEEDED", "UNAVAILABLE", "RESOURCE_EXHAUSTED"), code
            # Another connection is served at once.
            await still_answers_on(other, cluster.known)
            watches[0].cancel()
            await still_answers_on(greedy, cluster.known)  # a stream freed up
            for watch in watches:
                watch.cancel()
    finally:
        await router.stop(grace=0)


async def still_answers_on(channel: grpc.aio.Channel, sid: str) -> None:
    code, details = await unary(channel, "GetSession",
                                core_pb2.GetSessionRequest(session_id=sid).SerializeToString())
    assert code == "OK", (code, details)


# -- cancellation and deadlines reach the pod ------------------------------------------------
def holder(cluster: Cluster, sid: str) -> SimPod:
    (pod,) = [pod for pod in cluster.pods if sid in pod.sessions]
    return pod


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_unary_cancel_and_deadline_reach_the_pod(cluster, how):
    sid = await start(cluster.channel)
    pod = holder(cluster, sid)
    await eventually(lambda: cluster.router.locator.try_cached(sid) == pod.name, what="cached")
    request = core_pb2.GetSessionRequest(session_id=sid).SerializeToString()
    calls, cancelled = pod.calls["GetSession"], pod.cancelled_calls["GetSession"]
    pod.hang = True
    try:
        call = cluster.channel.unary_unary(f"/{SERVICE}/GetSession")(
            request, metadata=METADATA, timeout=0.5 if how == "deadline" else 10)
        await eventually(lambda: pod.calls["GetSession"] > calls, what="reached the pod")
        if how == "cancel":
            call.cancel()
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
            await call
        await eventually(lambda: pod.cancelled_calls["GetSession"] > cancelled,
                         what=f"the pod saw the {how}")
    finally:
        pod.hang = False
    await still_answers(cluster)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_stream_cancel_and_deadline_reach_the_pods(cluster, how):
    sid = await start(cluster.channel)
    pod = holder(cluster, sid)
    timeout = 0.5 if how == "deadline" else 10
    watches = {p.name: p.cancelled_calls["WatchSessions"] for p in cluster.pods}
    talk = cluster.channel.stream_stream(f"/{SERVICE}/StreamSession")(metadata=METADATA,
                                                                       timeout=timeout)
    await talk.write(core_pb2.StreamSessionRequest(subscribe_session_id=sid)
                     .SerializeToString())
    assert await talk.read() is not grpc.aio.EOF  # the pod's handler is running
    watchers = {p.name: p.watcher_count for p in cluster.pods}
    watch = cluster.channel.unary_stream(f"/{SERVICE}/WatchSessions")(
        b"", metadata=METADATA, timeout=timeout)
    await watch.read()
    await eventually(lambda: all(p.watcher_count > watchers[p.name] for p in cluster.pods),
                     what="the merged stream is open on every pod")
    if how == "cancel":
        talk.cancel()
        watch.cancel()
    # StreamSession: the pod's handler ends and releases the session stream. (The sim may
    # record that as a finished call rather than in `cancelled_calls`: grpc.aio ends a
    # cancelled call's request iterator like a half-close, and the sim's reader can end the
    # handler before the cancel is delivered; the router never half-closes here.)
    await eventually(lambda: not pod.sessions[sid].subs,
                     what=f"StreamSession {how} reached the pod (stream released)")
    await eventually(lambda: all(p.cancelled_calls["WatchSessions"] > watches[p.name]
                                 for p in cluster.pods),
                     what=f"WatchSessions {how} reached every pod")
    assert (await talk.code()).name in ("CANCELLED", "DEADLINE_EXCEEDED")
    await eventually(lambda: cluster.gauge() == 0 and cluster.gauge(method="WatchSessions") == 0,
                     what="active streams back to 0")
