"""End to end: the real macp_sdk client, through an in-process router, against 3 simulated pods."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from macp_sdk import AuthConfig, DecisionSession, MacpClient

from router.sim import SimPod


def sdk_client(address: str, agent: str = "coordinator") -> MacpClient:
    return MacpClient(
        target=address,
        allow_insecure=True,
        auth=AuthConfig.for_dev_agent(agent),
        default_timeout=10.0,
    )


def holders(pods: list[SimPod], sid: str) -> list[str]:
    return [pod.name for pod in pods if sid in pod.sessions]


async def test_sdk_sessions_spread_over_pods_and_each_lives_on_exactly_one(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods)
    client = sdk_client(router.address)

    def flow() -> list[str]:
        client.initialize()
        sids = []
        for index in range(12):
            session = DecisionSession(client)
            ack = session.start(intent=f"choose {index}", participants=["coordinator", "b"],
                                ttl_ms=60_000)
            assert ack.ok, ack
            ack = session.propose(f"p{index}", "option-a", rationale="because")
            assert ack.ok, ack  # the pod refuses a proposal for a session it does not hold
            assert client.get_session(session.session_id).metadata.session_id == session.session_id
            sids.append(session.session_id)
        return sids

    sids = await asyncio.to_thread(flow)
    placements = {sid: holders(pods, sid) for sid in sids}
    assert all(len(where) == 1 for where in placements.values()), placements
    assert len({where[0] for where in placements.values()}) >= 2, placements

    listed = await asyncio.to_thread(client.list_sessions)
    listed_ids = [meta.session_id for meta in listed]
    assert sorted(listed_ids) == sorted(set(listed_ids)), "list_sessions has duplicates"
    assert set(sids) <= set(listed_ids)

    unknown = str(uuid.uuid4())
    with pytest.raises(grpc.RpcError) as excinfo:
        await asyncio.to_thread(client.get_session, unknown)
    assert excinfo.value.code() is grpc.StatusCode.NOT_FOUND
    client.close()


async def test_session_created_directly_on_a_pod_is_routed_to_it(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods)
    direct = sdk_client(pods[1].address)
    via_router = sdk_client(router.address)

    def flow() -> str:
        direct.initialize()
        session = DecisionSession(direct)
        assert session.start(intent="direct", participants=["coordinator"], ttl_ms=60_000).ok
        via_router.initialize()
        routed = DecisionSession(via_router, session_id=session.session_id)
        ack = routed.propose("p1", "x")
        assert ack.ok, ack
        return session.session_id

    sid = await asyncio.to_thread(flow)
    assert holders(pods, sid) == ["b"]
    assert pods[0].calls["Send"] == 0 and pods[2].calls["Send"] == 0
    direct.close()
    via_router.close()
