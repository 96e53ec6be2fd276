"""ACP agent pods by stable name: the router's own control connection to each, health, probes.

`AcpPodRoster` is the locator's `PodRoster` for ACP (`names()`, `is_healthy()`,
`placeable_names()`); `PodSet` in `router.pods` is gRPC-specific. Each `AcpPod` keeps one
control `Upstream` opened with the router's own `initialize`; it carries the `session/status`
probes and a health ping (any JSON-RPC answer, -32601 included, means the pod answers).

Invariants:
- A pod is identified by its name, never by its URL.
- `healthy` is False from the first failed connect, ping or lost control connection until the
  control connection is open and answering again; unhealthy and draining pods are never
  placeable, and the locator counts unhealthy pods as *unknown*, never *not_found*.
- Losing an established control connection (pod restart, network) calls `on_disconnect`, so
  the front door can forget that pod's routes: a restarted pod has lost its sessions and only a
  probe can tell. Reconnect backoff is capped at about 1 s.
- A probe answers `live` / `not_found` only from a pod's own `session/status` result; an
  error (-32601 from a pod without the method), a timeout or no connection is `unknown`.
- Health is `router.core.health.PodHealth`, the state machine MACP pods use too; each pod's
  health loop runs as the supervisor's service `acp_health:<pod>` (a crash is logged, counted
  and the loop restarted) and is stopped by `aclose()`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import httpx
from acp.meta import PROTOCOL_VERSION

from router import __version__
from router.acp.config import WS, AcpPodSpec
from router.acp.routes import STATUS_METHOD
from router.acp.upstream import Upstream, UpstreamClosed
from router.aio import wait_event
from router.core.health import PodHealth
from router.core.status import UNKNOWN, LocateStatus
from router.pods import NamedPods
from router.supervisor import Supervisor

log = logging.getLogger("macp_router.acp.pods")

HEALTH_PROBE_SID = "macp-router-health-check"

ROUTER_INIT_PARAMS: dict[str, Any] = {
    "protocolVersion": PROTOCOL_VERSION,
    "clientCapabilities": {"fs": {"readTextFile": False, "writeTextFile": False},
                           "terminal": False},
    "clientInfo": {"name": "macp-router", "title": "macp-router control connection",
                   "version": __version__},
}


class AcpPod(PodHealth):
    """One ACP agent pod: its control connection, probes and health (`PodHealth`)."""

    def __init__(
        self,
        spec: AcpPodSpec,
        *,
        transport: str = WS,
        http_client: httpx.AsyncClient | None = None,
        connect_timeout_s: float = 2.0,
        health_interval_s: float = 1.0,
        health_timeout_s: float = 1.0,
    ) -> None:
        super().__init__()
        self.name = spec.name
        self.url = spec.url
        self.describe = f"ACP pod {spec.name} ({spec.url})"
        self.transport = transport
        self.http_client = http_client
        self.connect_timeout_s = connect_timeout_s
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.last_error = "not connected yet"
        self.init_result: dict[str, Any] = {}
        self.connects = 0
        self._control: Upstream | None = None
        self._closing = False
        self.on_disconnect: Callable[[AcpPod], None] | None = None

    def __repr__(self) -> str:
        return f"AcpPod({self.name}@{self.url}, healthy={self.healthy})"

    def upstream(self, **kwargs: Any) -> Upstream:
        """A new (unopened) upstream connection to this pod."""
        return Upstream(
            self.name, self.url, transport=self.transport, http_client=self.http_client,
            connect_timeout_s=self.connect_timeout_s, **kwargs,
        )

    # -- probes ------------------------------------------------------------------------------
    async def probe(self, sid: str) -> LocateStatus:
        """`session/status` on the control connection: live | not_found | unknown."""
        control = self._control
        if control is None or control.closed:
            return UNKNOWN
        try:
            reply = await control.call(STATUS_METHOD, {"sessionId": sid}, None)
        except UpstreamClosed:
            return UNKNOWN
        value = reply.get("result")
        status = value.get("status") if isinstance(value, dict) else None
        return LocateStatus.of(status)

    # -- health (the state machine is `PodHealth`) ---------------------------------------------
    def _control_closed(self, upstream: Upstream) -> None:
        if self._closing or upstream is not self._control:
            return
        self._control = None
        self.report_failure(f"control connection lost: {upstream.close_reason}")
        if self.on_disconnect is not None:
            self.on_disconnect(self)

    async def _connect(self) -> bool:
        control = self.upstream(on_close=self._control_closed)
        try:
            self.init_result = await control.open(ROUTER_INIT_PARAMS)
        except UpstreamClosed as exc:
            self.report_failure(exc.reason)
            return False
        if self._closing:
            await control.aclose()
            return False
        self._control = control
        self.connects += 1
        self.report_success()
        return True

    async def _ping(self) -> None:
        control = self._control
        if control is None:
            return
        try:
            await control.call(STATUS_METHOD, {"sessionId": HEALTH_PROBE_SID},
                               self.health_timeout_s)
        except TimeoutError:
            self.report_failure(
                f"did not answer a health ping within {self.health_timeout_s:g} s"
            )
        except UpstreamClosed:
            pass  # _control_closed already reported it
        else:
            self.report_success()

    async def _health_loop(self) -> None:
        backoff = 0.1
        while True:
            if self._control is None or self._control.closed:
                if await self._connect():
                    backoff = 0.1
                    continue
                delay = backoff * random.uniform(0.8, 1.2)
                backoff = min(backoff * 2, 1.0)
            else:
                await self._ping()
                self.checked()
                await self.pause(self.health_interval_s)
                continue
            self._wake.clear()
            await wait_event(self._wake, delay)

    # -- lifecycle ---------------------------------------------------------------------------
    service_kind = "acp_health"

    async def aclose(self) -> None:
        self._closing = True
        await self.stop_health_loop()
        control, self._control = self._control, None
        if control is not None:
            await control.aclose()


class AcpPodRoster(NamedPods[AcpPod]):
    """All ACP pods by name: the locator's roster and the placement candidates."""

    def __init__(
        self,
        specs: list[AcpPodSpec] | tuple[AcpPodSpec, ...],
        *,
        transport: str = WS,
        connect_timeout_s: float = 2.0,
        health_interval_s: float = 1.0,
        health_timeout_s: float = 1.0,
        supervisor: Supervisor | None = None,
    ) -> None:
        super().__init__()
        self.supervisor = supervisor
        """Runs every pod's health loop; each pod gets a private one if None."""
        # Each session stream of an http upstream holds one HTTP/1.1 connection: no pool cap.
        self.http_client = (
            httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=connect_timeout_s),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
            if transport != WS else None
        )
        self._pods = {
            spec.name: AcpPod(
                spec, transport=transport, http_client=self.http_client,
                connect_timeout_s=connect_timeout_s, health_interval_s=health_interval_s,
                health_timeout_s=health_timeout_s,
            )
            for spec in specs
        }
        self.on_health_change: list[Callable[[AcpPod], None]] = []
        self.on_disconnect: list[Callable[[AcpPod], None]] = []
        for pod in self._pods.values():
            pod.on_health_change = self._health_changed
            pod.on_disconnect = self._disconnected

    async def probe(self, pod: str, sid: str) -> LocateStatus:
        """The locator's probe function."""
        target = self._pods.get(pod)
        return UNKNOWN if target is None else await target.probe(sid)

    async def wait_healthy(self, timeout: float) -> bool:
        """Until every pod is healthy (or `timeout`)."""
        results = await asyncio.gather(*(pod.wait_healthy(timeout) for pod in self._pods.values()))
        return all(results)

    def _health_changed(self, pod: AcpPod) -> None:
        for callback in self.on_health_change:
            callback(pod)

    def _disconnected(self, pod: AcpPod) -> None:
        for callback in self.on_disconnect:
            callback(pod)

    def start(self) -> None:
        for pod in self._pods.values():
            pod.start(self.supervisor)

    async def aclose(self) -> None:
        for pod in self._pods.values():
            await pod.aclose()
        if self.http_client is not None:
            await self.http_client.aclose()
