"""Router configuration: one frozen, validated dataclass built once from flags and environment.

Only `router.cli` reads flags and `MACP_ROUTER_*` variables; everything else receives a
`RouterConfig`. Validation happens in `__post_init__` so a bad value fails at start-up with one
clear line, never deep inside a running router.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from router.pods import PodSpec

if TYPE_CHECKING:
    from router.acp.config import AcpConfig


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) -> (host, port); ValueError naming `what`."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{what}: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def resolve_workers(value: str | int) -> int:
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else (os.cpu_count() or 1))
    try:
        workers = int(value)
    except ValueError:
        raise ValueError(f"--workers: {value!r} is not a number or 'auto'") from None
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    return workers


@dataclass(frozen=True)
class RouterConfig:
    listen: str = "0.0.0.0:50051"
    pods: tuple[PodSpec, ...] = ()
    pods_dns: str | None = None
    dns_interval_s: float = 5.0
    drain_sync_s: float = 2.0
    redis_url: str | None = None
    redis_prefix: str = "mrouter:"
    redis_password: str | None = field(default=None, repr=False)
    redis_required: bool = False
    metrics_listen: str | None = None
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    """A file holding the router's token, re-read when it changes (router.credentials)."""
    admin_token: str | None = field(default=None, repr=False)
    probe_timeout_ms: int = 250
    negative_cache_ms: int = 1000
    retention_s: float = 600.0
    health_interval_ms: int = 1000
    channels_per_pod: int = 2
    """Connections per pod at start; the pool grows with load up to max_channels_per_pod."""
    max_channels_per_pod: int = 16
    max_list_bytes: int = 256 * 1024 * 1024
    """Receive limit for one pod's whole ListSessions reply (reconcile and client lists)."""
    placement: str = "least-sessions-p2c"
    shutdown_grace_s: float = 10.0
    log_level: str = "info"
    workers: int = 1
    reuse_port: bool = False
    """Share the listen port with sibling worker processes (set for `--workers` children)."""
    max_message_bytes: int = 16 * 1024 * 1024
    max_concurrent_streams: int = 256
    """Per client connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)."""
    admin_listen: str | None = None
    admin_open_reads: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    pod_ca: str | None = None
    pod_cert: str | None = None
    pod_key: str | None = None
    scope_discovery: bool = False
    observer_tokens: frozenset[str] = field(default=frozenset(), repr=False)
    token_identities: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """token -> sender for --scope-discovery (from --auth-tokens-json); else token = sender."""
    acp: AcpConfig | None = None
    """The ACP front door (--acp-listen/--acp-pods); None = MACP only."""

    def __post_init__(self) -> None:
        parse_host_port(self.listen, "--listen")
        if self.acp is not None and self.workers > 1:
            raise ValueError("--acp-listen needs --workers 1 (ACP client connections live in "
                             "one process)")
        if self.metrics_listen:
            parse_host_port(self.metrics_listen, "--metrics-listen")
        if self.pods_dns:
            parse_host_port(self.pods_dns, "--pods-dns")
        if not self.pods and not self.pods_dns:
            raise ValueError("no pods: give --pods NAME=HOST:PORT[,...] or --pods-dns HOST:PORT")
        names = [pod.name for pod in self.pods]
        if len(set(names)) != len(names):
            raise ValueError("--pods: duplicate pod names")
        if not 1 <= self.probe_timeout_ms <= 60_000:
            raise ValueError("--probe-timeout-ms must be between 1 and 60000")
        if self.negative_cache_ms < 0:
            raise ValueError("--negative-cache-ms must be >= 0")
        if self.retention_s <= 0:
            raise ValueError("--retention-s must be > 0")
        if not 1 <= self.channels_per_pod <= 64:
            raise ValueError("--channels-per-pod must be between 1 and 64")
        if not self.channels_per_pod <= self.max_channels_per_pod <= 256:
            raise ValueError("--max-channels-per-pod must be between --channels-per-pod and 256")
        if not 1024 * 1024 <= self.max_list_bytes <= 2**31 - 1:
            raise ValueError("--max-list-bytes must be between 1 MiB and 2 GiB - 1")
        if self.health_interval_ms < 50:
            raise ValueError("--health-interval-ms must be >= 50")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.redis_prefix.startswith("macp:"):
            raise ValueError("--redis-prefix must not be 'macp:' (that namespace is the runtime's)")
        if self.redis_url:
            from router.redis_store import validate_url

            validate_url(self.redis_url)  # ValueError: one line naming the problem
        if self.admin_listen:
            parse_host_port(self.admin_listen, "--admin-listen")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if bool(self.pod_cert) != bool(self.pod_key):
            raise ValueError("--pod-cert and --pod-key go together")
        if (self.pod_cert or self.pod_key) and not self.pod_ca:
            raise ValueError("--pod-cert/--pod-key (mTLS to pods) need --pod-ca")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert/--tls-key")
        for label, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                            ("--tls-client-ca", self.tls_client_ca), ("--pod-ca", self.pod_ca),
                            ("--pod-cert", self.pod_cert), ("--pod-key", self.pod_key)):
            if path and not os.path.isfile(path):
                raise ValueError(f"{label}: no such file {path!r}")
        if not 1024 <= self.max_message_bytes <= 1024 * 1024 * 1024:
            raise ValueError("--max-message-bytes must be between 1 KiB and 1 GiB")
        if not 1 <= self.max_concurrent_streams <= 100_000:
            raise ValueError("--max-concurrent-streams must be between 1 and 100000")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("--log-level must be debug, info, warning or error")

    @property
    def probe_timeout_s(self) -> float:
        return self.probe_timeout_ms / 1000

    @property
    def admin_on_main_port(self) -> bool:
        """Admin calls are served on the client port only with a token, or on loopback."""
        host, _ = parse_host_port(self.listen, "--listen")
        return bool(self.admin_token) or host in ("127.0.0.1", "localhost", "::1")

    def identity_of(self, token: str) -> str:
        for known, sender in self.token_identities:
            if known == token:
                return sender
        return token

    def read_file(self, path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as handle:
            return handle.read()

    @property
    def router_metadata(self) -> tuple[tuple[str, str], ...]:
        """The router's own credentials, for feeds, probes and replays only."""
        if not self.token:
            return ()
        return (("authorization", f"Bearer {self.token}"),)
