"""One running router: builds every component from a `RouterConfig` and owns their lifetimes.

`Router` is the only place that creates background work, and all of it runs under one
`Supervisor` (`Router.supervisor`, module `router.supervisor`): the pods' health loops,
the watch feeds, the locator's store writer and sweeper, the store's health loop, DNS discovery,
the token-file watch, the readiness and drain-sync loops, and one-shot jobs (registry replays,
the clean-up after a pod left). A service that crashes is logged with its traceback, counted in
`macp_router_service_crashes_total{service}`, shown down in `/readyz`, `macp-router pods` and
the status page, and restarted.

`start()` and `stop()` run the stages of `_stages()` (`router.lifecycle`): started in order,
stopped in reverse, each stop bounded and named in the log if it hangs. Stopping first ends the
readiness loop, then stops accepting calls (health NOT_SERVING, open streams end with
UNAVAILABLE at once, in-flight unary calls finish within the grace period), then the ACP front
door, DNS discovery, the feeds and pods, the listeners, the locator (write-behind flushed), the
store, the token watch, and last every service still running.

Not here: readiness (`router.readiness`), the ports (`router.listeners`), routing
(`router.macp`, `router.core`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2

from router import routes
from router.admin import RouterAdmin
from router.admission import Admission
from router.config import RouterConfig, parse_host_port
from router.credentials import RouterCredentials
from router.discovery import DnsDiscovery, Resolver
from router.lifecycle import Lifecycle, Stage
from router.listeners import ListenError, Listeners
from router.locator import Locator
from router.macp import MacpProxy
from router.macp.listing import Listings
from router.metrics import Metrics
from router.pods import Pod, PodSet
from router.readiness import Readiness
from router.scope import DiscoveryScope
from router.store import LocationStore, MemoryStore, StoreUnavailable
from router.supervisor import ServiceState, Supervisor, service_kind
from router.watch import WatchFeed

if TYPE_CHECKING:
    from router.acp.frontdoor import AcpFrontDoor

log = logging.getLogger("macp_router")

FEED_START_WAIT_S = 10.0
"""How long start-up waits for the pods' first feed reconciles before serving anyway."""

STOP_STEP_S = 5.0
"""How long one shutdown stage may take (the servers: the shutdown grace plus this)."""


def pod_credentials(config: RouterConfig) -> grpc.ChannelCredentials | None:
    if not config.pod_ca:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=config.read_file(config.pod_ca),
        private_key=config.read_file(config.pod_key),
        certificate_chain=config.read_file(config.pod_cert),
    )


def make_pods(config: RouterConfig, supervisor: Supervisor) -> PodSet:
    return PodSet(
        supervisor=supervisor,
        credentials=pod_credentials(config),
        channels=config.channels_per_pod,
        max_channels=config.max_channels_per_pod,
        list_receive_bytes=config.max_list_bytes,
        health_interval_s=config.health_interval_ms / 1000,
        channel_options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ],
    )


def make_store(config: RouterConfig, metrics: Metrics,
               supervisor: Supervisor | None = None, protocol: str = "macp") -> LocationStore:
    if not config.redis_url:
        store = MemoryStore(retention_s=config.retention_s, supervisor=supervisor,
                            service=f"store_sweeper:{protocol}",
                            max_entries=config.cache_max_sessions)
        metrics.watch_size("macp_router_store_entries", (protocol,), store.__len__)
        return store
    from router.redis_store import RedisStore

    return RedisStore(
        config.redis_url,
        prefix=config.redis_prefix,
        password=config.redis_password,
        retention_s=config.retention_s,
        required=config.redis_required,
        observe_latency=metrics.observe_redis,
        supervisor=supervisor,
    )


class Router:
    """One router process's parts, wired together; `start()` / `stop()` run its stages."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        metrics: Metrics | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.config = config
        self.credentials = RouterCredentials(config.token, config.token_file)
        self.metrics = metrics or Metrics()
        self.supervisor = Supervisor(on_crash=self._service_crashed,
                                     on_state=self._service_changed)
        """Runs every background service of this router (see the module docstring)."""
        self.store = make_store(config, self.metrics, self.supervisor)
        self.pods = make_pods(config, self.supervisor)
        self.locator = Locator.configured(
            config, roster=self.pods, store=self.store, probe=self._probe, metrics=self.metrics,
            protocol="macp", on_silent=self.pods.report_silent)
        self.admission = Admission(config.max_inflight_calls, config.max_inflight_streams,
                                   config.admission_pushback_ms, metrics=self.metrics)
        """The process's client in-flight bounds, shared by the MACP and ACP front doors."""
        self.metrics.watch_admission(
            self.admission, ("macp", "acp") if config.acp is not None else ("macp",))
        self.proxy = MacpProxy(
            pods=self.pods,
            admission=self.admission,
            locator=self.locator,
            store=self.store,
            metrics=self.metrics,
            router_metadata=self.credentials.metadata,
            scope=(DiscoveryScope(config.observer_tokens, dict(config.token_identities))
                   if config.scope_discovery else None),
            listings=Listings(idle_s=config.list_snapshot_idle_s,
                              max_listings=config.list_snapshots,
                              max_bytes=config.list_snapshot_bytes, metrics=self.metrics),
        )
        self.metrics.add_broadcast_methods(
            method for method, route_class in routes.ROUTE_CLASSES.items()
            if route_class is routes.RouteClass.BROADCAST
        )
        self.acp = self._make_acp()
        self.feeds: dict[str, WatchFeed] = {}
        self.health = health.aio.HealthServicer()
        self.admin = RouterAdmin(
            pods=self.pods, locator=self.locator, store=self.store, feeds=self.feeds,
            metrics=self.metrics, admin_token=config.admin_token,
            open_reads=config.admin_open_reads, supervisor=self.supervisor,
        )
        self.listeners = Listeners(config, admin=self.admin, health_servicer=self.health,
                                   metrics=self.metrics, snapshot=lambda: self.readiness.snapshot)
        self.readiness = Readiness(
            pods=self.pods, store=self.store, locator=self.locator, supervisor=self.supervisor,
            metrics=self.metrics, health_servicer=self.health, drain_sync_s=config.drain_sync_s,
        )
        self.readiness.acp = self.acp
        self.discovery = self.readiness.discovery = self._make_discovery(resolver)
        self._grace_s = 0.0
        self.lifecycle = Lifecycle(self._stages())
        self.pods.on_join.append(self._pod_joined)
        self.pods.on_leave.append(self._pod_left)
        self.pods.on_health_change.append(self._pod_health_changed)

    def _make_acp(self) -> AcpFrontDoor | None:
        if self.config.acp is None:
            return None
        from router.acp.frontdoor import AcpFrontDoor

        acp_store = make_store(
            dataclasses.replace(self.config, redis_prefix=self.config.redis_prefix + "acp:"),
            self.metrics, self.supervisor, protocol="acp",
        )
        return AcpFrontDoor(self.config.acp, metrics=self.metrics, store=acp_store,
                           supervisor=self.supervisor, admission=self.admission)

    def _make_discovery(self, resolver: Resolver | None) -> DnsDiscovery | None:
        if not self.config.pods_dns:
            return None
        return DnsDiscovery(
            self.config.pods_dns, self.pods, supervisor=self.supervisor, resolver=resolver,
            interval_s=self.config.dns_interval_s, on_forget=self.locator.forget_pod,
        )

    async def _probe(self, pod: str, sid: str) -> str:
        return await self.proxy.probe(pod, sid)

    # -- pods joining and leaving --------------------------------------------------------------
    def _pod_joined(self, pod: Pod) -> None:
        self.metrics.add_pod(pod.name)
        pod.answer_check = self.proxy.answers
        feed = WatchFeed(
            pod, self.locator, self.metrics,
            supervisor=self.supervisor,
            metadata=self.credentials.metadata,
            on_connect=self.proxy.replay_broadcasts,
        )
        self.feeds[pod.name] = feed
        feed.start()

    def _pod_left(self, pod: Pod) -> None:
        feed = self.feeds.pop(pod.name, None)
        stopping = feed.cancel() if feed is not None else None  # before its channels close
        self._job(f"forget_pod:{pod.name}",
                  functools.partial(self._forget_pod_series, pod.name, stopping))

    async def _forget_pod_series(self, name: str, feed: asyncio.Task[None] | None) -> None:
        """Once the pod's feed has stopped (its last write), drop every series of the pod."""
        if feed is not None:
            await asyncio.wait({feed}, timeout=STOP_STEP_S)
        if self.pods.get(name) is None:  # not re-added meanwhile
            self.metrics.remove_pod(name)
        self.readiness.refresh()

    def _job(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """A one-shot background job under the supervisor (none once the router is stopping)."""
        if not self.supervisor.closing:
            self.supervisor.spawn_job(name, body)

    # -- background services: crash counts and states ---------------------------------------------
    def _service_crashed(self, name: str, exc: BaseException) -> None:
        self.metrics.record_service_crash(service_kind(name))

    def _service_changed(self, state: ServiceState) -> None:
        """A service went up or down: its kind's gauge, and /readyz at its next refresh."""
        kind = state.kind
        self.metrics.set_service_up(kind, all(
            other.up or not other.starts  # not scheduled yet: starting, not down
            for other in self.supervisor.states() if other.kind == kind))
        self.readiness.changed.set()

    def _pod_health_changed(self, pod: Pod) -> None:
        self.metrics.set_pod_health(pod.name, pod.healthy, pod.draining)
        self.metrics.set_pod_credentials_rejected(pod.name, bool(pod.credentials_rejected))
        if pod.healthy and pod.feed_up and not pod.registry_synced:
            # Unhealthy and back without its feed dropping (a blip, or a call it missed):
            # replay what it lacks now, since no feed reconnect will.
            self._job(f"replay:{pod.name}", functools.partial(self.proxy.replay_broadcasts, pod))
        self.readiness.refresh()

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self.listeners.port

    @property
    def admin_port(self) -> int:
        return self.listeners.admin_port

    @property
    def metrics_port(self) -> int:
        return self.listeners.metrics_port

    def _stages(self) -> list[Stage]:
        """The router's parts in start order; `stop()` runs them in reverse."""
        serving_s = lambda: self._grace_s + STOP_STEP_S  # noqa: E731
        return [
            Stage("background services", stop=self.supervisor.aclose,
                  stop_timeout_s=2 * STOP_STEP_S),
            Stage("router token file watch", self._watch_token_file, self.credentials.aclose),
            Stage("store", self.store.start, self.store.aclose),
            Stage("locator", self._start_locator, self._stop_locator,
                  stop_timeout_s=2 * STOP_STEP_S),
            Stage("listeners", self._bind_listeners, self.listeners.close),
            Stage("pods and their watch feeds", self._add_pods, self._close_pods,
                  stop_timeout_s=2 * STOP_STEP_S),
            Stage("DNS discovery", self._start_discovery, self._stop_discovery),
            Stage("first health checks and feed reconciles", self._wait_for_pods),
            Stage("ACP front door", self._start_acp, self._stop_acp, stop_timeout_s=serving_s),
            Stage("gRPC server", self.listeners.serve, self._stop_serving,
                  stop_timeout_s=serving_s),
            Stage("readiness and drain sync", self._start_status_services,
                  self._stop_status_services),
        ]

    async def start(self) -> None:
        """Run the stages in order; if one fails, stop what started (at once) and raise."""
        self._grace_s = 0.0
        self.metrics.watch_event_loop(asyncio.get_running_loop())
        await self.lifecycle.start()

    async def _watch_token_file(self) -> None:
        self.credentials.start(self.supervisor)

    async def _start_locator(self) -> None:
        await self.locator.start(self.supervisor)
        resync = self.store.on_recovered

        async def recovered() -> None:
            if resync is not None:
                await resync()
            await self.proxy.replay_deferred()

        self.store.on_recovered = recovered

    async def _stop_locator(self) -> None:
        await self._flush_quietly()
        await self.locator.aclose()

    async def _bind_listeners(self) -> None:
        await self.listeners.bind((self.proxy.generic_handler(),
                                   self.proxy.unimplemented_handler()))

    async def _add_pods(self) -> None:
        for spec in self.config.pods:
            self.pods.add(spec)  # its health loop and watch feed start (on_join)

    async def _close_pods(self) -> None:
        feeds = list(self.feeds.values())
        self.feeds.clear()
        await asyncio.gather(*(feed.aclose() for feed in feeds))
        await self.pods.aclose()

    async def _start_discovery(self) -> None:
        if self.discovery is not None:
            self.discovery.start()

    async def _stop_discovery(self) -> None:
        if self.discovery is not None:
            await self.discovery.aclose()

    async def _wait_for_pods(self) -> None:
        """Bounded: every pod checked once, each healthy pod's feed reconciled once."""
        # Serve only once every pod has had one health check, so the first calls after "ready"
        # are not refused for want of a known-healthy pod (bounded: a dead pod stays down).
        await asyncio.gather(*(pod.wait_checked(self.config.health_interval_ms / 1000 + 1)
                               for pod in self.pods))
        # ... and, bounded, until each healthy pod's feed has reconciled once and had its
        # registry replayed: before that no pod is placeable and every start would be refused.
        await asyncio.gather(*(
            feed.wait_for(lambda f: (f.reconciles > 0 or not f.pod.healthy
                                   or bool(f.pod.credentials_rejected)), FEED_START_WAIT_S)
            for feed in list(self.feeds.values())))
        await self.readiness.sync_draining()
        self.readiness.refresh()

    async def _start_acp(self) -> None:
        if self.acp is None:
            return
        try:
            await self.acp.start()
        except OSError as exc:
            raise ListenError(
                f"cannot listen on --acp-listen {self.acp.config.listen}: {exc.strerror}"
            ) from None

    async def _stop_acp(self) -> None:
        if self.acp is not None and self.acp.started:
            await self.acp.aclose()

    async def _stop_serving(self) -> None:
        """No new calls; open streams end now (UNAVAILABLE); unary calls get the grace."""
        if self.listeners.server is None:
            return
        self.readiness.shutting_down = True
        self.readiness.refresh()
        for service in ("", routes.SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.proxy.end_streams()
        await self.listeners.stop_serving(self._grace_s)

    async def _start_status_services(self) -> None:
        self.supervisor.spawn("status", self.readiness.status_loop)
        self.supervisor.spawn("drain_sync", self.readiness.drain_sync_loop)

    async def _stop_status_services(self) -> None:
        await self.supervisor.stop("status")
        await self.supervisor.stop("drain_sync")

    @property
    def address(self) -> str:
        host, _ = parse_host_port(self.config.listen, "--listen")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def wait_ready(self, timeout: float = 10.0) -> bool:
        """Until every pod's feed has reconciled once (or `timeout`)."""
        async def all_up() -> None:
            for feed in list(self.feeds.values()):
                await feed.wait_for(lambda f: f.reconciles > 0, timeout)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await all_up()
        return all(feed.reconciles > 0 for feed in self.feeds.values())

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight calls finish within `grace`, then close everything.

        The stages stop in reverse order, each bounded: a stage that does not finish is named
        in the log and skipped, so SIGTERM always ends the process.
        """
        self._grace_s = self.config.shutdown_grace_s if grace is None else grace
        await self.lifecycle.stop()

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(StoreUnavailable, RuntimeError):  # store never started
            await self.locator.flush()

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop(grace=0)
