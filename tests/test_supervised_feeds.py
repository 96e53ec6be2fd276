"""A watch feed that fails in a way nobody planned for is reported down, and comes back.

The pod is a small raw-bytes grpc.aio server on loopback (`ScriptedPod`): health SERVING, an
open WatchSessions that sends its headers once subscribed (as the runtime) and then what the
test pushes, and a ListSessions for the router's reconcile that the test can hold (so the
feed's down state lasts until the test has looked at it) and that lists the sessions the test
gives it.

Two faults: an unparsable event (bytes that are no WatchSessionsResponse), and an event whose
handling raises an exception type the feed does not expect (protobuf's `DecodeError` raised
inside the router, which is neither ValueError nor RuntimeError). Either way the feed must be
down everywhere an operator looks (`pod.feed_up`, `macp_router_watch_up`, `/readyz`) until it
has resubscribed and reconciled, and then be up again with the pod's sessions learned.
Then: any background service that crashed is shown down, with its error, in `/readyz`,
`ListPods` (`macp-router pods`), the status page and the service metrics; and while the router
stops, `/readyz` says so and a call in flight still gets its answer.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2

from router.app import Router
from router.cli import format_pod_table
from router.config import RouterConfig
from router.pods import PodSpec
from router.supervisor import Backoff
from router.v1 import router_pb2, router_pb2_grpc
from tests.waiting import eventually

SERVICE = "macp.v1.MACPRuntimeService"
GARBAGE = b"\xff\xff\xff\xff"  # a truncated varint: no protobuf message parses from it
SID = "5b0c3f7e-0d7a-4f0e-9d55-2f1f7c8f6a01"
POISON = "9e1d6c2a-3b4f-4c8e-8a7d-6f5e4d3c2b10"


def created(sid: str) -> bytes:
    return core_pb2.WatchSessionsResponse(event=core_pb2.SessionLifecycleEvent(
        event_type=core_pb2.SessionLifecycleEvent.EventType.EVENT_TYPE_CREATED,
        session=core_pb2.SessionMetadata(session_id=sid, state=envelope_pb2.SESSION_STATE_OPEN),
    )).SerializeToString()


class ScriptedPod:
    """A pod whose watch stream sends what `push` gives it and whose listing can be held."""

    def __init__(self) -> None:
        self.address = ""
        self.subscriptions = 0
        self.listings = 0
        self.listing_waiters = 0
        self.sessions: list[str] = []
        self.listing_open = asyncio.Event()
        self.listing_open.set()
        self.headers_open = asyncio.Event()  # cleared: WatchSessions subscribes, sends nothing
        self.headers_open.set()
        self._watchers: list[asyncio.Queue[bytes]] = []
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_generic_rpc_handlers((self._handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.address, self._server = f"127.0.0.1:{port}", server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    def push(self, raw: bytes) -> None:
        """Send `raw` on every open WatchSessions stream."""
        for queue in self._watchers:
            queue.put_nowait(raw)

    def _handler(self) -> grpc.GenericRpcHandler:
        pod = self

        async def watch(_request: bytes, context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[bytes]:
            pod.subscriptions += 1
            queue: asyncio.Queue[bytes] = asyncio.Queue()
            pod._watchers.append(queue)
            try:
                await pod.headers_open.wait()
                await context.send_initial_metadata(())  # subscribed: as the runtime, headers now
                while True:
                    yield await queue.get()
            finally:
                pod._watchers.remove(queue)

        async def list_sessions(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
            pod.listing_waiters += 1
            await pod.listing_open.wait()
            pod.listing_waiters -= 1
            pod.listings += 1
            return core_pb2.ListSessionsResponse(sessions=[
                core_pb2.SessionMetadata(session_id=sid, state=envelope_pb2.SESSION_STATE_OPEN)
                for sid in pod.sessions
            ]).SerializeToString()

        async def empty(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
            return b""  # registry listings: nothing registered

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):  # type: ignore[no-untyped-def]
                if not details.method.startswith(f"/{SERVICE}/"):
                    return None
                method = details.method.rsplit("/", 1)[-1]
                if method == "WatchSessions":
                    return grpc.unary_stream_rpc_method_handler(watch)
                if method == "ListSessions":
                    return grpc.unary_unary_rpc_method_handler(list_sessions)
                if method in ("ListPolicies", "ListExtModes", "ListModes"):
                    return grpc.unary_unary_rpc_method_handler(empty)
                return None

        return Handler()


@pytest.fixture
async def scripted():  # type: ignore[no-untyped-def]
    """(pod, router) with the router's feed of the pod up and /readyz served."""
    pod = ScriptedPod()
    await pod.start()
    router = Router(RouterConfig(listen="127.0.0.1:0", pods=(PodSpec("p", pod.address),),
                                 token="router", health_interval_ms=200,
                                 metrics_listen="127.0.0.1:0"))
    try:
        await router.start()
        assert await router.wait_ready(10), router.feeds["p"].last_error
        yield pod, router
    finally:
        await router.stop(grace=0)
        await pod.stop()


def readyz(router: Router) -> dict[str, Any]:
    url = f"http://127.0.0.1:{router.metrics_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return dict(json.loads(answer.read()))
    except urllib.error.HTTPError as exc:  # 503 carries the same JSON
        return dict(json.loads(exc.read()))


async def readyz_feed_up(router: Router) -> bool:
    return bool((await asyncio.to_thread(readyz, router))["pods"]["p"]["feed_up"])


def watch_up(router: Router) -> float | None:
    return router.metrics.registry.get_sample_value("macp_router_watch_up", {"pod": "p"})


def crashes(router: Router) -> float:
    return router.metrics.registry.get_sample_value(
        "macp_router_service_crashes_total", {"service": "watch"}) or 0.0


async def assert_down_then_back(pod: ScriptedPod, router: Router, subscriptions: int) -> None:
    """The feed is down everywhere while its reconcile is held; released, it comes back."""
    routed = router.pods.get("p")
    assert routed is not None
    feed = router.feeds["p"]
    await eventually(lambda: not routed.feed_up, timeout=10, what="pod.feed_up False")
    assert watch_up(router) == 0
    await eventually(lambda: pod.subscriptions > subscriptions, timeout=10,
                     what="the feed resubscribed")

    async def readyz_says_down() -> bool:
        return not await readyz_feed_up(router)

    await eventually(readyz_says_down, timeout=10, what="/readyz: feed down")
    assert not routed.feed_up and watch_up(router) == 0, "still down: the reconcile is held"
    assert not routed.placeable and "feed" in routed.not_placeable_reason
    reconciles = feed.reconciles

    pod.sessions = [SID]  # the pod gained a session while its feed was down
    pod.listing_open.set()
    await eventually(lambda: routed.feed_up and feed.reconciles > reconciles, timeout=10,
                     what="the feed reconciled and is up again")
    assert watch_up(router) == 1
    assert router.locator.near.get(SID) == "p", "the reconcile learned the pod's session"
    await eventually(lambda: readyz_feed_up(router), timeout=10, what="/readyz: feed up")


async def test_a_feed_is_up_only_after_the_pod_answered_its_watch_with_headers():
    """The reconcile lists only once the pod has answered WatchSessions: a feed never claims
    a subscription the pod has not made. A pod that never answers is a feed error."""
    pod = ScriptedPod()
    pod.headers_open.clear()
    await pod.start()
    router = Router(RouterConfig(listen="127.0.0.1:0", pods=(PodSpec("p", pod.address),),
                                 token="router", health_interval_ms=200))
    try:
        await router.start()
        routed, feed = router.pods.get("p"), router.feeds["p"]
        assert routed is not None
        await eventually(lambda: pod.subscriptions == 1, timeout=10, what="the feed subscribed")
        await asyncio.sleep(0.5)
        assert pod.listings == 0 and not routed.feed_up, "listed before the pod answered"
        pod.headers_open.set()
        assert await router.wait_ready(10), feed.last_error
        assert pod.listings == 1

        feed.list_timeout_s = 0.5
        pod.headers_open.clear()
        pod.push(GARBAGE)  # the feed resubscribes; this time the pod never answers
        await eventually(lambda: "sent no response headers within 0.5s" in feed.last_error,
                         timeout=10, what="the feed gave up on a silent WatchSessions")
        assert pod.listings == 1 and not routed.feed_up
    finally:
        await router.stop(grace=0)
        await pod.stop()


async def test_a_feed_hit_by_an_unparsable_event_is_reported_down_and_comes_back(scripted):
    pod, router = scripted
    subscriptions = pod.subscriptions
    pod.listing_open.clear()  # hold the next reconcile: the down state must be observable
    pod.push(GARBAGE)
    await assert_down_then_back(pod, router, subscriptions)
    assert router.feeds["p"].last_error.startswith("feed error: pod p sent WatchSessions bytes")


async def test_an_unexpected_exception_in_a_feed_is_a_crash_reported_down_and_restarted(
    scripted, monkeypatch
):
    """Before the feeds ran under the supervisor, this exception type ended the feed's task
    for good while `feed_up` stayed True."""
    pod, router = scripted
    observe = router.locator.observe

    def observe_or_raise(pod_name: str, sid: str, state: str, incarnation: str = "") -> None:
        if sid == POISON:
            raise DecodeError("Error parsing message with type 'macp.v1.SessionMetadata'")
        observe(pod_name, sid, state, incarnation)

    monkeypatch.setattr(router.locator, "observe", observe_or_raise)
    subscriptions = pod.subscriptions
    pod.listing_open.clear()
    pod.push(created(POISON))
    await assert_down_then_back(pod, router, subscriptions)
    assert crashes(router) == 1
    state = router.supervisor.state("watch:p")
    assert state is not None and state.up and state.crashes == 1
    assert state.last_error.startswith("DecodeError: Error parsing message")


async def test_a_crashed_service_is_down_in_readyz_the_pod_table_the_status_page_and_metrics(
    scripted,
):
    """Any service, whatever it is: from its crash until it runs again it is shown down, with
    its error, on every surface an operator reads."""
    _pod, router = scripted

    async def canary() -> None:
        raise LookupError("canary broke")

    state = router.supervisor.spawn("canary", canary, backoff=Backoff(base_s=60, max_s=60))
    await eventually(lambda: state.crashes == 1, timeout=10, what="the canary crashed")

    async def readyz_lists_it_down() -> dict[str, Any] | None:
        answer = await asyncio.to_thread(readyz, router)
        return answer if answer.get("services_down") == ["canary"] else None

    answer = await eventually(readyz_lists_it_down, timeout=10, what="/readyz: canary down")
    assert answer["services"]["canary"]["up"] is False
    assert answer["services"]["canary"]["last_error"] == "LookupError: canary broke"
    assert answer["services"]["watch:p"]["up"] is True
    assert answer["services"]["store_writer:macp"]["up"] is True
    assert answer["ready"] is True, "a crashed service is reported, readiness is the pods'"

    async with grpc.aio.insecure_channel(router.address) as channel:
        reply = await router_pb2_grpc.RouterAdminStub(channel).ListPods(
            router_pb2.ListPodsRequest(), timeout=5)
    services = {service.name: service for service in reply.services}
    assert {"watch:p", "store_writer:macp", "sweeper:macp", "status", "drain_sync",
            "canary"} <= set(services)
    assert not services["canary"].up and services["canary"].crashes == 1
    assert all(s.up for name, s in services.items() if name != "canary")
    table = format_pod_table(reply)
    assert "service canary DOWN" in table and "LookupError: canary broke" in table

    page = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{router.metrics_port}/",
                                       timeout=5).read().decode())
    assert 'data-service="canary"' in page and "DOWN: restarting" in page

    registry = router.metrics.registry
    assert registry.get_sample_value("macp_router_service_up", {"service": "canary"}) == 0
    assert registry.get_sample_value("macp_router_service_up", {"service": "watch"}) == 1
    assert registry.get_sample_value(
        "macp_router_service_crashes_total", {"service": "canary"}) == 1
    assert registry.get_sample_value(
        "macp_router_service_crashes_total", {"service": "watch"}) == 0


async def test_while_stopping_readyz_says_shutting_down_and_in_flight_calls_finish(scripted):
    pod, router = scripted
    pod.listing_open.clear()  # the client's ListSessions will wait at the pod
    listings = pod.listings
    async with grpc.aio.insecure_channel(router.address) as channel:
        call = asyncio.ensure_future(core_pb2_grpc.MACPRuntimeServiceStub(channel).ListSessions(
            core_pb2.ListSessionsRequest(), metadata=(("authorization", "Bearer client"),),
            timeout=10))
        await eventually(lambda: pod.listing_waiters > 0, timeout=10,
                         what="the call reached the pod")
        stopping = asyncio.ensure_future(router.stop(grace=5))

        async def readyz_says_shutting_down() -> bool:
            answer = await asyncio.to_thread(readyz, router)
            return answer["ready"] is False and answer["reason"] == "shutting down"

        await eventually(readyz_says_shutting_down, timeout=10, what="/readyz: shutting down")
        assert not stopping.done(), "the in-flight call holds the stop within its grace"
        pod.sessions = [SID]
        pod.listing_open.set()
        reply = await call
        await asyncio.wait_for(stopping, 10)
    assert [s.session_id for s in reply.sessions] == [SID]
    assert pod.listings == listings + 1


async def test_acp_front_door_services_run_under_the_routers_supervisor_and_show_in_readyz(
    scripted, tmp_path,
):
    """The ACP front door's loops are the router's services: listed (up) in `/readyz`,
    `ListPods` and `macp_router_service_up`; stopping the front door stops only them."""
    pytest.importorskip("acp", reason="the acp extra is not installed")
    from router.acp.config import AcpConfig, AcpPodSpec
    from router.sim.acp_pod import AcpSimPod

    pod, _ = scripted
    acp_pod = AcpSimPod("x", "127.0.0.1:0", tmp_path)
    await acp_pod.start()
    router = Router(RouterConfig(
        listen="127.0.0.1:0", pods=(PodSpec("p", pod.address),), token="router",
        health_interval_ms=200, metrics_listen="127.0.0.1:0",
        acp=AcpConfig(listen="127.0.0.1:0", pods=(AcpPodSpec("x", acp_pod.url),),
                      health_interval_ms=200, connect_timeout_ms=1000)))
    acp_services = {"acp_health:x", "store_writer:acp", "sweeper:acp", "acp_reaper"}
    try:
        await router.start()
        assert router.acp is not None and router.acp.supervisor is router.supervisor

        async def readyz_lists_acp_services_up() -> dict[str, Any] | None:
            services = (await asyncio.to_thread(readyz, router)).get("services", {})
            up = all(services.get(name, {}).get("up") for name in acp_services)
            return services if up else None

        services = await eventually(readyz_lists_acp_services_up, timeout=10,
                                    what="/readyz: the ACP services up")
        assert services["watch:p"]["up"] is True
        async with grpc.aio.insecure_channel(router.address) as channel:
            reply = await router_pb2_grpc.RouterAdminStub(channel).ListPods(
                router_pb2.ListPodsRequest(), timeout=5)
        assert acp_services <= {service.name for service in reply.services}
        registry = router.metrics.registry
        for kind in ("acp_health", "acp_reaper"):
            assert registry.get_sample_value("macp_router_service_up", {"service": kind}) == 1
            assert registry.get_sample_value(
                "macp_router_service_crashes_total", {"service": kind}) == 0

        await router.acp.aclose()
        names = {state.name for state in router.supervisor.states()}
        assert not acp_services & names, "the front door's services stopped with it"
        assert not router.supervisor.closing, "the router's supervisor is not the door's"
        assert router.supervisor.running("watch:p") and router.supervisor.running("status")
    finally:
        await router.stop(grace=0)
        await acp_pod.stop()
