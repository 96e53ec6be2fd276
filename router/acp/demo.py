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
from typing import Any

import acp
from acp import helpers
from acp.http import create_http_stream
from acp.schema import AllowedOutcome, RequestPermissionResponse

from router.acp.config import AcpConfig, AcpPodSpec
from router.acp.frontdoor import AcpFrontDoor
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


async def run_acp_demo() -> int:
    logging.getLogger("macp_router.acp").setLevel(logging.ERROR)
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    with tempfile.TemporaryDirectory(prefix="macp-acp-demo-") as sessions_dir:
        pods = [AcpSimPod(name, "127.0.0.1:0", sessions_dir) for name in ("a", "b", "c")]
        frontdoor: AcpFrontDoor | None = None
        conns: list[Any] = []
        try:
            for pod in pods:
                await pod.start()
            frontdoor = AcpFrontDoor(AcpConfig(
                listen="127.0.0.1:0",
                pods=tuple(AcpPodSpec(pod.name, pod.url) for pod in pods),
                health_interval_ms=250,
            ))
            await frontdoor.start()
            _say("macp-router demo --acp: 3 simulated ACP agent pods, the ACP front door, and "
                 "the acp client (Streamable HTTP)")
            for pod in pods:
                _say(f"  pod {pod.name:<6} {pod.url}")
            _say(f"  router   {frontdoor.url}")
            if not await frontdoor.wait_ready(T):
                _say("error: the ACP pods did not become healthy within 10 s")
                return 1

            def holders(sid: str) -> list[str]:
                return [pod.name for pod in pods if sid in pod.sessions]

            def by_name(name: str) -> AcpSimPod:
                return next(pod for pod in pods if pod.name == name)

            # 1. A new session, placed by the router, and a prompt to it.
            recorder = _DemoClient()
            conn = await _connect(frontdoor.url, recorder)
            conns.append(conn)
            new = await asyncio.wait_for(conn.new_session(cwd="/work", mcp_servers=[]), T)
            sid = str(new.session_id)
            held = holders(sid)
            check(len(held) == 1, f"new session {sid} live on {held}, expected one pod")
            holder = held[0] if held else "?"
            _say()
            _say(f"1. session/new -> {sid} placed on pod {holder}")
            reply = await asyncio.wait_for(conn.prompt(
                session_id=sid, prompt=[helpers.text_block("write notes, ask permission")]), T)
            chunks = [text for s, text in recorder.updates if s == sid]
            _say(f"   session/prompt -> {reply.stop_reason}; {len(chunks)} session/update "
                 f"chunks streamed back, e.g. {chunks[0] if chunks else None!r}")
            check(reply.stop_reason == "end_turn", f"prompt stopped with {reply.stop_reason}")
            check(recorder.permissions == 1, "the permission request did not round-trip")
            check(any(text.startswith(f"[{holder}]") for text in chunks),
                  f"no update came from the holding pod {holder}")
            await conn.close()
            conns.remove(conn)

            # 2. Reconnect: a new connection asks status first, then prompts without loading.
            recorder = _DemoClient()
            conn = await _connect(frontdoor.url, recorder)
            conns.append(conn)
            status = await _status(conn, sid)
            _say()
            _say(f"2. reconnect: session/status -> {status} (the router's locator answered)")
            check(status == "live", f"status after reconnect was {status}")
            reply = await asyncio.wait_for(conn.prompt(
                session_id=sid, prompt=[helpers.text_block("still there?")]), T)
            _say(f"   live, so prompt directly -> {reply.stop_reason} from pod {holder}")
            check(by_name(holder).calls["session/prompt"] == 2,
                  "the reconnected prompt did not reach the holding pod")

            # 3. The holding pod restarts and forgets the session.
            await by_name(holder).restart()
            healthy = await frontdoor.roster.get(holder).wait_healthy(T)  # type: ignore[union-attr]
            check(healthy, f"pod {holder} did not come back")
            status = await _status(conn, sid)
            _say()
            _say(f"3. pod {holder} restarts (memory lost) -> session/status -> {status}")
            check(status == "not_found", f"status after the restart was {status}")

            # 4. Load: the router places it on a chosen pod, which replays the history.
            recorder.updates.clear()
            await asyncio.wait_for(
                conn.load_session(cwd="/work", session_id=sid, mcp_servers=[]), T
            )
            loads = {pod.name: pod.calls["session/load"] for pod in pods}
            held = holders(sid)
            replayed = [text for s, text in recorder.updates if s == sid]
            _say(f"4. session/load -> placed on pod {', '.join(held) or '?'} "
                 f"({len(replayed)} history updates replayed); loads per pod: {loads}")
            check(len(held) == 1 and sum(loads.values()) == 1,
                  f"load ran on {loads}, session live on {held}")
            reply = await asyncio.wait_for(conn.prompt(
                session_id=sid, prompt=[helpers.text_block("and after the restart?")]), T)
            status = await _status(conn, sid)
            _say(f"   session/prompt -> {reply.stop_reason}; session/status -> {status}")
            check(reply.stop_reason == "end_turn" and status == "live",
                  "the loaded session did not answer")

            metrics = frontdoor.metrics.registry.get_sample_value
            fanouts = metrics("macp_router_probe_fanouts_total", {"protocol": "acp"}) or 0
            _say()
            _say(f"router: {fanouts:.0f} session/status probe fan-outs; cached sessions: "
                 f"{len(frontdoor.locator.near)}")
        finally:
            for conn in conns:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), T)
            if frontdoor is not None:
                await frontdoor.aclose()
            for pod in pods:
                await pod.stop()
    if failures:
        _say("FAILED:")
        for failure in failures:
            _say(f"  - {failure}")
        return 1
    _say("ok: prompts reached the live pod, and after the restart the session was loaded on "
         "exactly one pod")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(run_acp_demo()))
