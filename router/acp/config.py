"""ACP front door configuration: one frozen, validated dataclass.

Nothing here reads flags or the environment: `acp_config_from_options` builds it from `serve`'s
parsed `--acp-listen/--acp-pods/--acp-upstream/--acp-idle-timeout-s` and the settings it shares
with the MACP side (placement, probe timeout, negative cache and its bound, retention, health
interval, near-cache bound), whose checks are the settings table's
(`router.settings.check_setting`), so they exist once.

Invariants:
- This module imports only the standard library and `router` leaf modules (`router.settings`,
  `router.validate`), never `router.config`, so `RouterConfig` can hold an `AcpConfig` without
  an import cycle and without the `acp` extra installed.
- The fields without a flag (connect and fan-out timeouts, list pages, shutdown grace) are
  fixed tuning values of the front door; tests and the demo set them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from router.settings import check_setting, setting
from router.validate import parse_host_port, parse_named_targets

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


SHARED_SETTINGS = ("placement", "probe_timeout_ms", "negative_cache_ms", "retention_s",
                   "health_interval_ms", "cache_max_sessions", "negative_cache_max_sessions")
"""`serve` settings that configure both front doors: one flag, one check, two configs."""


@dataclass(frozen=True)
class AcpConfig:
    listen: str = "0.0.0.0:8765"
    pods: tuple[AcpPodSpec, ...] = ()
    upstream_transport: str = WS
    """How the router talks to pods: `ws` (acp's WebSocket on the pod's endpoint) or `http`."""
    # The shared settings: defaults and checks are the settings table's.
    placement: str = setting("placement").default
    probe_timeout_ms: int = setting("probe_timeout_ms").default
    negative_cache_ms: int = setting("negative_cache_ms").default
    retention_s: float = setting("retention_s").default
    health_interval_ms: int = setting("health_interval_ms").default
    cache_max_sessions: int = setting("cache_max_sessions").default
    negative_cache_max_sessions: int = setting("negative_cache_max_sessions").default
    connect_timeout_ms: int = 2000
    fanout_timeout_ms: int = 5000
    """Per-pod bound on each `session/list` page of a fan-out."""
    list_max_pages: int = 20
    connection_idle_s: float = setting("acp_idle_timeout_s").default
    """`--acp-idle-timeout-s`: a client connection with no open stream, no call in flight and
    no traffic for this long is closed (a client that vanished without DELETE), and so is a
    client's upstream that carried nothing this long to a pod holding none of its sessions."""
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
        for shared in SHARED_SETTINGS:
            check_setting(shared, getattr(self, shared))
        if self.connect_timeout_ms < 1 or self.fanout_timeout_ms < 1:
            raise ValueError("ACP timeouts must be >= 1 ms")
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


def acp_config_from_options(options: Mapping[str, Any],
                            shared: Mapping[str, Any]) -> AcpConfig | None:
    """`serve`'s ACP flags plus the already-converted shared settings -> AcpConfig, or None.

    None when neither `--acp-listen` nor `--acp-pods` is given; ValueError when only one is, or
    when the `acp` extra is missing (saying what to install).
    """
    listen, pods = options.get("acp_listen"), options.get("acp_pods")
    if not listen and not pods:
        return None
    if not (listen and pods):
        raise ValueError("--acp-listen and --acp-pods go together")
    require_acp_extra()
    return AcpConfig(
        listen=listen,
        pods=tuple(parse_acp_pod_list(pods)),
        upstream_transport=options.get("acp_upstream") or WS,
        connection_idle_s=(options.get("acp_idle_timeout_s")
                           or setting("acp_idle_timeout_s").default),
        **{name: shared[name] for name in SHARED_SETTINGS if name in shared},
    )
