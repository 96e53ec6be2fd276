"""ACP test support: simulated pods + the front door on loopback, and the real acp client.

Everything is started by `acp_cluster()` (an async context manager: pods and front door are
stopped on exit, whatever happens) and driven with `acp.connect_to_agent` over acp's own
Streamable HTTP (or WebSocket) client transport. Every wait is bounded by `T`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import acp
from acp import helpers
from acp.http import create_http_stream
from acp.schema import AllowedOutcome, DeniedOutcome, RequestPermissionResponse

from router.acp.config import AcpConfig, AcpPodSpec
from router.acp.frontdoor import AcpFrontDoor
from router.metrics import Metrics
from router.sim.acp_pod import AcpSimPod

T = 5.0  # seconds: the bound on every single wait in the ACP tests


class RecordingClient:
    """The client side of ACP: records session updates and answers permission requests."""

    def __init__(self, answer: str = "allow") -> None:
        self.answer = answer
        self.updates: list[tuple[str, str]] = []
        self.permissions: list[tuple[str, str]] = []

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        content = getattr(update, "content", None)
        self.updates.append((session_id, getattr(content, "text", "") or ""))

    async def request_permission(
        self, session_id: str, tool_call: Any, options: Any, **kwargs: Any
    ) -> RequestPermissionResponse:
        self.permissions.append((session_id, tool_call.tool_call_id))
        if self.answer == "cancel":
            return RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled"))
        return RequestPermissionResponse(
            outcome=AllowedOutcome(outcome="selected", option_id=self.answer)
        )

    def texts(self, sid: str) -> list[str]:
        return [text for session, text in self.updates if session == sid]


@dataclass
class AcpClient:
    conn: Any
    recorder: RecordingClient

    async def new(self, cwd: str = "/work") -> str:
        response = await asyncio.wait_for(self.conn.new_session(cwd=cwd, mcp_servers=[]), T)
        return str(response.session_id)

    async def prompt(self, sid: str, text: str) -> str:
        response = await asyncio.wait_for(
            self.conn.prompt(session_id=sid, prompt=[helpers.text_block(text)]), T
        )
        return str(response.stop_reason)

    async def load(self, sid: str, cwd: str = "/work") -> Any:
        return await asyncio.wait_for(
            self.conn.load_session(cwd=cwd, session_id=sid, mcp_servers=[]), T
        )

    async def status(self, sid: str) -> str:
        """`session/status` (not in acp 0.12.1's client API: sent as a raw request)."""
        reply = await asyncio.wait_for(
            self.conn._conn.send_request("session/status", {"sessionId": sid}), T
        )
        return str(reply["status"])

    async def call(self, method: str, params: Any) -> Any:
        return await asyncio.wait_for(self.conn._conn.send_request(method, params), T)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.conn.close(), T)


async def connect(url: str, *, answer: str = "allow", websocket: bool = False) -> AcpClient:
    """A real acp client connected (and initialized) to `url`."""
    recorder = RecordingClient(answer)
    if websocket:
        from acp.ws import create_websocket_stream

        transport = await asyncio.wait_for(
            create_websocket_stream(url.replace("http://", "ws://")), T
        )
    else:
        transport = create_http_stream(url)
    conn = acp.connect_to_agent(recorder, transport)
    await asyncio.wait_for(conn.initialize(protocol_version=1), T)
    return AcpClient(conn, recorder)


@dataclass
class AcpCluster:
    pods: list[AcpSimPod]
    frontdoor: AcpFrontDoor
    sessions_dir: Path
    clients: list[AcpClient] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.frontdoor.url

    def pod(self, name: str) -> AcpSimPod:
        return next(pod for pod in self.pods if pod.name == name)

    def holders(self, sid: str) -> list[str]:
        """Pods where `sid` is live (in memory) right now."""
        return [pod.name for pod in self.pods if sid in pod.sessions]

    def calls(self, method: str) -> dict[str, int]:
        return {pod.name: pod.calls[method] for pod in self.pods}

    async def client(self, **kwargs: Any) -> AcpClient:
        client = await connect(self.url, **kwargs)
        self.clients.append(client)
        return client

    async def direct(self, pod: str) -> AcpClient:
        """A client connected straight to one pod, bypassing the router."""
        client = await connect(self.pod(pod).url, websocket=True)
        self.clients.append(client)
        return client

    def metric(self, name: str, **labels: str) -> float:
        value = self.frontdoor.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


@contextlib.asynccontextmanager
async def acp_cluster(
    sessions_dir: Path,
    count: int = 3,
    *,
    metrics: Metrics | None = None,
    pod_options: dict[str, Any] | None = None,
    **config: Any,
) -> AsyncIterator[AcpCluster]:
    """`count` simulated ACP pods (a, b, c, ...) sharing `sessions_dir`, and a front door."""
    pods = [AcpSimPod(chr(ord("a") + i), "127.0.0.1:0", sessions_dir, **(pod_options or {}))
            for i in range(count)]
    frontdoor: AcpFrontDoor | None = None
    cluster: AcpCluster | None = None
    try:
        for pod in pods:
            await pod.start()
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "pods": tuple(AcpPodSpec(pod.name, pod.url) for pod in pods),
            "health_interval_ms": 200,
            "connect_timeout_ms": 1000,
        }
        settings.update(config)
        frontdoor = AcpFrontDoor(AcpConfig(**settings), metrics=metrics)
        await frontdoor.start()
        assert await frontdoor.wait_ready(T), "ACP pods did not become healthy"
        cluster = AcpCluster(pods, frontdoor, sessions_dir)
        yield cluster
    finally:
        if cluster is not None:
            for client in cluster.clients:
                await client.close()
        if frontdoor is not None:
            await frontdoor.aclose()
        for pod in pods:
            await pod.stop()
