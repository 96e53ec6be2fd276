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


async def run_demo(sessions: int = 6) -> int:
    import logging

    from macp_sdk import AuthConfig, DecisionSession, MacpClient

    logging.getLogger("macp_sdk").setLevel(logging.ERROR)  # "insecure channel" is the point here

    tokens = [router_entry("router"), agent_entry("coordinator"), agent_entry("reviewer")]
    pods = [SimPod(name, "127.0.0.1:0", auth_tokens=tokens, allow_insecure=True)
            for name in ("a", "b", "c")]
    for pod in pods:
        await pod.start()
    config = RouterConfig(
        listen="127.0.0.1:0",
        pods=tuple(PodSpec(pod.name, pod.address) for pod in pods),
        token="router",
        health_interval_ms=250,
    )
    router = Router(config)
    await router.start()
    failures: list[str] = []
    try:
        _say("macp-router demo: 3 simulated MACP runtime pods, one router (in-memory store), "
             "and the macp_sdk client")
        for pod in pods:
            _say(f"  pod {pod.name:<6} {pod.address}")
        _say(f"  router   {router.address}")
        _say('  the router\'s token on every pod: {"token": "router", "sender": "macp-router", '
             '"is_observer": true, "can_manage_mode_registry": true}')
        _say("  waiting for the router's watch feeds ...")
        if not await router.wait_ready(10):
            _say("error: the router's watch feeds did not come up within 10 s")
            return 1

        client = MacpClient(target=router.address, allow_insecure=True,
                            auth=AuthConfig.for_dev_agent("coordinator"), default_timeout=10.0)
        admin_channel = grpc.aio.insecure_channel(router.address)
        admin = router_pb2_grpc.RouterAdminStub(admin_channel)

        async def where(sid: str, probe: bool = False) -> router_pb2.SessionStatusResponse:
            return await admin.SessionStatus(
                router_pb2.SessionStatusRequest(session_id=sid, probe=probe), timeout=5
            )

        # 1. Sessions started through the router: placed, then proposed to and read back.
        def start_sessions() -> list[str]:
            client.initialize()
            sids = []
            for index in range(sessions):
                session = DecisionSession(client)
                ack = session.start(intent=f"pick a vendor #{index}",
                                    participants=["coordinator", "reviewer"], ttl_ms=600_000)
                if not ack.ok:
                    failures.append(f"start {session.session_id}: {ack.error.code}")
                ack = session.propose(f"proposal-{index}", "vendor-a", rationale="cheapest")
                if not ack.ok:
                    failures.append(f"propose {session.session_id}: {ack.error.code}")
                client.get_session(session.session_id)
                sids.append(session.session_id)
            return sids

        _say()
        _say(f"1. start {sessions} sessions through the router (start, propose, get_session)")
        sids = await asyncio.to_thread(start_sessions)
        _say(f"   {'SESSION':<38}{'POD':<6}HOW THE ROUTER KNEW")
        for sid in sids:
            holders = [pod.name for pod in pods if sid in pod.sessions]
            status = await where(sid)
            if len(holders) != 1 or status.pod != holders[0]:
                failures.append(f"{sid}: held by {holders}, router says {status.pod}")
            how = ("placed by the router; the pod's Ack and watch feed confirmed it"
                   if status.state == "open" else f"placed by the router ({status.state})")
            _say(f"   {sid:<38}{status.pod:<6}{how}")
        spread = sorted({pod.name for pod in pods for sid in sids if sid in pod.sessions})
        _say(f"   spread over pods: {', '.join(spread)}")

        # 2. A session created behind the router's back, directly on pod c.
        _say()
        _say("2. create a session directly on pod c (bypassing the router), then use it "
             "through the router")
        direct = MacpClient(target=pods[2].address, allow_insecure=True,
                            auth=AuthConfig.for_dev_agent("coordinator"), default_timeout=10.0)

        def start_direct() -> str:
            direct.initialize()
            session = DecisionSession(direct)
            session.start(intent="created behind the router's back",
                          participants=["coordinator"], ttl_ms=600_000)
            return session.session_id

        direct_sid = await asyncio.to_thread(start_direct)
        feed = router.feeds["c"]
        await feed.wait_for(lambda f: router.locator.try_cached(direct_sid) is not None, 5)
        status = await where(direct_sid)
        _say(f"   {direct_sid} -> pod {status.pod or '?'} (source: {status.source}: "
             "learned from pod c's WatchSessions feed, no probe)")

        def propose_via_router() -> bool:
            session = DecisionSession(client, session_id=direct_sid)
            return session.propose("p-direct", "vendor-b").ok

        ok = await asyncio.to_thread(propose_via_router)
        _say(f"   propose through the router -> {'accepted by pod c' if ok else 'REJECTED'}")
        if not ok:
            failures.append(f"propose {direct_sid} through the router was rejected")

        # 3. A miss: forget the route and let the router ask every pod at once.
        probes_before = sum(pod.calls["GetSession"] for pod in pods)
        fresh = await where(direct_sid, probe=True)
        probes = sum(pod.calls["GetSession"] for pod in pods) - probes_before
        _say(f"   locate it from scratch -> live on pod {fresh.pod} (source: {fresh.source}: "
             f"{probes} parallel GetSession probes, first live answer wins)")
        if fresh.pod != "c":
            failures.append(f"probe located {direct_sid} on {fresh.pod!r}, expected c")

        # 4. Discovery and an unknown session.
        _say()
        listed = await asyncio.to_thread(client.list_sessions)
        ids = [meta.session_id for meta in listed]
        _say(f"3. list_sessions through the router: {len(ids)} sessions merged from "
             f"{len(pods)} pods, {len(ids) - len(set(ids))} duplicates")
        if not set(sids) | {direct_sid} <= set(ids):
            failures.append("list_sessions missed sessions")
        unknown = str(uuid.uuid4())
        try:
            await asyncio.to_thread(client.get_session, unknown)
            failures.append(f"get_session({unknown}) did not fail")
            answer = "found?!"
        except grpc.RpcError as exc:
            answer = f"{exc.code().name}: {exc.details()}"
        _say(f"4. get_session(random id) -> {answer}")

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
        client.close()
        direct.close()
        await admin_channel.close()
    finally:
        await router.stop(grace=1)
        for pod in pods:
            await pod.stop()
    if failures:
        _say("FAILED:")
        for failure in failures:
            _say(f"  - {failure}")
        return 1
    _say("ok: every session lives on exactly one pod and every call reached it")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(run_demo()))
