"""ACP front door configuration: one frozen, validated dataclass (built by `router.cli`).

Nothing here reads flags or the environment; `serve --acp-listen/--acp-pods` fills it.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.acp.pods import AcpPodSpec
from router.acp.upstream import TRANSPORTS, WS
from router.config import parse_host_port
from router.placement import POLICIES


@dataclass(frozen=True)
class AcpConfig:
    listen: str = "0.0.0.0:8765"
    pods: tuple[AcpPodSpec, ...] = ()
    upstream_transport: str = WS
    """How the router talks to pods: `ws` (acp's WebSocket on the pod's endpoint) or `http`."""
    placement: str = "least-sessions-p2c"
    probe_timeout_ms: int = 250
    negative_cache_ms: int = 1000
    retention_s: float = 600.0
    connect_timeout_ms: int = 2000
    health_interval_ms: int = 1000
    fanout_timeout_ms: int = 5000
    """Per-pod bound on each `session/list` page of a fan-out."""
    list_max_pages: int = 20
    shutdown_grace_s: float = 1.0

    def __post_init__(self) -> None:
        parse_host_port(self.listen, "--acp-listen")
        if not self.pods:
            raise ValueError("no ACP pods: give --acp-pods NAME=http://HOST:PORT/acp[,...]")
        names = [pod.name for pod in self.pods]
        if len(set(names)) != len(names):
            raise ValueError("--acp-pods: duplicate pod names")
        if self.upstream_transport not in TRANSPORTS:
            raise ValueError(f"--acp-upstream must be one of {', '.join(TRANSPORTS)}")
        if self.placement not in POLICIES:
            raise ValueError(f"unknown placement policy {self.placement!r}")
        if not 1 <= self.probe_timeout_ms <= 60_000:
            raise ValueError("--probe-timeout-ms must be between 1 and 60000")
        if self.negative_cache_ms < 0:
            raise ValueError("--negative-cache-ms must be >= 0")
        if self.retention_s <= 0:
            raise ValueError("--retention-s must be > 0")
        if self.connect_timeout_ms < 1 or self.fanout_timeout_ms < 1:
            raise ValueError("ACP timeouts must be >= 1 ms")
        if self.health_interval_ms < 50:
            raise ValueError("--health-interval-ms must be >= 50")
        if self.list_max_pages < 1:
            raise ValueError("list_max_pages must be >= 1")

    @property
    def probe_timeout_s(self) -> float:
        return self.probe_timeout_ms / 1000

    @property
    def connect_timeout_s(self) -> float:
        return self.connect_timeout_ms / 1000
