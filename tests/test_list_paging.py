"""ListSessions paging through a router: one fan-out per listing, later pages from its snapshot.

Real grpc.aio servers on loopback (simulated pods, an in-process router), raw stubs with a
deadline on every RPC. The pods' own counters (`SimPod.calls["ListSessions"]`) tell how many
fan-outs a listing cost; `macp_router_list_snapshots` what the router holds.
"""

from __future__ import annotations

import grpc
import pytest
from macp.v1 import core_pb2, core_pb2_grpc
from macp_sdk import AsyncMacpClient, AuthConfig

from router.app import Router
from router.macp.listing import TOKEN_PREFIX
from router.sim import SimPod
from tests.macp_calls import METADATA, TIMEOUT, start
from tests.waiting import eventually

OTHER_CALLER = (("authorization", "Bearer alice"),)


def list_calls(pods: list[SimPod]) -> dict[str, int]:
    return {pod.name: pod.calls["ListSessions"] for pod in pods}


def list_calls_since(pods: list[SimPod], before: dict[str, int]) -> dict[str, int]:
    """ListSessions calls each pod got since `before` (a `list_calls` reading)."""
    now = list_calls(pods)
    return {name: now[name] - before[name] for name in before}


def snapshots(router: Router) -> float | None:
    return router.metrics.registry.get_sample_value("macp_router_list_snapshots")


async def page(
    channel: grpc.aio.Channel, token: str = "", size: int = 3, metadata: tuple = METADATA
) -> core_pb2.ListSessionsResponse:
    return await core_pb2_grpc.MACPRuntimeServiceStub(channel).ListSessions(
        core_pb2.ListSessionsRequest(page_size=size, page_token=token),
        metadata=metadata, timeout=TIMEOUT)


async def rejected(call: object) -> str:
    """Await `call`, expect INVALID_ARGUMENT; return its details."""
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await call  # type: ignore[misc]
    assert excinfo.value.code() is grpc.StatusCode.INVALID_ARGUMENT, excinfo.value.details()
    return excinfo.value.details() or ""


async def test_a_client_reading_10_pages_costs_one_list_sessions_per_pod(sim_pods, make_router):
    pods = await sim_pods(3, start_limit_per_minute=1000)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        sids = {await start(channel) for _ in range(30)}
        before = list_calls(pods)
        first = await page(channel)
        assert snapshots(router) == 1
        late = await start(channel)  # started after the listing began: not in its snapshot
        seen = [s.session_id for s in first.sessions]
        token, pages = first.next_page_token, 1
        while token:
            assert token.startswith(TOKEN_PREFIX)
            reply = await page(channel, token)
            seen.extend(s.session_id for s in reply.sessions)
            token, pages = reply.next_page_token, pages + 1
        assert pages == 10
        assert len(seen) == 30 and set(seen) == sids  # no duplicates, no gaps, one snapshot
        assert late not in seen
        assert list_calls_since(pods, before) == {pod.name: 1 for pod in pods}

        # A listing that fits in one page keeps nothing.
        whole = await page(channel, size=1000)
        assert len(whole.sessions) == 31 and not whole.next_page_token
        assert snapshots(router) == 1


async def test_the_sdk_lists_every_session_in_pages_with_one_fan_out(sim_pods, make_router):
    pods = await sim_pods(3, start_limit_per_minute=1000)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        sids = {await start(channel) for _ in range(12)}
    before = list_calls(pods)
    client = AsyncMacpClient(target=router.address, allow_insecure=True,
                             auth=AuthConfig.for_dev_agent("coordinator"),
                             default_timeout=TIMEOUT)
    try:
        listed = await client.list_sessions(page_size=5)  # 3 pages, tokens followed by the SDK
    finally:
        await client.close()
    assert sorted(s.session_id for s in listed) == sorted(sids)
    assert list_calls_since(pods, before) == {pod.name: 1 for pod in pods}


async def test_a_listing_not_read_for_its_idle_time_expires(sim_pods, make_router):
    pods = await sim_pods(2)
    router = await make_router(pods, list_snapshot_idle_s=0.5)
    async with grpc.aio.insecure_channel(router.address) as channel:
        for _ in range(4):
            await start(channel)
        first = await page(channel, size=2)
        assert first.next_page_token and snapshots(router) == 1
        await eventually(lambda: snapshots(router) == 0, timeout=10)  # no call needed to free it
        details = await rejected(page(channel, first.next_page_token, size=2))
        assert "list again without a page_token" in details and "no longer holds" in details


async def test_past_list_snapshots_the_least_recently_read_listing_is_dropped(
    sim_pods, make_router
):
    pods = await sim_pods(2)
    router = await make_router(pods, list_snapshots=2)
    async with grpc.aio.insecure_channel(router.address) as channel:
        for _ in range(4):
            await start(channel)
        first, second = await page(channel, size=1), await page(channel, size=1)
        await page(channel, second.next_page_token, size=1)  # the first is now the oldest read
        third = await page(channel, size=1)
        assert snapshots(router) == 2
        details = await rejected(page(channel, first.next_page_token, size=1))
        assert "list again without a page_token" in details
        for listing in (second, third):
            assert len((await page(channel, listing.next_page_token, size=1)).sessions) == 1


async def test_an_altered_token_is_rejected(sim_pods, make_router):
    pods = await sim_pods(2)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        for _ in range(4):
            await start(channel)
        token = (await page(channel, size=1)).next_page_token
        body = token[len(TOKEN_PREFIX):]
        flipped = TOKEN_PREFIX + body[:10] + ("A" if body[10] != "A" else "B") + body[11:]
        assert "not issued by this router process" in await rejected(page(channel, flipped))
        assert "malformed" in await rejected(page(channel, token[:-4]))
        assert "not issued by this router" in await rejected(page(channel, "r1.MTIzOmFiYw"))
        # The genuine token still reads its page.
        assert len((await page(channel, token, size=1)).sessions) == 1


async def test_a_token_from_another_router_process_fails_clearly(sim_pods, make_router):
    pods = await sim_pods(2)
    one = await make_router(pods)
    other = await make_router(pods)
    async with (grpc.aio.insecure_channel(one.address) as first,
                grpc.aio.insecure_channel(other.address) as second):
        for _ in range(4):
            await start(first)
        token = (await page(first, size=2)).next_page_token
        details = await rejected(page(second, token, size=2))
        assert "another router replica or worker" in details
        assert "list again without a page_token" in details


async def test_a_token_is_honoured_only_for_the_credentials_that_listed(sim_pods, make_router):
    pods = await sim_pods(2)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        for _ in range(4):
            await start(channel)
        token = (await page(channel, size=2)).next_page_token
        assert "other credentials" in await rejected(
            page(channel, token, size=2, metadata=OTHER_CALLER))
        assert len((await page(channel, token, size=2)).sessions) == 2
