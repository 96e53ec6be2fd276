"""A registry call the store cannot remember is never reported as remembered.

Real pods (simulated runtime) and a router on loopback, the Redis store on a real server the
test pauses (SIGSTOP: calls to it time out, its data is kept) and resumes. What is checked is
what the caller, the operator and a pod that restarts later each see.
"""

from __future__ import annotations

import logging
import signal

import grpc
from macp.v1 import core_pb2_grpc, policy_pb2

from router.macp.broadcast import REPLAY_HEADER, UNCONFIRMED, WARNING_HEADER
from router.sim import SimPod
from tests.macp_calls import METADATA, MODE, TIMEOUT
from tests.pod_auth import pod_options
from tests.waiting import eventually


def policy(policy_id: str) -> policy_pb2.RegisterPolicyRequest:
    return policy_pb2.RegisterPolicyRequest(policy_descriptor=policy_pb2.PolicyDescriptor(
        policy_id=policy_id, mode=MODE, rules=b"{}", schema_version=1))


async def register(channel: grpc.aio.Channel, policy_id: str
                   ) -> tuple[policy_pb2.RegisterPolicyResponse, dict[str, str]]:
    """RegisterPolicy through the router: (its answer, its trailing metadata)."""
    call = core_pb2_grpc.MACPRuntimeServiceStub(channel).RegisterPolicy(
        policy(policy_id), metadata=METADATA, timeout=TIMEOUT)
    reply = await call
    return reply, dict(await call.trailing_metadata() or ())


async def restart(pod: SimPod) -> SimPod:
    """Stop `pod` and start an empty one in its place (same name and port)."""
    port = pod.port
    await pod.stop()
    fresh = SimPod(pod.name, f"127.0.0.1:{port}", **pod_options())
    await fresh.start()
    return fresh


def failures(router: object, method: str) -> float:
    return router.metrics.registry.get_sample_value(  # type: ignore[attr-defined]
        "macp_router_broadcast_record_failures_total", {"method": method}) or 0.0


async def test_a_registration_a_hung_store_did_not_confirm_is_ok_with_the_truth_logged_counted(
    sim_pods, make_router, redis_server_factory, caplog
):
    server = redis_server_factory()
    a, b = await sim_pods(2)
    router = await make_router([a, b], redis_url=server.url)
    caplog.set_level(logging.WARNING, logger="macp_router")
    async with grpc.aio.insecure_channel(router.address) as channel:
        reply, trailing = await register(channel, "p.kept")
        assert reply.ok and REPLAY_HEADER not in trailing
        assert failures(router, "RegisterPolicy") == 0

        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)  # Redis hangs: every store call times out
        try:
            reply, trailing = await register(channel, "p.late")
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert reply.ok  # every pod holds it: the pods' own answer
        assert set(a.policies) == set(b.policies) == {"p.kept", "p.late"}
        assert trailing[REPLAY_HEADER] == UNCONFIRMED
        assert "pods that join or restart will NOT get it" in trailing[WARNING_HEADER]
        assert failures(router, "RegisterPolicy") == 1
        (line,) = [r.getMessage() for r in caplog.records if "p.late" in r.getMessage()]
        assert f"redis store ({server.url})" in line
        assert "call it again once the store answers" in line

        # What the caller was told to do works: call again once the store answers.
        await eventually(lambda: not router.store.degraded, timeout=20, what="store recovered")
        reply, trailing = await register(channel, "p.late")
        assert "already registered" in reply.error  # the pods' own answer: every pod holds it
        assert REPLAY_HEADER not in trailing
        assert [r.key for r in await router.store.broadcasts()] == [
            "policy:p.kept", "policy:p.late"]

        # A removal the store did not confirm: pods that join may get the old registration.
        server.process.send_signal(signal.SIGSTOP)
        try:
            call = core_pb2_grpc.MACPRuntimeServiceStub(channel).UnregisterPolicy(
                policy_pb2.UnregisterPolicyRequest(policy_id="p.kept"), metadata=METADATA,
                timeout=TIMEOUT)
            assert (await call).ok
            trailing = dict(await call.trailing_metadata() or ())
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert "p.kept" not in a.policies and "p.kept" not in b.policies
        assert trailing[REPLAY_HEADER] == UNCONFIRMED
        assert "did not forget the earlier registration" in trailing[WARNING_HEADER]
        assert "may get it again" in trailing[WARNING_HEADER]
        assert failures(router, "UnregisterPolicy") == 1
    assert failures(router, "RegisterPolicy") == 1


async def test_a_registration_the_store_refused_is_not_replayed_as_the_caller_was_told(
    sim_pods, make_router, redis_server_factory
):
    server = redis_server_factory()
    a, b = await sim_pods(2)
    router = await make_router([a, b], redis_url=server.url)
    async with grpc.aio.insecure_channel(router.address) as channel:
        assert (await register(channel, "p.kept"))[0].ok
        with server.client() as admin:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", "1")  # every write is refused (OOM), reads answer
            try:
                reply, trailing = await register(channel, "p.lost")
            finally:
                admin.config_set("maxmemory", "0")
        assert reply.ok and trailing[REPLAY_HEADER] == UNCONFIRMED
        assert "maxmemory" in trailing[WARNING_HEADER]  # Redis's own reason, passed on
        assert failures(router, "RegisterPolicy") == 1
        assert [r.key for r in await router.store.broadcasts()] == ["policy:p.kept"]

        fresh_b = await restart(b)
        try:
            await eventually(lambda: "p.kept" in fresh_b.policies, timeout=20,
                             what="the replay to the restarted b")
            assert "p.lost" not in fresh_b.policies
        finally:
            await fresh_b.stop()
