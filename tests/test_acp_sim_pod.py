"""The simulated ACP pod on its own (no router), and `macp-router demo --acp`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from acp.exceptions import RequestError

from router.acp.demo import run_acp_demo
from router.sim.acp_pod import AcpSimPod
from tests.acp_support import T, connect

pytestmark = pytest.mark.timeout(60)


async def test_status_is_live_only_while_the_session_is_in_this_pods_memory(
    tmp_path: Path,
) -> None:
    async with AcpSimPod("a", sessions_dir=tmp_path) as a, AcpSimPod("b",
                                                                      sessions_dir=tmp_path) as b:
        on_a = await connect(a.url, websocket=True)
        on_b = await connect(b.url, websocket=True)
        try:
            sid = await on_a.new()
            assert await on_a.status(sid) == "live"
            assert await on_b.status(sid) == "not_found"
            assert await on_a.prompt(sid, "hello") == "end_turn"
            calls_before = dict(a.calls)
            assert await on_a.status(sid) == "live"  # side-effect free: only the count moves
            assert a.sessions[sid].history[-1]["role"] == "agent"
            assert {k: v for k, v in a.calls.items() if k != "session/status"} == {
                k: v for k, v in calls_before.items() if k != "session/status"}

            # Shared directory: b can load it, and replays its history.
            await on_b.load(sid)
            assert await on_b.status(sid) == "live"
            assert on_b.recorder.texts(sid)[0] == "hello"
            await on_b.call("session/close", {"sessionId": sid})
            assert await on_b.status(sid) == "not_found"

            await a.restart()
            again = await connect(a.url, websocket=True)
            try:
                assert await again.status(sid) == "not_found"  # memory lost with the restart
                with pytest.raises(RequestError) as excinfo:
                    await again.prompt(sid, "are you there?")
                assert excinfo.value.code == -32002
                with pytest.raises(RequestError) as missing:
                    await again.load("sess_no_such_session")
                assert missing.value.code == -32002
                with pytest.raises(RequestError) as unknown:
                    await again.call("nonsense/method", {})
                assert unknown.value.code == -32601
            finally:
                await again.close()
            assert a.calls["session/status"] >= 3 and a.restarts == 1
        finally:
            await on_a.close()
            await on_b.close()


async def test_a_hung_pod_counts_calls_but_never_answers(tmp_path: Path) -> None:
    async with AcpSimPod("a", sessions_dir=tmp_path) as pod:
        client = await connect(pod.url)
        try:
            pod.hang()
            status = asyncio.ensure_future(client.status("sess_x"))
            done, _ = await asyncio.wait({status}, timeout=0.3)
            assert not done and pod.calls["session/status"] == 1
            pod.unhang()
            assert await asyncio.wait_for(status, T) == "not_found"
        finally:
            await client.close()


async def test_acp_demo_runs_the_reconnect_flow_and_checks_itself(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert await asyncio.wait_for(run_acp_demo(), 30) == 0
    out = capsys.readouterr().out
    assert "session/status -> not_found" in out
    assert "ok:" in out
