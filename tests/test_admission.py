"""Admission control end to end: a real router in front of simulated pods on loopback.

A pod with `hang` set holds every MACP call it gets, so client calls routed to it stay in
flight in the router for as long as a test wants: that is how the bound is filled. Calls past
the bound must be refused AT ONCE (UNAVAILABLE with a `grpc-retry-pushback-ms` trailer, no pod
contacted), admitted calls must finish normally, every exit path must give the slot back, and
the router's own work (probes, health, admin API, /readyz) must go on while the bound is full.
Every RPC has a deadline; every wait is bounded (`eventually`).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from macp.v1 import core_pb2, core_pb2_grpc

from router.admission import PUSHBACK_KEY
from router.v1 import router_pb2, router_pb2_grpc
from tests.macp_calls import METADATA, TIMEOUT, start
from tests.waiting import eventually

OBSERVER = (("authorization", "Bearer observer"),)
GET_SESSION = "/macp.v1.MACPRuntimeService/GetSession"
PROMPT_S = 2.0
"""What "at once" / "promptly" means here: a refusal or a router-internal call answers well
within this even on a busy 2-core machine (loopback: milliseconds), while a call that queued
behind the held ones would wait for the hung pod, i.e. until its 10 s deadline."""
PROBE_TIMEOUT_MS = 250


def refused_total(router: Any, protocol: str, kind: str) -> float:
    return router.metrics.registry.get_sample_value(
        "macp_router_admission_refused_total", {"protocol": protocol, "kind": kind}) or 0.0


def gauge(router: Any, name: str, kind: str) -> float | None:
    return router.metrics.registry.get_sample_value(name, {"kind": kind})


def trailer(exc: grpc.aio.AioRpcError, key: str) -> str | None:
    return next((v for k, v in (exc.trailing_metadata() or ()) if k == key), None)


def get_session(stub: core_pb2_grpc.MACPRuntimeServiceStub, sid: str,
                timeout: float = TIMEOUT) -> grpc.aio.UnaryUnaryCall:
    return stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=METADATA,
                           timeout=timeout)


async def hold_calls(router: Any, stub: core_pb2_grpc.MACPRuntimeServiceStub, sid: str,
                     count: int) -> list[asyncio.Future[Any]]:
    """`count` GetSession calls on `sid` (whose pod hangs), in flight in the router."""
    before = router.admission.calls
    held = [asyncio.ensure_future(get_session(stub, sid)) for _ in range(count)]
    await eventually(lambda: router.admission.calls == before + count,
                     what=f"{count} held calls in flight in the router")
    return held


async def two_pods_one_hung(sim_pods: Any, make_router: Any, **config: Any
                            ) -> tuple[Any, Any, Any, str, str]:
    """Pods a (answers) and b (hangs), a router; a session on each, started through it."""
    a, b = await sim_pods(2)
    router = await make_router([a, b], **config)
    async with grpc.aio.insecure_channel(a.address) as to_a, \
            grpc.aio.insecure_channel(b.address) as to_b:
        on_a, on_b = await start(to_a), await start(to_b)
    async with grpc.aio.insecure_channel(router.address) as channel:
        for sid in (on_a, on_b):  # the router learns both (near-cache hits from now on)
            assert (await get_session(core_pb2_grpc.MACPRuntimeServiceStub(channel), sid)
                    ).metadata.session_id == sid
    b.hang = True
    return a, b, router, on_a, on_b


async def test_a_call_past_the_bound_is_refused_at_once_with_unavailable_and_a_pushback_trailer(
    sim_pods, make_router
):
    a, b, router, on_a, on_b = await two_pods_one_hung(
        sim_pods, make_router, max_inflight_calls=3, admission_pushback_ms=250)
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        held = await hold_calls(router, stub, on_b, 3)
        assert (gauge(router, "macp_router_admission_inflight", "call"),
                gauge(router, "macp_router_admission_limit", "call")) == (3, 3)
        asked_a = a.calls["GetSession"]

        began = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await get_session(stub, on_a)
        elapsed = time.monotonic() - began

        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert trailer(refused.value, PUSHBACK_KEY) == "250"
        assert "--max-inflight-calls" in (refused.value.details() or "")
        assert elapsed < PROMPT_S, f"the refusal took {elapsed:.3f}s"
        assert a.calls["GetSession"] == asked_a, "a refused call reached a pod"
        assert refused_total(router, "macp", "call") == 1
        assert refused_total(router, "macp", "stream") == 0
        assert router.admission.calls == 3  # the refusal took no slot

        b.hang = False  # the admitted calls finish normally
        replies = await asyncio.wait_for(asyncio.gather(*held), TIMEOUT)
        assert [r.metadata.session_id for r in replies] == [on_b] * 3
        assert router.admission.calls == 0
        assert gauge(router, "macp_router_admission_inflight", "call") == 0
        assert (await get_session(stub, on_a)).metadata.session_id == on_a  # admitted again


async def test_the_slot_is_released_on_cancel_deadline_and_error(sim_pods, make_router):
    _a, _b, router, _on_a, on_b = await two_pods_one_hung(
        sim_pods, make_router, max_inflight_calls=2, max_inflight_streams=2)
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)

        cancelled = get_session(stub, on_b)
        await eventually(lambda: router.admission.calls == 1, what="the call in flight")
        cancelled.cancel()
        await eventually(lambda: router.admission.calls == 0, what="cancel released the slot")

        with pytest.raises(grpc.aio.AioRpcError) as late:
            await get_session(stub, on_b, timeout=0.3)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually(lambda: router.admission.calls == 0, what="deadline released the slot")

        with pytest.raises(grpc.aio.AioRpcError) as bad:  # a frame the router cannot parse
            await channel.unary_unary(GET_SESSION)(b"\xff\xff\xff", metadata=METADATA,
                                                   timeout=TIMEOUT)
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert router.admission.calls == 0

        stream = stub.StreamSession(metadata=OBSERVER, timeout=0.5)  # held by hung pod b
        await stream.write(core_pb2.StreamSessionRequest(subscribe_session_id=on_b))
        await eventually(lambda: router.admission.streams == 1, what="the stream open")
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await stream.read()
        assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually(lambda: router.admission.streams == 0,
                         what="a stream's deadline released its slot")

        stream = stub.StreamSession(metadata=OBSERVER, timeout=TIMEOUT)
        await stream.write(core_pb2.StreamSessionRequest(subscribe_session_id=on_b))
        await eventually(lambda: router.admission.streams == 1, what="the stream open")
        stream.cancel()
        await eventually(lambda: router.admission.streams == 0,
                         what="a stream's cancel released its slot")
        # Each bound is whole again: two calls fit (both held), a third does not.
        held = await hold_calls(router, stub, on_b, 2)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await get_session(stub, on_b)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        for call in held:
            call.cancel()
        await eventually(lambda: router.admission.calls == 0, what="the held calls released")


async def test_streams_and_unary_calls_are_bounded_separately(sim_pods, make_router):
    a, _b, router, on_a, on_b = await two_pods_one_hung(
        sim_pods, make_router, max_inflight_calls=2, max_inflight_streams=2)
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        streams = []
        for _ in range(2):  # two live subscriptions on pod a fill the stream bound
            stream = stub.StreamSession(metadata=OBSERVER, timeout=TIMEOUT)
            await stream.write(core_pb2.StreamSessionRequest(subscribe_session_id=on_a))
            first = await stream.read()
            assert first.envelope.message_type == "SessionStart", first
            streams.append(stream)
        assert router.admission.streams == 2

        third = stub.StreamSession(metadata=OBSERVER, timeout=TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await third.read()
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert trailer(refused.value, PUSHBACK_KEY) == "100"
        assert "--max-inflight-streams" in (refused.value.details() or "")
        assert refused_total(router, "macp", "stream") == 1

        # Unary calls are not held back by full streams ...
        assert (await get_session(stub, on_a)).metadata.session_id == on_a
        # ... and full calls do not hold back a new stream.
        held = await hold_calls(router, stub, on_b, 2)
        with pytest.raises(grpc.aio.AioRpcError):
            await get_session(stub, on_a)
        streams.pop().cancel()
        await eventually(lambda: router.admission.streams == 1, what="one stream ended")
        stream = stub.StreamSession(metadata=OBSERVER, timeout=TIMEOUT)
        await stream.write(core_pb2.StreamSessionRequest(subscribe_session_id=on_a))
        assert (await stream.read()).envelope.message_type == "SessionStart"
        streams.append(stream)
        assert (refused_total(router, "macp", "call"), refused_total(router, "macp", "stream")
                ) == (1, 1)
        assert a.calls["StreamSession"] >= 3
        for call in [*held, *streams]:
            call.cancel()
        await eventually(lambda: (router.admission.calls, router.admission.streams) == (0, 0),
                         what="every slot released")


async def test_probes_health_admin_and_readyz_are_not_starved_by_a_full_bound(
    sim_pods, make_router
):
    a, _b, router, _on_a, on_b = await two_pods_one_hung(
        sim_pods, make_router, max_inflight_calls=4, metrics_listen="127.0.0.1:0",
        probe_timeout_ms=PROBE_TIMEOUT_MS)
    async with grpc.aio.insecure_channel(router.address) as channel, \
            grpc.aio.insecure_channel(a.address) as to_a:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        held = await hold_calls(router, stub, on_b, 3)

        # The last slot goes to a miss (a session no pod holds): its probes run on the
        # router's own pod channels, not through the client bound. Pod a answers not_found
        # at once; hung pod b costs the probe timeout.
        def probes(pod: str, result: str) -> float:
            return router.metrics.registry.get_sample_value(
                "macp_router_probes_total",
                {"protocol": "macp", "pod": pod, "result": result}) or 0.0

        not_found_before = probes("a", "not_found")
        began = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as missed:
            await get_session(stub, str(uuid.uuid4()))
        assert time.monotonic() - began < PROMPT_S + PROBE_TIMEOUT_MS / 1000
        assert trailer(missed.value, PUSHBACK_KEY) is None, "the miss itself was refused"
        assert probes("a", "not_found") == not_found_before + 1

        held += await hold_calls(router, stub, on_b, 1)  # now the bound is full
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await get_session(stub, on_b)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert trailer(refused.value, PUSHBACK_KEY) == "100"

        # The watch feeds go on: a session started on pod a directly is learned from a's feed.
        unseen = await start(to_a)
        await eventually(lambda: router.locator.try_cached(unseen) == "a", timeout=3 * PROMPT_S,
                         what="pod a's feed told the router about the new session")

        began = time.monotonic()
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=PROMPT_S)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        admin_address = (f"127.0.0.1:{router.admin_port}" if router.admin_port
                         else router.address)
        async with grpc.aio.insecure_channel(admin_address) as admin_channel:
            table = await router_pb2_grpc.RouterAdminStub(admin_channel).ListPods(
                router_pb2.ListPodsRequest(), timeout=PROMPT_S)
        assert {pod.name for pod in table.pods} == {"a", "b"}

        def readyz() -> tuple[int, dict[str, Any]]:
            url = f"http://127.0.0.1:{router.metrics_port}/readyz"
            with urllib.request.urlopen(url, timeout=PROMPT_S) as response:
                return response.status, json.loads(response.read())

        status, _detail = await asyncio.to_thread(readyz)
        assert status == 200
        assert time.monotonic() - began < 3 * PROMPT_S
        assert router.admission.calls == 4  # none of these took a client slot
        for call in held:
            call.cancel()
        await eventually(lambda: router.admission.calls == 0, what="the held calls released")


async def test_acp_requests_past_the_shared_bound_get_503_or_a_json_rpc_retry_hint(
    sim_pods, make_router, tmp_path: Path
):
    pytest.importorskip("acp", reason="the acp extra is not installed")
    import httpx
    import websockets

    from router.acp.config import AcpConfig, AcpPodSpec
    from router.sim.acp_pod import AcpSimPod

    acp_pod = AcpSimPod("x", "127.0.0.1:0", tmp_path)
    await acp_pod.start()
    try:
        acp = AcpConfig(listen="127.0.0.1:0", pods=(AcpPodSpec("x", acp_pod.url),),
                        health_interval_ms=200, connect_timeout_ms=1000)
        _a, b, router, _on_a, on_b = await two_pods_one_hung(
            sim_pods, make_router, max_inflight_calls=2, admission_pushback_ms=1500, acp=acp)
        assert router.acp is not None and await router.acp.wait_ready(TIMEOUT)
        url = router.acp.url
        init = {"jsonrpc": "2.0", "id": 7, "method": "initialize",
                "params": {"protocolVersion": 1}}
        async with grpc.aio.insecure_channel(router.address) as channel, \
                httpx.AsyncClient(timeout=TIMEOUT) as http:
            stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
            # An ACP client connected before the bound filled up.
            socket = await asyncio.wait_for(
                websockets.connect(url.replace("http://", "ws://")), TIMEOUT)
            # And an HTTP client, which will answer an agent's request while the bound is full.
            connected = await http.post(url, json=init)
            connection_header = {"acp-connection-id": connected.headers["acp-connection-id"]}
            try:
                held = await hold_calls(router, stub, on_b, 2)  # MACP fills the shared bound
                began = time.monotonic()
                posted = await http.post(url, json=init)
                assert posted.status_code == 503
                assert posted.headers["Retry-After"] == "2"  # 1500 ms, in whole seconds
                assert "--max-inflight-calls" in posted.json()["error"]
                # A client's answer to an agent's request is never refused (no method: the
                # agent is waiting on it); the router takes it as it would without a bound.
                answered = await http.post(url, headers=connection_header,
                                           json={"jsonrpc": "2.0", "id": "agent-1",
                                                 "result": {}})
                assert answered.status_code == 202, answered.text

                await socket.send(json.dumps(init))
                answer = json.loads(await asyncio.wait_for(socket.recv(), TIMEOUT))
                assert time.monotonic() - began < 2 * PROMPT_S
                assert answer["id"] == 7 and answer["error"]["data"]["retryAfterMs"] == 1500
                assert answer["error"]["data"]["retryable"] is True
                assert refused_total(router, "acp", "call") == 2

                b.hang = False
                await asyncio.wait_for(asyncio.gather(*held), TIMEOUT)
                await eventually(lambda: router.admission.calls == 0, what="MACP calls done")
                posted = await http.post(url, json=init)
                assert posted.status_code == 200 and posted.json()["id"] == 7
                await socket.send(json.dumps(init))
                answer = json.loads(await asyncio.wait_for(socket.recv(), TIMEOUT))
                assert answer["id"] == 7 and "result" in answer, answer
                assert router.admission.calls == 0
            finally:
                await socket.close()
    finally:
        await acp_pod.stop()


async def test_acp_sse_streams_and_websockets_hold_a_stream_slot_and_past_the_bound_get_503(
    sim_pods, make_router, tmp_path: Path
):
    """An SSE stream (HTTP GET) and a WebSocket connection each count against the stream bound
    they share with MACP streams while open; past the bound the GET, or the WebSocket upgrade,
    is answered 503 with `Retry-After` at once."""
    pytest.importorskip("acp", reason="the acp extra is not installed")
    import httpx
    import websockets
    from websockets.exceptions import InvalidStatus

    from router.acp.config import AcpConfig, AcpPodSpec
    from router.sim.acp_pod import AcpSimPod

    acp_pod = AcpSimPod("x", "127.0.0.1:0", tmp_path)
    await acp_pod.start()
    try:
        pods = await sim_pods(1)
        router = await make_router(pods, max_inflight_streams=1, acp=AcpConfig(
            listen="127.0.0.1:0", pods=(AcpPodSpec("x", acp_pod.url),),
            health_interval_ms=200, connect_timeout_ms=1000))
        assert router.acp is not None and await router.acp.wait_ready(TIMEOUT)
        url, ws_url = router.acp.url, router.acp.url.replace("http://", "ws://")
        async with httpx.AsyncClient(timeout=TIMEOUT) as http, \
                grpc.aio.insecure_channel(router.address) as channel:
            connected = await http.post(url, json={"jsonrpc": "2.0", "id": 1,
                                                   "method": "initialize",
                                                   "params": {"protocolVersion": 1}})
            stream_headers = {"acp-connection-id": connected.headers["acp-connection-id"],
                              "accept": "text/event-stream"}
            async with http.stream("GET", url, headers=stream_headers) as first:
                assert first.status_code == 200
                assert router.admission.streams == 1
                began = time.monotonic()
                refused = await http.get(url, headers=stream_headers)
                assert time.monotonic() - began < PROMPT_S
                assert refused.status_code == 503, refused.text
                assert refused.headers["Retry-After"] == "1"  # 100 ms, in whole seconds
                assert "--max-inflight-streams" in refused.json()["error"]
                assert refused_total(router, "acp", "stream") == 1

                with pytest.raises(InvalidStatus) as upgrade:
                    await asyncio.wait_for(websockets.connect(ws_url), TIMEOUT)
                assert upgrade.value.response.status_code == 503
                assert upgrade.value.response.headers["Retry-After"] == "1"
                assert refused_total(router, "acp", "stream") == 2

                watch = core_pb2_grpc.MACPRuntimeServiceStub(channel).WatchSessions(
                    core_pb2.WatchSessionsRequest(), metadata=OBSERVER, timeout=TIMEOUT)
                with pytest.raises(grpc.aio.AioRpcError) as shared:
                    await watch.read()
                assert shared.value.code() is grpc.StatusCode.UNAVAILABLE  # one bound for all
                assert refused_total(router, "macp", "stream") == 1
            # acp's adapter never reads a GET: the disconnect is noticed by the gate, within a
            # poll (before it, the slot stayed taken for ever, keepalives going nowhere).
            await eventually(lambda: router.admission.streams == 0,
                             what="the closed SSE stream gave its slot back")
            assert router.metrics.registry.get_sample_value(
                "macp_router_active_streams",
                {"protocol": "acp", "method": "connection_stream"}) == 0

            socket = await asyncio.wait_for(websockets.connect(ws_url), TIMEOUT)
            try:
                assert router.admission.streams == 1
                assert (await http.get(url, headers=stream_headers)).status_code == 503
            finally:
                await socket.close()
            await eventually(lambda: router.admission.streams == 0,
                             what="the closed WebSocket gave its slot back")
            async with http.stream("GET", url, headers=stream_headers) as again:
                assert again.status_code == 200
    finally:
        await acp_pod.stop()
