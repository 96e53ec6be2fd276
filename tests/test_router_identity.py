"""The router's own identity toward v0.6.1-strict pods: configuration errors are named, not silent.

Real grpc.aio servers on loopback: simulated pods configured with token entries (tests.pod_auth)
as an operator configures the runtime, an in-process router, the admin API, /readyz over HTTP,
the Prometheus registry, and the real macp_sdk client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
from macp.v1 import core_pb2_grpc, policy_pb2
from macp_sdk import AsyncMacpClient, AuthConfig, MacpTransportError

from router.cli import format_pod_table
from router.v1 import router_pb2, router_pb2_grpc
from tests import macp_calls
from tests.waiting import eventually

T = 5.0


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def rejected_gauge(router, pod: str) -> float | None:  # type: ignore[no-untyped-def]
    return router.metrics.registry.get_sample_value(
        "macp_router_pod_credentials_rejected", {"pod": pod})


async def list_pods(router) -> router_pb2.ListPodsResponse:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(router.address) as channel:
        return await router_pb2_grpc.RouterAdminStub(channel).ListPods(
            router_pb2.ListPodsRequest(), timeout=T)


async def test_a_token_the_pods_reject_is_named_in_pods_readyz_metric_log_and_client_miss(
    sim_pods, make_router, caplog
):
    caplog.set_level(logging.ERROR, logger="macp_router.pods")
    pods = await sim_pods(2)
    router = await make_router(pods, token="not-a-configured-token", wait=False,
                               metrics_listen="127.0.0.1:0")

    async def both_rejected() -> bool:
        reply = await list_pods(router)
        return all(p.credentials_rejected for p in reply.pods)

    await eventually(both_rejected, what="both pods shown as rejecting the router's token")
    reply = await list_pods(router)
    for pod in reply.pods:
        assert "UNAUTHENTICATED" in pod.credentials_rejected and not pod.feed_up
    table = format_pod_table(reply)
    assert table.count("rejects the router's credentials") >= 2
    assert "--token or --token-file" in table and "is_observer" in table

    status, detail = await asyncio.to_thread(readyz, router.metrics_port)
    assert status == 503 and not detail["ready"]
    assert "rejects the router's credentials" in detail["reason"]
    assert all(p["credentials_rejected"] for p in detail["pods"].values())
    assert rejected_gauge(router, "a") == 1 and rejected_gauge(router, "b") == 1

    errors = [r.getMessage() for r in caplog.records if "rejects the router's" in r.getMessage()]
    assert len(errors) == 2, errors  # one line per pod, not one per reconnect
    assert all("--token or --token-file" in line for line in errors)
    assert all("not-a-configured-token" not in line for line in errors)

    # A client with a valid token sends to a session: the miss names the cause. (A GetSession
    # miss is not asked with the router's token but with the client's own: the pods answer it.)
    async with grpc.aio.insecure_channel(router.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await macp_calls.send(channel, macp_calls.proposal_envelope(str(uuid.uuid4())))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "rejects the router's credentials" in (err.value.details() or "")
    assert "did not answer within" not in (err.value.details() or "")
    # `macp-router status SID --probe` says the same.
    async with grpc.aio.insecure_channel(router.address) as channel:
        status = await router_pb2_grpc.RouterAdminStub(channel).SessionStatus(
            router_pb2.SessionStatusRequest(session_id=str(uuid.uuid4()), probe=True),
            timeout=T)
    assert status.status == "unknown" and "rejects the router's credentials" in status.detail


async def test_a_rotated_token_file_is_reread_without_restart(sim_pods, make_router, tmp_path):
    pods = await sim_pods(1)
    token_file = tmp_path / "router-token"
    token_file.write_text("stale-token\n")
    router = await make_router(pods, token=None, token_file=str(token_file), wait=False)
    router.credentials.poll_s = 0.1  # the watch loop reads the new interval on its next tick
    await eventually(lambda: pods[0].name in {p.name for p in router.pods
                                              if p.credentials_rejected},
                     what="the stale token rejected")
    token_file.write_text("router\n")  # the rotated token, as a re-mounted Secret
    assert await router.wait_ready(15), "feed did not come up with the re-read token"
    assert router.credentials.reloads == 1
    await eventually(lambda: rejected_gauge(router, "a") == 0, what="gauge back to 0")
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await macp_calls.start(channel)
        assert (await macp_calls.get_session(channel, sid)).metadata.session_id == sid


async def test_a_non_observer_router_token_still_locates_sessions(sim_pods, make_router):
    """GetSession answered PERMISSION_DENIED means "here, but not yours": live, not rejected."""
    pods = await sim_pods(3)
    direct = pods[1]
    async with grpc.aio.insecure_channel(direct.address) as channel:
        sid = await macp_calls.start(channel)  # coordinator's session, placed on b by hand
    router = await make_router(pods, token="outsider")  # authenticated, no observer right
    assert await router.proxy.probe("b", sid) == "live"  # PERMISSION_DENIED: it is there
    assert await router.proxy.probe("a", sid) == "not_found"
    async with grpc.aio.insecure_channel(router.address) as channel:
        ack = await macp_calls.send(channel, macp_calls.proposal_envelope(sid))
        assert ack.ok, ack
    assert sid in direct.sessions and len(direct.sessions[sid].log) == 2
    assert all(not p.credentials_rejected for p in router.pods)


async def test_probe_credentials_miss_is_named_for_the_sdk_client(sim_pods, make_router):
    pods = await sim_pods(1)
    router = await make_router(pods, token="nope", wait=False)
    await eventually(lambda: all(p.credentials_rejected for p in router.pods))
    client = AsyncMacpClient(target=router.address, allow_insecure=True,
                             auth=AuthConfig.for_dev_agent("coordinator"), default_timeout=T)
    try:
        # CancelSession (a GetSession miss is probed with the client's own token, which the
        # pod accepts): the SDK wraps the status, and keeps its code and details.
        with pytest.raises(MacpTransportError) as err:
            await client.cancel_session(str(uuid.uuid4()), reason="test")
        assert err.value.code == "UNAVAILABLE"
        assert "rejects the router's credentials" in str(err.value)
    finally:
        await client.close()


async def test_a_replay_refused_for_lack_of_registry_rights_is_shown(sim_pods, make_router):
    pods = await sim_pods(2)
    router = await make_router(pods[:1], token="ops")  # observer, no registry rights
    policy = policy_pb2.PolicyDescriptor(policy_id="p.rights", mode=macp_calls.MODE)
    async with grpc.aio.insecure_channel(router.address) as channel:
        reply = await core_pb2_grpc.MACPRuntimeServiceStub(channel).RegisterPolicy(
            policy_pb2.RegisterPolicyRequest(policy_descriptor=policy),
            metadata=macp_calls.METADATA, timeout=T)  # the client's own (admin) token
        assert reply.ok
    router.pods.add(type(router.config.pods[0])(pods[1].name, pods[1].address))

    async def b_rejects() -> bool:
        pod = router.pods.get("b")
        return pod is not None and "PERMISSION_DENIED" in pod.credentials_rejected

    await eventually(b_rejects, what="b shown as refusing the router's replay")
    assert "RegisterPolicy replay" in router.pods.get("b").credentials_rejected  # type: ignore[union-attr]
    assert "p.rights" not in pods[1].policies


async def test_older_runtime_without_health_service_is_checked_with_get_manifest(
    sim_pods, make_router, caplog
):
    caplog.set_level(logging.WARNING, logger="macp_router.pods")
    pods = await sim_pods(2, health=False)
    router = await make_router(pods)
    await eventually(lambda: all(p.healthy for p in router.pods), what="both pods healthy")
    lines = [r.getMessage() for r in caplog.records if "no grpc.health.v1" in r.getMessage()]
    assert len(lines) == 2 and all("GetManifest" in line for line in lines)
    assert all(p.health_fallback for p in router.pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await macp_calls.start(channel)
        assert (await macp_calls.get_session(channel, sid)).metadata.session_id == sid
    # A stopped old pod is still found unhealthy through the fallback.
    await pods[0].stop()
    await eventually(lambda: not router.pods.get("a").healthy,  # type: ignore[union-attr]
                     what="a unhealthy once stopped")
    assert len([r for r in caplog.records if "no grpc.health.v1" in r.getMessage()]) == 2
