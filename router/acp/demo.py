"""`macp-router demo --acp`: the ACP reconnect flow end to end, self-checking.

Three simulated ACP agent pods (sharing one sessions directory) and the ACP front door run in
this process on free loopback ports; the real `acp` client talks to the router over acp's
Streamable HTTP transport: new session, prompt (streamed updates + a permission round trip),
reconnect: status live -> prompt; the holding pod restarts (memory lost): status not_found ->
load lands on a chosen pod (history replayed) -> prompt. Returns 0 when every check held, 1
otherwise (each failed check is printed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import acp
from acp import helpers
from acp.http import create_http_stream
from acp.schema import AllowedOutcome, RequestPermissionResponse

from router.acp.config import AcpConfig, AcpPodSpec
from router.acp.frontdoor import AcpFrontDoor
from router.demo import verdict
from router.sim.acp_pod import AcpSimPod

T = 10.0


def _say(text: str = "") -> None:
    print(text, flush=True)


class _DemoClient:
    def __init__(self) -> None:
        self.updates: list[tuple[str, str]] = []
        self.permissions = 0

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        content = getattr(update, "content", None)
        self.updates.append((session_id, getattr(content, "text", "") or ""))

    async def request_permission(
        self, session_id: str, tool_call: Any, options: Any, **kwargs: Any
    ) -> RequestPermissionResponse:
        self.permissions += 1
        _say(f"   <- permission asked for {tool_call.title!r}: answering allow")
        return RequestPermissionResponse(
            outcome=AllowedOutcome(outcome="selected", option_id="allow")
        )


async def _connect(url: str, recorder: _DemoClient) -> Any:
    conn = acp.connect_to_agent(recorder, create_http_stream(url))
    await asyncio.wait_for(conn.initialize(protocol_version=1), T)
    return conn


async def _status(conn: Any, sid: str) -> str:
    reply = await asyncio.wait_for(
        conn._conn.send_request("session/status", {"sessionId": sid}), T
    )
    return str(reply["status"])


@dataclass
class _AcpDemo:
    """What the demo's steps share: pods, front door, open client connections, failed checks."""

    pods: list[AcpSimPod]
    frontdoor: AcpFrontDoor
    conns: list[Any] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)

    def holders(self, sid: str) -> list[str]:
        return [pod.name for pod in self.pods if sid in pod.sessions]

    def by_name(self, name: str) -> AcpSimPod:
        return next(pod for pod in self.pods if pod.name == name)

    async def connect(self, recorder: _DemoClient) -> Any:
        conn = await _connect(self.frontdoor.url, recorder)
        self.conns.append(conn)
        return conn

    async def close_all(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), T)


def _frontdoor(pods: list[AcpSimPod]) -> AcpFrontDoor:
    """The ACP front door over `pods` (not started)."""
    return AcpFrontDoor(AcpConfig(
        listen="127.0.0.1:0",
        pods=tuple(AcpPodSpec(pod.name, pod.url) for pod in pods),
        health_interval_ms=250,
    ))


def _introduce(pods: list[AcpSimPod], frontdoor: AcpFrontDoor) -> None:
    _say("macp-router demo --acp: 3 simulated ACP agent pods, the ACP front door, and "
         "the acp client (Streamable HTTP)")
    for pod in pods:
        _say(f"  pod {pod.name:<6} {pod.url}")
    _say(f"  router   {frontdoor.url}")


async def _new_session_and_prompt(demo: _AcpDemo) -> tuple[str, str]:
    """Step 1: a new session, placed by the router, and a prompt to it; (session, holder)."""
    recorder = _DemoClient()
    conn = await demo.connect(recorder)
    new = await asyncio.wait_for(conn.new_session(cwd="/work", mcp_servers=[]), T)
    sid = str(new.session_id)
    held = demo.holders(sid)
    demo.check(len(held) == 1, f"new session {sid} live on {held}, expected one pod")
    holder = held[0] if held else "?"
    _say()
    _say(f"1. session/new -> {sid} placed on pod {holder}")
    reply = await asyncio.wait_for(conn.prompt(
        session_id=sid, prompt=[helpers.text_block("write notes, ask permission")]), T)
    chunks = [text for s, text in recorder.updates if s == sid]
    _say(f"   session/prompt -> {reply.stop_reason}; {len(chunks)} session/update "
         f"chunks streamed back, e.g. {chunks[0] if chunks else None!r}")
    demo.check(reply.stop_reason == "end_turn", f"prompt stopped with {reply.stop_reason}")
    demo.check(recorder.permissions == 1, "the permission request did not round-trip")
    demo.check(any(text.startswith(f"[{holder}]") for text in chunks),
               f"no update came from the holding pod {holder}")
    await conn.close()
    demo.conns.remove(conn)
    return sid, holder


async def _reconnect_and_prompt(demo: _AcpDemo, sid: str, holder: str) -> tuple[Any, _DemoClient]:
    """Step 2: a new connection asks status first, then prompts without loading."""
    recorder = _DemoClient()
    conn = await demo.connect(recorder)
    status = await _status(conn, sid)
    _say()
    _say(f"2. reconnect: session/status -> {status} (the router's locator answered)")
    demo.check(status == "live", f"status after reconnect was {status}")
    reply = await asyncio.wait_for(conn.prompt(
        session_id=sid, prompt=[helpers.text_block("still there?")]), T)
    _say(f"   live, so prompt directly -> {reply.stop_reason} from pod {holder}")
    demo.check(demo.by_name(holder).calls["session/prompt"] == 2,
               "the reconnected prompt did not reach the holding pod")
    return conn, recorder


async def _restart_holder(demo: _AcpDemo, conn: Any, sid: str, holder: str) -> None:
    """Step 3: the holding pod restarts and forgets the session."""
    await demo.by_name(holder).restart()
    healthy = await demo.frontdoor.roster.get(holder).wait_healthy(T)  # type: ignore[union-attr]
    demo.check(healthy, f"pod {holder} did not come back")
    status = await _status(conn, sid)
    _say()
    _say(f"3. pod {holder} restarts (memory lost) -> session/status -> {status}")
    demo.check(status == "not_found", f"status after the restart was {status}")


async def _load_and_prompt(demo: _AcpDemo, conn: Any, recorder: _DemoClient, sid: str) -> None:
    """Step 4: load; the router places it on a chosen pod, which replays the history."""
    recorder.updates.clear()
    await asyncio.wait_for(
        conn.load_session(cwd="/work", session_id=sid, mcp_servers=[]), T
    )
    loads = {pod.name: pod.calls["session/load"] for pod in demo.pods}
    held = demo.holders(sid)
    replayed = [text for s, text in recorder.updates if s == sid]
    _say(f"4. session/load -> placed on pod {', '.join(held) or '?'} "
         f"({len(replayed)} history updates replayed); loads per pod: {loads}")
    demo.check(len(held) == 1 and sum(loads.values()) == 1,
               f"load ran on {loads}, session live on {held}")
    reply = await asyncio.wait_for(conn.prompt(
        session_id=sid, prompt=[helpers.text_block("and after the restart?")]), T)
    status = await _status(conn, sid)
    _say(f"   session/prompt -> {reply.stop_reason}; session/status -> {status}")
    demo.check(reply.stop_reason == "end_turn" and status == "live",
               "the loaded session did not answer")


def _report_router(frontdoor: AcpFrontDoor) -> None:
    metrics = frontdoor.metrics.registry.get_sample_value
    fanouts = metrics("macp_router_probe_fanouts_total", {"protocol": "acp"}) or 0
    _say()
    _say(f"router: {fanouts:.0f} session/status probe fan-outs; cached sessions: "
         f"{len(frontdoor.locator.near)}")


async def _scenario(demo: _AcpDemo) -> None:
    """Steps 1-4 against a ready front door, then the router's own figures."""
    sid, holder = await _new_session_and_prompt(demo)
    conn, recorder = await _reconnect_and_prompt(demo, sid, holder)
    await _restart_holder(demo, conn, sid, holder)
    await _load_and_prompt(demo, conn, recorder, sid)
    _report_router(demo.frontdoor)


async def run_acp_demo() -> int:
    logging.getLogger("macp_router.acp").setLevel(logging.ERROR)
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="macp-acp-demo-") as sessions_dir:
        pods = [AcpSimPod(name, "127.0.0.1:0", sessions_dir) for name in ("a", "b", "c")]
        demo: _AcpDemo | None = None
        try:
            for pod in pods:
                await pod.start()
            demo = _AcpDemo(pods, _frontdoor(pods), failures=failures)
            await demo.frontdoor.start()
            _introduce(pods, demo.frontdoor)
            if not await demo.frontdoor.wait_ready(T):
                _say("error: the ACP pods did not become healthy within 10 s")
                return 1
            await _scenario(demo)
        finally:
            if demo is not None:
                await demo.close_all()
                await demo.frontdoor.aclose()
            for pod in pods:
                await pod.stop()
    return verdict(failures, "ok: prompts reached the live pod, and after the restart the session "
                             "was loaded on exactly one pod")


if __name__ == "__main__":
    sys.exit(asyncio.run(run_acp_demo()))
