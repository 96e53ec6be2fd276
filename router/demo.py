"""`macp-router demo`: three simulated pods, one router, the real macp_sdk client, end to end.

Everything runs on free loopback ports in this process (pods and router on the event loop, the
blocking SDK client in a worker thread) with the embedded in-memory store. The pods behave like
macp-runtime v0.6.1 and are configured as an operator configures one (token entries in the
runtime's MACP_AUTH_TOKENS_JSON shape: the router as an observer with registry rights, the two
demo agents; plaintext allowed on loopback as MACP_ALLOW_INSECURE=1 does; the runtime's default
rate limits, which the demo stays well under). The demo checks what
it shows: every session lives on exactly one pod, every call reached the pod that holds it; it
exits non-zero otherwise.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc

from router.app import Router
from router.config import RouterConfig
from router.pods import PodSpec
from router.sim import SimPod, agent_entry, router_entry
from router.v1 import router_pb2, router_pb2_grpc


def _say(text: str = "") -> None:
    print(text, flush=True)


def _counter(router: Router, name: str, **labels: str) -> float:
    value = router.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@dataclass
class _Demo:
    """What the demo's steps share: the pods, the router, the client and the failures seen."""

    pods: list[SimPod]
    router: Router
    client: Any  # macp_sdk.MacpClient (the `demo` extra), dialling the router
    admin: router_pb2_grpc.RouterAdminStub
    failures: list[str] = field(default_factory=list)

    async def where(self, sid: str, probe: bool = False) -> router_pb2.SessionStatusResponse:
        return await self.admin.SessionStatus(
            router_pb2.SessionStatusRequest(session_id=sid, probe=probe), timeout=5
        )


def _dev_client(target: str) -> Any:
    from macp_sdk import AuthConfig, MacpClient

    return MacpClient(target=target, allow_insecure=True,
                      auth=AuthConfig.for_dev_agent("coordinator"), default_timeout=10.0)


async def _start_pods() -> list[SimPod]:
    """Three pods configured as an operator configures a runtime (token entries, loopback)."""
    tokens = [router_entry("router"), agent_entry("coordinator"), agent_entry("reviewer")]
    pods = [SimPod(name, "127.0.0.1:0", auth_tokens=tokens, allow_insecure=True)
            for name in ("a", "b", "c")]
    for pod in pods:
        await pod.start()
    return pods


async def _start_router(pods: list[SimPod]) -> Router:
    config = RouterConfig(
        listen="127.0.0.1:0",
        pods=tuple(PodSpec(pod.name, pod.address) for pod in pods),
        token="router",
        health_interval_ms=250,
    )
    router = Router(config)
    await router.start()
    return router


def _introduce(pods: list[SimPod], router: Router) -> None:
    _say("macp-router demo: 3 simulated MACP runtime pods, one router (in-memory store), "
         "and the macp_sdk client")
    for pod in pods:
        _say(f"  pod {pod.name:<6} {pod.address}")
    _say(f"  router   {router.address}")
    _say('  the router\'s token on every pod: {"token": "router", "sender": "macp-router", '
         '"is_observer": true, "can_manage_mode_registry": true}')
    _say("  waiting for the router's watch feeds ...")


async def _start_sessions(demo: _Demo, sessions: int) -> list[str]:
    """Step 1 (client scenario): start, propose and read back sessions through the router."""
    from macp_sdk import DecisionSession

    client = demo.client

    def run() -> list[str]:
        client.initialize()
        sids = []
        for index in range(sessions):
            session = DecisionSession(client)
            ack = session.start(intent=f"pick a vendor #{index}",
                                participants=["coordinator", "reviewer"], ttl_ms=600_000)
            if not ack.ok:
                demo.failures.append(f"start {session.session_id}: {ack.error.code}")
            ack = session.propose(f"proposal-{index}", "vendor-a", rationale="cheapest")
            if not ack.ok:
                demo.failures.append(f"propose {session.session_id}: {ack.error.code}")
            client.get_session(session.session_id)
            sids.append(session.session_id)
        return sids

    _say()
    _say(f"1. start {sessions} sessions through the router (start, propose, get_session)")
    return await asyncio.to_thread(run)


async def _check_placement(demo: _Demo, sids: list[str]) -> None:
    """Step 1 (check): each session on exactly one pod, the one the router names."""
    pods = demo.pods
    _say(f"   {'SESSION':<38}{'POD':<6}HOW THE ROUTER KNEW")
    for sid in sids:
        holders = [pod.name for pod in pods if sid in pod.sessions]
        status = await demo.where(sid)
        if len(holders) != 1 or status.pod != holders[0]:
            demo.failures.append(f"{sid}: held by {holders}, router says {status.pod}")
        how = ("placed by the router; the pod's Ack and watch feed confirmed it"
               if status.state == "open" else f"placed by the router ({status.state})")
        _say(f"   {sid:<38}{status.pod:<6}{how}")
    spread = sorted({pod.name for pod in pods for sid in sids if sid in pod.sessions})
    _say(f"   spread over pods: {', '.join(spread)}")


async def _use_a_session_made_behind_the_router(demo: _Demo, direct: Any) -> str:
    """Step 2: a session created directly on pod c, learned from its feed, used via the router."""
    from macp_sdk import DecisionSession

    _say()
    _say("2. create a session directly on pod c (bypassing the router), then use it "
         "through the router")

    def start_direct() -> str:
        direct.initialize()
        session = DecisionSession(direct)
        session.start(intent="created behind the router's back",
                      participants=["coordinator"], ttl_ms=600_000)
        return session.session_id

    router = demo.router
    direct_sid = await asyncio.to_thread(start_direct)
    feed = router.feeds["c"]
    await feed.wait_for(lambda f: router.locator.try_cached(direct_sid) is not None, 5)
    status = await demo.where(direct_sid)
    _say(f"   {direct_sid} -> pod {status.pod or '?'} (source: {status.source}: "
         "learned from pod c's WatchSessions feed, no probe)")

    def propose_via_router() -> bool:
        session = DecisionSession(demo.client, session_id=direct_sid)
        return session.propose("p-direct", "vendor-b").ok

    ok = await asyncio.to_thread(propose_via_router)
    _say(f"   propose through the router -> {'accepted by pod c' if ok else 'REJECTED'}")
    if not ok:
        demo.failures.append(f"propose {direct_sid} through the router was rejected")
    return direct_sid


async def _locate_from_scratch(demo: _Demo, sid: str) -> None:
    """Step 3: a miss: forget the route and let the router ask every pod at once."""
    pods = demo.pods
    probes_before = sum(pod.calls["GetSession"] for pod in pods)
    fresh = await demo.where(sid, probe=True)
    probes = sum(pod.calls["GetSession"] for pod in pods) - probes_before
    _say(f"   locate it from scratch -> live on pod {fresh.pod} (source: {fresh.source}: "
         f"{probes} parallel GetSession probes, first live answer wins)")
    if fresh.pod != "c":
        demo.failures.append(f"probe located {sid} on {fresh.pod!r}, expected c")


async def _list_and_miss(demo: _Demo, expected: set[str]) -> None:
    """Step 4: discovery merged over every pod, and an unknown session."""
    client = demo.client
    _say()
    listed = await asyncio.to_thread(client.list_sessions)
    ids = [meta.session_id for meta in listed]
    _say(f"3. list_sessions through the router: {len(ids)} sessions merged from "
         f"{len(demo.pods)} pods, {len(ids) - len(set(ids))} duplicates")
    if not expected <= set(ids):
        demo.failures.append("list_sessions missed sessions")
    unknown = str(uuid.uuid4())
    try:
        await asyncio.to_thread(client.get_session, unknown)
        demo.failures.append(f"get_session({unknown}) did not fail")
        answer = "found?!"
    except grpc.RpcError as exc:
        answer = f"{exc.code().name}: {exc.details()}"
    _say(f"4. get_session(random id) -> {answer}")


def _report_router(router: Router) -> None:
    _say()
    fanouts = _counter(router, "macp_router_probe_fanouts_total", protocol="macp")
    calls = sum(
        sample.value
        for metric in router.metrics.requests.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
    _say(f"router: {calls:.0f} calls routed, {fanouts:.0f} probe fan-outs (one for the "
         f"random id, one asked for above); cached sessions: {len(router.locator.near)}")


def verdict(failures: list[str], ok_line: str) -> int:
    """Print each failed check (or `ok_line` when none failed); a demo's exit code."""
    if failures:
        _say("FAILED:")
        for failure in failures:
            _say(f"  - {failure}")
        return 1
    _say(ok_line)
    return 0


async def _scenario(demo: _Demo, sessions: int) -> None:
    """Steps 1-4 against a ready router, then the router's own figures."""
    sids = await _start_sessions(demo, sessions)
    await _check_placement(demo, sids)
    direct = _dev_client(demo.pods[2].address)
    direct_sid = await _use_a_session_made_behind_the_router(demo, direct)
    await _locate_from_scratch(demo, direct_sid)
    await _list_and_miss(demo, set(sids) | {direct_sid})
    _report_router(demo.router)
    demo.client.close()
    direct.close()


async def run_demo(sessions: int = 6) -> int:
    import logging

    logging.getLogger("macp_sdk").setLevel(logging.ERROR)  # "insecure channel" is the point here

    pods = await _start_pods()
    router = await _start_router(pods)
    failures: list[str] = []
    try:
        _introduce(pods, router)
        if not await router.wait_ready(10):
            _say("error: the router's watch feeds did not come up within 10 s")
            return 1
        admin_channel = grpc.aio.insecure_channel(router.address)
        demo = _Demo(pods, router, _dev_client(router.address),
                     router_pb2_grpc.RouterAdminStub(admin_channel), failures)
        await _scenario(demo, sessions)
        await admin_channel.close()
    finally:
        await router.stop(grace=1)
        for pod in pods:
            await pod.stop()
    return verdict(failures, "ok: every session lives on exactly one pod and every call reached it")


if __name__ == "__main__":
    sys.exit(asyncio.run(run_demo()))
