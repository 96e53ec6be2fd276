"""A simulated ACP agent pod: a real `acp` agent served by `acp.http.AcpServer` over hypercorn.

`macp-router acp-pod --listen HOST:PORT --name NAME --sessions-dir DIR` runs one
(`serve_acp_pod`); tests and the demo start `AcpSimPod`s in process. The pod speaks the stock
acp 0.12.1 transport (Streamable HTTP and WebSocket on one endpoint, path ignored, `/acp` by
convention) and implements: initialize, session/new, session/load (replays the history kept in
DIR), session/resume, session/prompt (streams `session/update` chunks; asks one permission when
the prompt mentions "permission"; waits for a cancel when it mentions "slow"), session/cancel,
session/close, session/set_mode, session/list and the proposed `session/status`.

Invariants:
- A session is *live* on a pod only while it is in that pod's memory (created, loaded or
  resumed here, not closed since, pod not restarted): `session/status` answers `live` exactly
  then and `not_found` otherwise, with no side effect.
- Memory is per pod, shared by all of the pod's connections; history is on disk in DIR, which
  pods may share, so a session can be loaded on any pod. Files are written whole (temp file +
  rename) off the event loop.
- `calls` counts every request and notification per method, probes included, before the
  handler runs (a hung pod still counts what it received).
- `hang()` makes every handler wait (a pod that accepts but never answers) until `unhang()`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acp import helpers
from acp.agent.connection import AgentSideConnection, build_agent_router
from acp.exceptions import RequestError
from acp.http.asgi import AcpAsgiApp
from acp.http.server import AcpServer
from acp.router import Route
from acp.schema import (
    NewSessionResponse,
    PermissionOption,
    PromptResponse,
    ToolCallUpdate,
)

from router import __version__
from router.acp.asgi import AsgiServer

log = logging.getLogger("macp_router.sim.acp")

STATUS_METHOD = "session/status"
LIVE = "live"
NOT_FOUND = "not_found"
SESSION_NOT_FOUND = -32002
CLOSE_TIMEOUT_S = 5.0  # stop(): how long the agent connections get to close
_SAFE_SID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass
class SimSession:
    session_id: str
    cwd: str
    history: list[dict[str, str]] = field(default_factory=list)
    title: str | None = None
    updated_at: str = ""
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def to_json(self, pod: str) -> dict[str, Any]:
        return {
            "sessionId": self.session_id, "cwd": self.cwd, "title": self.title,
            "updatedAt": self.updated_at, "history": self.history, "lastPod": pod,
        }


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _prompt_text(prompt: list[Any]) -> str:
    parts = [getattr(block, "text", "") for block in prompt]
    return " ".join(part for part in parts if part)


class SessionFiles:
    """History on disk: one JSON file per session in a directory pods may share."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def _path(self, sid: str) -> Path | None:
        return self.directory / f"{sid}.json" if _SAFE_SID.match(sid) else None

    async def read(self, sid: str) -> dict[str, Any] | None:
        path = self._path(sid)
        if path is None:
            return None

        def read() -> dict[str, Any] | None:
            try:
                return json.loads(path.read_text())  # type: ignore[no-any-return]
            except (FileNotFoundError, json.JSONDecodeError):
                return None

        return await asyncio.to_thread(read)

    async def write(self, sid: str, data: dict[str, Any]) -> None:
        path = self._path(sid)
        if path is None:
            return

        def write() -> None:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)

        await asyncio.to_thread(write)

    async def all(self) -> list[dict[str, Any]]:
        def read_all() -> list[dict[str, Any]]:
            if not self.directory.is_dir():
                return []
            entries = []
            for path in sorted(self.directory.glob("*.json")):
                with contextlib.suppress(OSError, json.JSONDecodeError):
                    entries.append(json.loads(path.read_text()))
            return entries

        return await asyncio.to_thread(read_all)


class SimAgent:
    """One ACP connection's agent; session memory lives in the pod, shared by connections."""

    def __init__(self, pod: AcpSimPod, conn: AgentSideConnection) -> None:
        self.pod = pod
        self.conn = conn

    def on_connect(self, conn: AgentSideConnection) -> None:
        # acp 0.12.1 has no hook for methods outside acp.meta (session/status is a proposal),
        # and AcpServer builds the connection without the unstable protocol (session/close,
        # session/resume): install our own router on the freshly built connection.
        router = build_agent_router(self, use_unstable_protocol=True)  # type: ignore[arg-type]
        router.add_route(Route(method=STATUS_METHOD, func=self._status, kind="request"))
        conn._conn._handler = router

    async def _enter(self, method: str) -> None:
        self.pod.calls[method] += 1
        await self.pod._gate()

    def _live(self, sid: str) -> SimSession:
        session = self.pod.sessions.get(sid)
        if session is None:
            raise RequestError(
                SESSION_NOT_FOUND,
                f"session {sid} is not live on pod {self.pod.name} (session/load it)",
                {"sessionId": sid},
            )
        return session

    async def _status(self, params: Any) -> dict[str, str]:
        await self._enter(STATUS_METHOD)
        sid = params.get("sessionId") if isinstance(params, dict) else None
        if not isinstance(sid, str):
            raise RequestError.invalid_params({"sessionId": "required"})
        return {"status": LIVE if sid in self.pod.sessions else NOT_FOUND}

    async def initialize(self, protocol_version: int, **kwargs: Any) -> dict[str, Any]:
        await self._enter("initialize")
        # A plain dict: the pydantic model would drop sessionCapabilities.status.
        return {
            "protocolVersion": 1,
            "agentCapabilities": {
                "loadSession": True,
                "promptCapabilities": {"image": False, "audio": False, "embeddedContext": True},
                "mcpCapabilities": {"http": False, "sse": False},
                "sessionCapabilities": {"list": {}, "resume": {}, "close": {}, "status": {}},
            },
            "authMethods": [],
            "agentInfo": {
                "name": "macp-acp-sim", "title": f"simulated ACP agent pod {self.pod.name}",
                "version": __version__,
            },
        }

    async def new_session(self, cwd: str, **kwargs: Any) -> NewSessionResponse:
        await self._enter("session/new")
        sid = f"sess_{uuid.uuid4().hex}"
        session = SimSession(sid, cwd, updated_at=_now_iso())
        self.pod.sessions[sid] = session
        await self.pod.files.write(sid, session.to_json(self.pod.name))
        return NewSessionResponse(session_id=sid)

    async def _restore(self, sid: str, cwd: str) -> tuple[SimSession, bool]:
        session = self.pod.sessions.get(sid)
        if session is not None:
            return session, False
        stored = await self.pod.files.read(sid)
        if stored is None:
            raise RequestError(
                SESSION_NOT_FOUND, f"session {sid} not found in {self.pod.files.directory}",
                {"sessionId": sid},
            )
        session = SimSession(
            sid, stored.get("cwd") or cwd, list(stored.get("history") or []),
            stored.get("title"), stored.get("updatedAt") or "",
        )
        self.pod.sessions[sid] = session
        return session, True

    async def load_session(self, cwd: str, session_id: str, **kwargs: Any) -> None:
        await self._enter("session/load")
        session, _ = await self._restore(session_id, cwd)
        for entry in list(session.history):
            update = (helpers.update_user_message_text(entry["text"]) if entry["role"] == "user"
                      else helpers.update_agent_message_text(entry["text"]))
            await self.conn.session_update(session_id, update)
        return None

    async def resume_session(self, session_id: str, cwd: str, **kwargs: Any) -> dict[str, Any]:
        await self._enter("session/resume")
        await self._restore(session_id, cwd)
        return {}

    async def prompt(self, session_id: str, prompt: list[Any], **kwargs: Any) -> PromptResponse:
        await self._enter("session/prompt")
        session = self._live(session_id)
        session.cancelled.clear()
        text = _prompt_text(prompt)
        session.history.append({"role": "user", "text": text})
        session.title = session.title or text[:40]
        reply = []
        for index in range(1, self.pod.chunks + 1):
            chunk = f"[{self.pod.name}] chunk {index}/{self.pod.chunks} for {text!r}"
            reply.append(chunk)
            await self.conn.session_update(session_id, helpers.update_agent_message_text(chunk))
        stop_reason = "end_turn"
        if "permission" in text.lower():
            outcome = await self._ask_permission(session_id)
            reply.append(f"permission: {outcome}")
            await self.conn.session_update(
                session_id, helpers.update_agent_message_text(f"permission: {outcome}")
            )
            if outcome == "cancelled":
                stop_reason = "cancelled"
        if "slow" in text.lower():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.cancelled.wait(), self.pod.slow_prompt_s)
            if session.cancelled.is_set():
                stop_reason = "cancelled"
        session.history.append({"role": "agent", "text": "\n".join(reply)})
        session.updated_at = _now_iso()
        await self.pod.files.write(session_id, session.to_json(self.pod.name))
        return PromptResponse(stop_reason=stop_reason)

    async def _ask_permission(self, session_id: str) -> str:
        call_id = f"call_{next(self.pod._tool_calls)}"
        response = await self.conn.request_permission(
            session_id=session_id,
            tool_call=ToolCallUpdate(
                tool_call_id=call_id, title="write notes.txt", kind="edit", status="pending"
            ),
            options=[
                PermissionOption(option_id="allow", name="Allow", kind="allow_once"),
                PermissionOption(option_id="reject", name="Reject", kind="reject_once"),
            ],
        )
        outcome = response.outcome
        return getattr(outcome, "option_id", None) or "cancelled"

    async def cancel(self, session_id: str, **kwargs: Any) -> None:
        await self._enter("session/cancel")
        session = self.pod.sessions.get(session_id)
        if session is not None:
            session.cancelled.set()

    async def close_session(self, session_id: str, **kwargs: Any) -> None:
        await self._enter("session/close")
        self._live(session_id)
        del self.pod.sessions[session_id]
        return None

    async def set_session_mode(self, session_id: str, mode_id: str, **kwargs: Any) -> None:
        await self._enter("session/set_mode")
        self._live(session_id)
        return None

    async def list_sessions(
        self, cwd: str | None = None, cursor: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        await self._enter("session/list")
        entries = [e for e in await self.pod.files.all() if cwd is None or e.get("cwd") == cwd]
        start = int(cursor) if cursor and cursor.isdigit() else 0
        page = entries[start:start + self.pod.list_page_size]
        result: dict[str, Any] = {
            "sessions": [
                {key: value for key, value in (
                    ("sessionId", e.get("sessionId")), ("cwd", e.get("cwd")),
                    ("title", e.get("title")), ("updatedAt", e.get("updatedAt")),
                ) if value is not None}
                for e in page
            ]
        }
        if start + self.pod.list_page_size < len(entries):
            result["nextCursor"] = str(start + self.pod.list_page_size)
        return result

    async def ext_method(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        await self._enter(f"_{method}")
        return {"pod": self.pod.name, "echo": params}


class AcpSimPod:
    """A simulated ACP agent pod on `listen`; `restart()` keeps the address, loses memory."""

    def __init__(
        self,
        name: str,
        listen: str = "127.0.0.1:0",
        sessions_dir: str | os.PathLike[str] = "acp-sessions",
        *,
        chunks: int = 3,
        slow_prompt_s: float = 10.0,
        list_page_size: int = 50,
    ) -> None:
        self.name = name
        self.files = SessionFiles(sessions_dir)
        self.chunks = chunks
        self.slow_prompt_s = slow_prompt_s
        self.list_page_size = list_page_size
        self.calls: collections.Counter[str] = collections.Counter()
        self.sessions: dict[str, SimSession] = {}
        self.restarts = 0
        self._tool_calls = itertools.count(1)
        self._hung = False
        self._unhung = asyncio.Event()
        self._acp: AcpServer | None = None
        self._http = AsgiServer(None, listen, name=f"acp-pod-{name}")

    @property
    def address(self) -> str:
        return self._http.address

    @property
    def url(self) -> str:
        return f"http://{self.address}/acp"

    @property
    def spec(self) -> str:
        """`NAME=URL` as `--acp-pods` takes it."""
        return f"{self.name}={self.url}"

    async def start(self) -> None:
        self._acp = AcpServer(lambda conn: SimAgent(self, conn))  # type: ignore[arg-type, return-value]
        self._http.app = AcpAsgiApp(self._acp)
        await self._http.start()
        log.info("ACP sim pod %s serving on %s", self.name, self.url)

    async def stop(self) -> None:
        """Stop serving and drop every connection (clients see their streams end).

        The HTTP server goes first: open WebSockets get a close frame (1001) and no request is
        taken while the agent connections close. Those get `CLOSE_TIMEOUT_S`; one still
        closing then is left behind with a warning, so a stop never hangs.
        """
        self.unhang()
        await self._http.aclose()
        acp, self._acp = self._acp, None
        if acp is None:
            return
        closing = asyncio.ensure_future(acp.close())
        done, _ = await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT_S)
        if closing in done:
            closing.result()
        else:
            closing.cancel()  # not awaited: a task that ignores its cancel must not hold stop()
            log.warning("ACP sim pod %s: its agent connections did not close within %g s; "
                        "left closing", self.name, CLOSE_TIMEOUT_S)

    async def restart(self) -> None:
        """Stop, forget every live session (files stay), serve again on the same port."""
        await self.stop()
        self.sessions.clear()
        self.restarts += 1
        self._http = AsgiServer(None, f"{self._http.host}:{self._http.port}",
                                name=f"acp-pod-{self.name}")
        await self.start()

    def hang(self) -> None:
        self._hung = True
        self._unhung = asyncio.Event()

    def unhang(self) -> None:
        self._hung = False
        self._unhung.set()

    async def _gate(self) -> None:
        if self._hung:
            await self._unhung.wait()

    async def __aenter__(self) -> AcpSimPod:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def serve_acp_pod(listen: str, name: str, sessions_dir: str) -> None:
    """Run one simulated ACP pod until cancelled (`macp-router acp-pod`)."""
    pod = AcpSimPod(name, listen, sessions_dir)
    await pod.start()
    log.info("ready: ACP sim pod %s on %s (sessions in %s)", name, pod.url, sessions_dir)
    try:
        await asyncio.Event().wait()
    finally:
        await pod.stop()
