"""`--pods-dns`: pods discovered from DNS (resolver injected), joining and leaving."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import grpc
from macp.v1 import policy_pb2

from router.app import Router
from router.config import RouterConfig
from router.pods import PodSpec
from router.sim import SimPod
from tests import macp_calls
from tests.waiting import eventually


class FakeResolver:
    """What a headless Service would answer; `fail` makes the name not resolve."""

    def __init__(self) -> None:
        self.pods: list[SimPod] = []
        self.fail = False
        self.surprise: Exception | None = None
        """Raised once by the next resolution: a resolver bug, not a DNS failure."""
        self.calls = 0

    async def resolve(self, host: str, port: int) -> list[PodSpec]:
        self.calls += 1
        if self.surprise is not None:
            surprise, self.surprise = self.surprise, None
            raise surprise
        if self.fail:
            raise OSError(f"[Errno -2] Name or service not known: {host!r}")
        return [PodSpec(pod.name, pod.address) for pod in self.pods]


def readyz(router: Router) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{router.metrics_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def start_router(resolver: FakeResolver) -> Router:
    config = RouterConfig(listen="127.0.0.1:0", pods_dns="runtime.test.svc:50051",
                          token="router", dns_interval_s=0.1, health_interval_ms=100,
                          metrics_listen="127.0.0.1:0")
    router = Router(config, resolver=resolver)
    await router.start()
    assert router.discovery is not None
    router.discovery.grace_s = 0.3
    return router


async def test_unresolvable_name_at_start_is_not_ready_and_keeps_retrying(sim_pods):
    resolver = FakeResolver()
    resolver.fail = True
    router = await start_router(resolver)
    try:
        await eventually(lambda: resolver.calls >= 3, what="re-resolution")
        status, detail = await asyncio.to_thread(readyz, router)
        assert status == 503
        assert "did not resolve" in detail["reason"], detail

        resolver.pods = await sim_pods(2)
        resolver.fail = False
        await eventually(lambda: len(router.pods) == 2 and all(p.feed_up for p in router.pods),
                         what="pods discovered")
        await eventually(lambda: readyz(router)[0] == 200, what="ready")
    finally:
        await router.stop(grace=0)


async def test_a_discovery_crash_is_counted_shown_and_discovery_goes_on(sim_pods):
    """An exception DNS discovery does not expect (before: it ended discovery for good, with
    no log line and no trace in /readyz) is a crash of the `dns` service: logged, counted,
    in /readyz, and discovery restarts and finds the pods."""
    resolver = FakeResolver()
    resolver.pods = await sim_pods(1)
    router = await start_router(resolver)
    try:
        await eventually(lambda: len(router.pods) == 1, what="the first pod discovered")
        resolver.surprise = TypeError("resolver returned None")
        resolver.pods += await sim_pods(1)
        await eventually(lambda: len(router.pods) == 2, what="discovery went on after a crash")
        state = router.supervisor.state("dns")
        assert state is not None and state.up and state.crashes == 1
        assert state.last_error == "TypeError: resolver returned None"
        assert router.metrics.registry.get_sample_value(
            "macp_router_service_crashes_total", {"service": "dns"}) == 1
        _status, detail = await asyncio.to_thread(readyz, router)
        assert detail["services"]["dns"]["crashes"] == 1, detail["services"]
    finally:
        await router.stop(grace=0)


async def test_pods_that_join_get_a_feed_and_the_registry_and_pods_that_leave_are_dropped(
    sim_pods,
):
    resolver = FakeResolver()
    a, b, c = await sim_pods(3)
    resolver.pods = [a, b]
    router = await start_router(resolver)
    try:
        await eventually(lambda: {p.name for p in router.pods if p.feed_up} == {"a", "b"},
                         what="a and b up")
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = macp_calls.stub(channel)
            await stub.RegisterPolicy(
                policy_pb2.RegisterPolicyRequest(policy_descriptor=policy_pb2.PolicyDescriptor(
                    policy_id="p-1", mode=macp_calls.MODE, description="d", rules="{}")),
                metadata=macp_calls.METADATA, timeout=5)
            sids = [await macp_calls.start(channel) for _ in range(6)]

            resolver.pods = [a, b, c]  # c joins: feed + registry replay
            await eventually(lambda: router.pods.get("c") is not None
                             and router.pods.get("c").feed_up, what="c joined")  # type: ignore[union-attr]
            await eventually(lambda: "p-1" in c.policies, what="registry replayed to c")

            on_b = [sid for sid in sids if sid in b.sessions]
            resolver.pods = [a, c]  # b leaves DNS, for longer than the grace period ...
            discovery = router.discovery
            assert discovery is not None
            seen, left_at = discovery.resolutions, time.monotonic()
            await eventually(lambda: discovery.resolutions >= seen + 3
                             and time.monotonic() - left_at > 2 * discovery.grace_s,
                             what="resolutions past the grace period")
            assert router.pods.get("b") is not None, "a pod that still answers was dropped"
            await b.stop()  # ... now it is really gone
            await eventually(lambda: router.pods.get("b") is None, what="b removed")
            # Forgetting b's sessions follows its removal from the pod set (discovery removes,
            # closes its channels and feed, then forgets): wait for that state, bounded.
            await eventually(lambda: all(router.locator.try_cached(sid) is None for sid in on_b),
                             timeout=5, what="b's sessions gone from the near-cache")
            for sid in set(sids) - set(on_b):
                assert (await macp_calls.send(channel, macp_calls.proposal_envelope(sid))).ok
    finally:
        await router.stop(grace=0)


async def test_an_open_watch_stream_gains_pods_that_join(sim_pods):
    from macp.v1 import core_pb2

    resolver = FakeResolver()
    a, b = await sim_pods(2)
    resolver.pods = [a]
    router = await start_router(resolver)
    try:
        await eventually(lambda: router.pods.get("a") is not None
                         and router.pods.get("a").healthy, what="a up")  # type: ignore[union-attr]
        async with grpc.aio.insecure_channel(router.address) as channel:
            watch = macp_calls.stub(channel).WatchSessions(
                core_pb2.WatchSessionsRequest(), metadata=macp_calls.METADATA, timeout=15)
            resolver.pods = [a, b]
            await eventually(lambda: router.pods.get("b") is not None
                             and router.pods.get("b").healthy, what="b joined")  # type: ignore[union-attr]
            async with grpc.aio.insecure_channel(b.address) as direct:
                sid = await macp_calls.start(direct)  # created on b, behind the router's back
            async for reply in watch:
                if reply.event.session.session_id == sid:
                    break
            watch.cancel()
    finally:
        await router.stop(grace=0)
