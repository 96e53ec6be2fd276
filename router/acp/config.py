"""ACP front door configuration: one frozen, validated dataclass (built by `router.cli`).

Nothing here reads flags or the environment; `serve --acp-listen/--acp-pods` fills it. This
module imports nothing outside the standard library and `router`, so `RouterConfig` can hold an
`AcpConfig` without the `acp` extra installed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from urllib.parse import urlsplit

from router.config import parse_host_port
from router.placement import POLICIES
from router.pods import parse_named_targets

WS = "ws"
HTTP = "http"
TRANSPORTS = (WS, HTTP)


def require_acp_extra() -> None:
    """ValueError (one line, what to do) when the `acp` extra is not installed."""
    missing = [name for name in ("acp", "hypercorn", "httpx", "websockets")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(
            f"the ACP front door needs {', '.join(missing)}: pip install 'macp-router[acp]'"
        )


@dataclass(frozen=True, slots=True)
class AcpPodSpec:
    name: str
    url: str


def _check_url(name: str, url: str) -> str | None:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        return f"ACP pod {name!r}: {url!r} is not http://HOST:PORT/PATH"
    return None


def parse_acp_pod_list(text: str) -> list[AcpPodSpec]:
    """Parse `NAME=http://HOST:PORT/acp[,...]`; raise ValueError naming the bad part."""
    return [AcpPodSpec(name, url) for name, url in
            parse_named_targets(text, what="ACP pod", form="NAME=http://HOST:PORT/acp",
                                check=_check_url)]


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
    connection_idle_s: float = 300.0
    """A client connection with no open stream, no call in flight and no traffic for this long
    is closed (a client that vanished without DELETE)."""
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
        if self.connection_idle_s <= 0:
            raise ValueError("connection_idle_s must be > 0")
        if self.list_max_pages < 1:
            raise ValueError("list_max_pages must be >= 1")

    @property
    def probe_timeout_s(self) -> float:
        return self.probe_timeout_ms / 1000

    @property
    def connect_timeout_s(self) -> float:
        return self.connect_timeout_ms / 1000
