"""ACP front door routing, end to end: real acp clients -> router -> simulated ACP pods."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from acp.exceptions import RequestError

from tests.acp_support import T, acp_cluster

pytestmark = pytest.mark.timeout(60)

RETRYABLE = -32010


async def test_new_sessions_spread_over_pods_and_prompts_reach_the_holding_pod(
    tmp_path: Path,
) -> None:
    async with acp_cluster(tmp_path) as cluster:
        client = await cluster.client()
        sids = [await client.new() for _ in range(6)]
        holders = {sid: cluster.holders(sid) for sid in sids}
        assert all(len(pods) == 1 for pods in holders.values()), holders
        assert len({pods[0] for pods in holders.values()}) >= 2, holders

        for sid in sids:
            assert await client.prompt(sid, "please ask permission") == "end_turn"
        for sid in sids:
            holder = holders[sid][0]
            texts = client.recorder.texts(sid)
            chunks = [text for text in texts if text.startswith(f"[{holder}] chunk")]
            assert len(chunks) == 3, texts  # streamed updates relayed from the holding pod
            assert "permission: allow" in texts  # the client's answer reached the pod
        assert sorted(sid for sid, _ in client.recorder.permissions) == sorted(sids)
        prompts = cluster.calls("session/prompt")
        for pod in cluster.pods:
            assert prompts[pod.name] == sum(1 for p in holders.values() if p == [pod.name])
        first_pod = holders[sids[0]][0]
        assert cluster.metric("macp_router_placements_total", protocol="acp", pod=first_pod,
                              result="placed") >= 1


async def test_reconnect_prompts_a_live_session_and_loads_it_after_its_pod_restarted(
    tmp_path: Path,
) -> None:
    async with acp_cluster(tmp_path) as cluster:
        first = await cluster.client()
        sid = await first.new()
        assert await first.prompt(sid, "remember the number 7") == "end_turn"
        [holder] = cluster.holders(sid)
        await first.close()

        # A new client connection: status says live, so it prompts without loading.
        second = await cluster.client()
        assert await second.status(sid) == "live"
        assert await second.prompt(sid, "what was the number?") == "end_turn"
        assert sum(cluster.calls("session/load").values()) == 0
        assert cluster.calls("session/prompt")[holder] == 2

        # The holding pod restarts and loses its memory: not_found, then load on a chosen pod.
        await cluster.pod(holder).restart()
        assert await cluster.frontdoor.roster.get(holder).wait_healthy(T)
        assert await second.status(sid) == "not_found"
        await second.load(sid)
        loads = cluster.calls("session/load")
        assert sum(loads.values()) == 1, loads
        [loaded_on] = cluster.holders(sid)
        assert loads[loaded_on] == 1
        assert "remember the number 7" in second.recorder.texts(sid)  # history replayed
        assert await second.status(sid) == "live"
        assert await second.prompt(sid, "and now?") == "end_turn"
        assert any(text.startswith(f"[{loaded_on}] chunk") for text in second.recorder.texts(sid))


async def test_load_of_a_session_live_on_pod_b_lands_on_b_and_nowhere_else(
    tmp_path: Path,
) -> None:
    async with acp_cluster(tmp_path) as cluster:
        # Created on b behind the router's back: only a session/status probe can find it.
        direct = await cluster.direct("b")
        sid = await direct.new()
        client = await cluster.client()
        await client.load(sid)
        assert cluster.calls("session/load") == {"a": 0, "b": 1, "c": 0}
        assert cluster.holders(sid) == ["b"]
        assert cluster.metric("macp_router_locate_total", protocol="acp", result="probe_hit") >= 1
        assert await client.prompt(sid, "hello") == "end_turn"
        assert cluster.calls("session/prompt") == {"a": 0, "b": 1, "c": 0}

        # And a second load, now from the near-cache, still goes to b.
        other = await cluster.client()
        await other.load(sid)
        assert cluster.calls("session/load") == {"a": 0, "b": 2, "c": 0}


async def test_two_clients_loading_one_not_live_session_at_once_end_on_one_pod(
    tmp_path: Path,
) -> None:
    async with acp_cluster(tmp_path) as cluster:
        direct = await cluster.direct("a")
        sids = [await direct.new() for _ in range(5)]
        for sid in sids:  # stored in the shared directory, live nowhere
            await direct.call("session/close", {"sessionId": sid})
        assert all(cluster.holders(sid) == [] for sid in sids)
        one, two = await cluster.client(), await cluster.client()
        for sid in sids:
            before = cluster.calls("session/load")
            await asyncio.gather(one.load(sid), two.load(sid))
            after = cluster.calls("session/load")
            loaded_on = [pod for pod in after if after[pod] > before[pod]]
            assert len(loaded_on) == 1, (sid, before, after)
            assert cluster.holders(sid) == loaded_on
            assert await one.prompt(sid, "hi") == "end_turn"
            assert await two.prompt(sid, "hi") == "end_turn"


async def test_silent_pod_refuses_loads_with_a_retryable_error_and_other_pods_keep_serving(
    tmp_path: Path,
) -> None:
    async with acp_cluster(tmp_path, connect_timeout_ms=500) as cluster:
        client = await cluster.client()
        live = [await client.new() for _ in range(4)]
        direct = await cluster.direct("a")
        stored = await direct.new()
        await direct.call("session/close", {"sessionId": stored})

        cluster.pod("c").hang()
        with pytest.raises(RequestError) as excinfo:
            await client.load(stored)
        assert excinfo.value.code == RETRYABLE
        assert "c" in excinfo.value.data["unknownPods"]
        assert excinfo.value.data["retryable"] is True
        assert "retry" in str(excinfo.value)
        assert sum(cluster.calls("session/load").values()) == 0  # never a load on a guess
        with pytest.raises(RequestError) as status_error:
            await client.status(stored)
        assert status_error.value.code == RETRYABLE

        for sid in live:
            if cluster.holders(sid) != ["c"]:
                assert await client.prompt(sid, "still there?") == "end_turn"
        # Once the router has marked c unhealthy, new sessions avoid it.
        deadline = asyncio.get_running_loop().time() + T
        while cluster.frontdoor.roster.is_healthy("c"):
            assert asyncio.get_running_loop().time() < deadline, "c never marked unhealthy"
            await asyncio.sleep(0.05)
        new_sessions = [await client.new() for _ in range(4)]
        assert all(cluster.holders(sid) in (["a"], ["b"]) for sid in new_sessions)
        cluster.pod("c").unhang()


async def test_prompt_on_a_session_live_nowhere_says_load_it_first(tmp_path: Path) -> None:
    async with acp_cluster(tmp_path, count=2) as cluster:
        client = await cluster.client()
        with pytest.raises(RequestError) as excinfo:
            await client.prompt("sess_never_existed", "hello")
        assert excinfo.value.code == -32002
        assert "session/load" in str(excinfo.value)
        assert await client.status("sess_never_existed") == "not_found"


async def test_close_through_the_router_makes_the_session_not_found(tmp_path: Path) -> None:
    async with acp_cluster(tmp_path, count=2) as cluster:
        client = await cluster.client()
        sid = await client.new()
        assert await client.status(sid) == "live"
        await asyncio.wait_for(client.conn.close_session(session_id=sid), T)
        assert cluster.holders(sid) == []
        assert await client.status(sid) == "not_found"


async def test_cancel_reaches_the_pod_running_the_prompt(tmp_path: Path) -> None:
    async with acp_cluster(tmp_path, count=2) as cluster:
        client = await cluster.client()
        sid = await client.new()
        prompt = asyncio.ensure_future(client.prompt(sid, "a slow one"))
        [holder] = cluster.holders(sid)
        deadline = asyncio.get_running_loop().time() + T
        while cluster.pod(holder).calls["session/prompt"] == 0:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        await asyncio.wait_for(client.conn.cancel(session_id=sid), T)
        assert await prompt == "cancelled"
        assert cluster.calls("session/cancel")[holder] == 1


async def test_session_list_merges_every_pod_without_duplicates(tmp_path: Path) -> None:
    async with acp_cluster(tmp_path, pod_options={"list_page_size": 2}) as cluster:
        client = await cluster.client()
        sids = {await client.new() for _ in range(5)}
        listed = await asyncio.wait_for(client.conn.list_sessions(), T)
        ids = [info.session_id for info in listed.sessions]
        assert sorted(ids) == sorted(sids)  # shared dir: every pod lists all; merged once
        assert listed.next_cursor is None
        assert sum(cluster.calls("session/list").values()) == 3 * 3  # 3 pods x 3 pages of 2


async def test_a_prompt_on_a_stale_cached_route_is_rerouted_once_to_the_pod_now_holding_it(
    tmp_path: Path,
) -> None:
    async with acp_cluster(tmp_path) as cluster:
        client = await cluster.client()
        sid = await client.new()
        [old] = cluster.holders(sid)
        new = next(pod.name for pod in cluster.pods if pod.name != old)
        # Behind the router's back: closed on its pod, loaded on another.
        await (await cluster.direct(old)).call("session/close", {"sessionId": sid})
        await (await cluster.direct(new)).load(sid)
        assert cluster.holders(sid) == [new]
        assert cluster.frontdoor.locator.try_cached(sid) == old, "the route is stale"
        stale_before = cluster.metric("macp_router_locate_total", protocol="acp", result="stale")

        assert await client.prompt(sid, "still there?") == "end_turn"
        assert cluster.calls("session/prompt")[new] == 1
        assert cluster.frontdoor.locator.try_cached(sid) == new
        assert cluster.metric("macp_router_locate_total", protocol="acp",
                              result="stale") == stale_before + 1
