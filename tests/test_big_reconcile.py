"""One huge ListSessions reply: the runtime (v0.6.1) lists every in-memory session at once.

A pod holding 60,000 sessions (terminal ones too, as within the runtime's retention) answers
ListSessions with one reply well past gRPC's usual 16 MiB; the router's feed must come up and
reconcile, clients keep the router's own paging, and a reply over `--max-list-bytes` is one
clear log line naming the pod and the flag, never a hang or a crash.
"""

from __future__ import annotations

import logging

import grpc
import pytest
from macp.v1 import core_pb2, core_pb2_grpc

from loadtest.bigreconcile import synthetic_state
from tests.macp_calls import METADATA, TIMEOUT

LIST_PATH = "/macp.v1.MACPRuntimeService/ListSessions"


async def reply_size(address: str) -> int:
    options = [("grpc.max_receive_message_length", 512 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        raw = await channel.unary_unary(LIST_PATH)(
            b"", metadata=(("authorization", "Bearer router"),), timeout=60)
    return len(raw)


async def test_a_pod_with_60000_sessions_reconciles_and_clients_get_router_pages(
    named_pods, make_router, tmp_path
):
    synthetic_state(str(tmp_path / "pod-a.json"), "a", 60_000)
    (a,) = await named_pods("a", persist=True)
    assert len(a.sessions) == 60_000
    assert await reply_size(a.address) > 16 * 1024 * 1024  # past the usual message limit

    router = await make_router([a], wait=False)
    assert await router.wait_ready(120), router.feeds["a"].last_error
    assert len(router.locator.near) == 60_000
    assert router.pods.get("a").placeable  # type: ignore[union-attr]

    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        first = await stub.ListSessions(core_pb2.ListSessionsRequest(page_size=500),
                                        metadata=METADATA, timeout=60)
        assert len(first.sessions) == 500 and first.next_page_token.startswith("r2.")
        second = await stub.ListSessions(
            core_pb2.ListSessionsRequest(page_size=500, page_token=first.next_page_token),
            metadata=METADATA, timeout=60)
        assert not {s.session_id for s in first.sessions} & {s.session_id for s in second.sessions}


async def test_a_list_reply_over_the_limit_is_one_clear_line_and_nothing_hangs(
    named_pods, make_router, tmp_path, caplog
):
    synthetic_state(str(tmp_path / "pod-a.json"), "a", 20_000)  # about 6 MiB
    (a,) = await named_pods("a", persist=True)
    caplog.set_level(logging.ERROR, logger="macp_router")
    router = await make_router([a], wait=False, max_list_bytes=1024 * 1024)
    feed = router.feeds["a"]
    assert await feed.wait_for(lambda f: "--max-list-bytes" in f.last_error, 20)
    lines = [r.getMessage() for r in caplog.records if "--max-list-bytes" in r.getMessage()]
    assert lines and "pod a" in lines[0] and "raise --max-list-bytes" in lines[0]
    pod = router.pods.get("a")
    assert pod is not None and pod.healthy and not pod.placeable
    assert "feed" in pod.not_placeable_reason

    sid = next(iter(a.sessions))
    async with grpc.aio.insecure_channel(router.address) as channel:
        # The feed's snapshot events still taught the router where sessions are.
        await feed.wait_for(lambda f: router.locator.try_cached(sid) == "a", 20)
        reply = await core_pb2_grpc.MACPRuntimeServiceStub(channel).GetSession(
            core_pb2.GetSessionRequest(session_id=sid), timeout=TIMEOUT,
            metadata=(("authorization", "Bearer observer"),))  # an observer may read it
        assert reply.metadata.session_id == sid
        with pytest.raises(grpc.aio.AioRpcError) as listed:
            await core_pb2_grpc.MACPRuntimeServiceStub(channel).ListSessions(
                core_pb2.ListSessionsRequest(), metadata=METADATA, timeout=TIMEOUT)
    assert listed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "pod a" in listed.value.details() and "--max-list-bytes" in listed.value.details()
