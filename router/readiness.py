"""Readiness: what `/readyz`, `grpc.health.v1` and the status page say about this router.

Job: build one snapshot from the pods, their watch feeds, the store, DNS discovery and the
background services (`refresh()`), keep the gRPC health status in step with it (`status_loop`,
the supervisor's `status` service), and adopt the drain flags other replicas set through the
shared store (`drain_sync_loop`, the `drain_sync` service).

Invariants:
- Ready means: at least one healthy pod accepts the router's credentials, and the router is not
  shutting down. A crashed background service is shown (`services`, `services_down`) but does
  not change readiness: the pods decide whether this replica can route.
- The snapshot is replaced whole, never mutated: a reader on another thread (the HTTP server)
  always sees one consistent snapshot.
- `refresh()` is synchronous and cheap: pod, feed and service changes call it directly, and
  the status loop refreshes at least once a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from grpc_health.v1 import health, health_pb2

from router import routes
from router.aio import wait_event
from router.credentials import FIX_HINT
from router.locator import Locator
from router.metrics import Metrics
from router.pods import PodSet
from router.store import LocationStore, StoreUnavailable
from router.supervisor import Supervisor

if TYPE_CHECKING:
    from router.acp.frontdoor import AcpFrontDoor
    from router.discovery import DnsDiscovery

log = logging.getLogger("macp_router")

Snapshot = dict[str, Any]


class Readiness:
    """The router's readiness snapshot and the two loops that keep it and the drain flags
    current; see the module docstring."""

    def __init__(
        self,
        *,
        pods: PodSet,
        store: LocationStore,
        locator: Locator,
        supervisor: Supervisor,
        metrics: Metrics,
        health_servicer: health.aio.HealthServicer,
        drain_sync_s: float,
    ) -> None:
        self.pods = pods
        self.store = store
        self.locator = locator
        self.supervisor = supervisor
        self.metrics = metrics
        self.health_servicer = health_servicer
        self.drain_sync_s = drain_sync_s
        self.discovery: DnsDiscovery | None = None
        self.acp: AcpFrontDoor | None = None
        self.snapshot: Snapshot = {"ready": False, "reason": "starting"}
        self.shutting_down = False
        self.changed = asyncio.Event()
        """Set when something the snapshot shows changed: the status loop refreshes at once."""

    # -- the snapshot ------------------------------------------------------------------------
    def refresh(self) -> None:
        healthy = [pod.name for pod in self.pods if pod.healthy]
        ready, reason = self._verdict(healthy)
        self.snapshot = {
            "ready": ready,
            "reason": reason,
            "pods": {
                pod.name: {
                    "address": pod.address, "healthy": pod.healthy, "draining": pod.draining,
                    "feed_up": pod.feed_up, "last_error": pod.last_error,
                    "credentials_rejected": pod.credentials_rejected,
                    "placeable": pod.placeable, "not_placeable": pod.not_placeable_reason,
                }
                for pod in self.pods
            },
            "healthy_pods": len(healthy),
            "feeds_up": sum(1 for pod in self.pods if pod.feed_up),
            "store": {"kind": self.store.name, "degraded": self.store.degraded},
            "cached_sessions": len(self.locator.near),
            "services": self.services(),
            "services_down": sorted(state.name for state in self.supervisor.down()),
            "discovery": self._discovery(),
        }
        self.metrics.store_degraded.set(1 if self.store.degraded else 0)
        self.metrics.set_pod_counts("macp", len(self.pods), len(healthy))
        if self.acp is not None:  # ACP pods' health changes reach here within a second
            self.metrics.set_pod_counts("acp", len(self.acp.roster), len(self.acp.roster.healthy()))
        self.changed.set()

    def _verdict(self, healthy: list[str]) -> tuple[bool, str]:
        if self.shutting_down:
            return False, "shutting down"
        rejecting = [pod.name for pod in self.pods if pod.credentials_rejected]
        # A healthy pod that rejects the router's token cannot be watched or probed: the
        # router is not ready while no healthy pod accepts it.
        if any(name not in rejecting for name in healthy):
            return True, ""
        if healthy:
            return False, (f"every healthy pod rejects the router's credentials "
                           f"({', '.join(rejecting)}): {FIX_HINT}")
        reason = "no healthy pod" if len(self.pods) else "no pods"
        if self.discovery is not None and self.discovery.last_error:
            reason += f" ({self.discovery.last_error})"
        return False, reason

    def _discovery(self) -> dict[str, Any] | None:
        if self.discovery is None:
            return None
        return {"dns": f"{self.discovery.host}:{self.discovery.port}",
                "last_error": self.discovery.last_error,
                "resolutions": self.discovery.resolutions}

    def services(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {
            state.name: {"up": state.up, "starts": state.starts, "crashes": state.crashes,
                         "last_error": state.last_error, "for_s": round(now - state.since, 1)}
            for state in self.supervisor.states()
        }

    # -- the two services --------------------------------------------------------------------
    async def status_loop(self) -> None:
        """Keeps grpc.health.v1 and /readyz in step with pods, feeds, store and services."""
        serving: bool | None = None
        while True:
            self.changed.clear()
            self.refresh()
            self.changed.clear()
            ready = bool(self.snapshot["ready"])
            if ready != serving:
                serving = ready
                status = (health_pb2.HealthCheckResponse.SERVING if ready
                          else health_pb2.HealthCheckResponse.NOT_SERVING)
                for service in ("", routes.SERVICE):
                    await self.health_servicer.set(service, status)
            await wait_event(self.changed, 1.0)

    async def sync_draining(self) -> None:
        """Adopt the drain flags other routers set through the shared store."""
        try:
            drained = await self.store.draining_pods()
        except StoreUnavailable:
            return  # keep what we have; the store's health loop reports the outage
        for pod in self.pods:
            if pod.draining != (pod.name in drained):
                pod.draining = pod.name in drained
                log.info("pod %s %s through the shared store", pod.name,
                         "drained" if pod.draining else "undrained")
                self.metrics.set_pod_health(pod.name, pod.healthy, pod.draining)

    async def drain_sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.drain_sync_s)
            await self.sync_draining()
