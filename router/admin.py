"""`router.v1.RouterAdmin`: the operator's view of the router, on the router's gRPC port.

SessionStatus gives the answer the router routes by (ACP `session/status` semantics: live /
not_found, and unknown when a pod is silent). ListPods shows the pod table, the store and the
router's background services (up, or down with the error that stopped them). DrainPod and
UndrainPod stop and resume placements on a pod; its sessions keep routing either way.

Invariant: nothing here changes where an existing session is routed.
"""

from __future__ import annotations

import hmac
import logging
import time

import grpc

from router import __version__
from router.core.status import LIVE, NOT_FOUND
from router.credentials import FIX_HINT
from router.locator import SOURCE_CACHE, Located, Locator
from router.metrics import Metrics
from router.pods import Pod, PodSet
from router.scope import bearer_token
from router.store import TERMINAL_STATES, LocationStore, StoreUnavailable
from router.supervisor import Supervisor
from router.v1 import router_pb2, router_pb2_grpc
from router.watch import WatchFeed

log = logging.getLogger("macp_router.admin")


class RouterAdmin(router_pb2_grpc.RouterAdminServicer):
    def __init__(
        self,
        *,
        pods: PodSet,
        locator: Locator,
        store: LocationStore,
        feeds: dict[str, WatchFeed],
        metrics: Metrics,
        admin_token: str | None = None,
        open_reads: bool = False,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._admin_token = admin_token
        self.supervisor = supervisor
        self._open_reads = open_reads
        self.pods = pods
        self.locator = locator
        self.store = store
        self.feeds = feeds
        self.metrics = metrics

    async def _authorize(self, context: grpc.aio.ServicerContext, *, mutating: bool) -> None:
        """With an admin token configured: drain needs it; reads too unless open reads."""
        if self._admin_token is None or (not mutating and self._open_reads):
            return
        token = bearer_token(context.invocation_metadata())
        if not token:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the admin API needs 'authorization: Bearer <admin token>' "
                "(macp-router ... --admin-token TOKEN)",
            )
        if not hmac.compare_digest(token.encode(), self._admin_token.encode()):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "the admin token is not valid for this router")

    async def SessionStatus(
        self, request: router_pb2.SessionStatusRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.SessionStatusResponse:
        await self._authorize(context, mutating=False)
        sid = request.session_id
        if not sid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is required")
        entry = None if request.probe else self.locator.near.entry(sid)
        if entry is not None:
            located = Located(LIVE, entry[0], SOURCE_CACHE)
        elif request.probe:
            located = await self.locator.probe_now(sid)
        else:
            located = await self.locator.lookup(sid, use_negative=False)
        located_pod, source, status = located.pod or "", located.source, located.status
        causes = {pod.name: f"rejects the router's credentials ({pod.credentials_rejected}); "
                            f"{FIX_HINT}"
                  for pod in self.pods if pod.credentials_rejected}
        detail = (located.describe_unknown(sid, self.locator.probe_timeout_s, causes)
                  if located.unknown_pods else "")
        entry = self.locator.near.entry(sid)
        state = entry[1] if entry is not None else ""
        if status == LIVE and state in TERMINAL_STATES:
            status = NOT_FOUND
            detail = f"session ended ({state}); pod {located_pod} still answers GetSession for it"
        also_on = self.locator.duplicates(sid)
        if also_on:
            detail = (f"{detail}; " if detail else "") + (
                f"also reported by pod(s) {', '.join(also_on)}: routed to {located_pod} until "
                "it no longer holds it (pods must not share storage)")
        return router_pb2.SessionStatusResponse(
            status=str(status), pod=located_pod, source=source, state=state,
            unknown_pods=list(located.unknown_pods), detail=detail, also_on=also_on,
        )

    def pod_status(self, pod: Pod) -> router_pb2.PodStatus:
        counts = self.locator.near.counts()
        cached = sum(count for (name, _), count in counts.items() if name == pod.name)
        feed = self.feeds.get(pod.name)
        return router_pb2.PodStatus(
            name=pod.name,
            address=pod.address,
            healthy=pod.healthy,
            draining=pod.draining,
            feed_up=pod.feed_up,
            open_sessions=self.locator.near.open_counts().get(pod.name, 0),
            cached_sessions=cached,
            last_error=pod.last_error or (feed.last_error if feed and not pod.feed_up else ""),
            not_placeable=pod.not_placeable_reason,
            feed_reconnects=feed.reconnects if feed else 0,
            credentials_rejected=pod.credentials_rejected,
        )

    async def ListPods(
        self, request: router_pb2.ListPodsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListPodsResponse:
        await self._authorize(context, mutating=False)
        return router_pb2.ListPodsResponse(
            pods=[self.pod_status(pod) for pod in self.pods],
            store=self.store.name,
            store_degraded=self.store.degraded,
            version=__version__,
            cached_sessions=len(self.locator.near),
            services=self.service_statuses(),
        )

    def service_statuses(self) -> list[router_pb2.ServiceStatus]:
        if self.supervisor is None:
            return []
        now = time.monotonic()
        return [
            router_pb2.ServiceStatus(
                name=state.name, up=state.up, starts=state.starts, crashes=state.crashes,
                last_error=state.last_error, for_seconds=round(now - state.since, 1))
            for state in sorted(self.supervisor.states(), key=lambda s: s.name)
        ]

    async def _set_draining(
        self, request: router_pb2.DrainPodRequest, context: grpc.aio.ServicerContext,
        draining: bool,
    ) -> router_pb2.DrainPodResponse:
        await self._authorize(context, mutating=True)
        pod = self.pods.get(request.name)
        if pod is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no pod named {request.name!r}; pods: {', '.join(self.pods.names())}",
            )
        assert pod is not None
        pod.draining = draining
        self.metrics.set_pod_health(pod.name, pod.healthy, pod.draining)
        try:
            await self.store.set_draining(pod.name, draining)
        except StoreUnavailable:
            log.warning("pod %s %s on this router only: the store is degraded; other "
                        "routers learn it when you repeat the call after it recovers",
                        pod.name, "drained" if draining else "undrained")
        else:
            log.info("pod %s %s (shared through the %s store)", pod.name,
                     "drained" if draining else "undrained", self.store.name)
        return router_pb2.DrainPodResponse(pod=self.pod_status(pod))

    async def DrainPod(
        self, request: router_pb2.DrainPodRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.DrainPodResponse:
        return await self._set_draining(request, context, True)

    async def UndrainPod(
        self, request: router_pb2.DrainPodRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.DrainPodResponse:
        return await self._set_draining(request, context, False)
