"""Every Prometheus metric of the router, in one place, with helpers that bound label values.

Names follow `macp_router_<thing>_<unit>`: counters end in `_total`, durations in `_seconds`.
Label values are bounded: call sites pass what they have and the helpers map anything outside
the known set (methods of the route table, configured pods, gRPC codes, locate results) to
"unknown". A session id is never a label.

Each `Metrics` owns its own `CollectorRegistry` (no module globals), so several routers can run
in one process (tests) without clashing. Hot-path helpers cache labelled children.

Series lifecycle (what dashboards and alerts rely on):
- Known label sets exist from the start at 0: every locate result, fan-outs, coalesced misses
  and duplicates per protocol (when a locator registers, `watch_cached_sessions`), per-pod
  feed reconnects, probes, placements, replays (`add_pod`), and broadcast results per
  broadcast method (`add_broadcast_methods`). A panel shows 0, never "No data".
- A pod that leaves loses every series with its `pod` label (`remove_pod`), so an alert on a
  gauge of a pod that is gone (feed down, unhealthy) stops instead of firing for ever. Later
  writes for a removed pod's gauges are ignored.
- `macp_router_pods` / `macp_router_healthy_pods` count pods per protocol, so "no healthy pod"
  is a series at 0 even when the router has no pod at all.
- Admission control's refusals (`macp_router_admission_refused_total{protocol,kind}`) start at
  0 for every protocol the router serves; its in-flight counts and limits
  (`macp_router_admission_inflight` / `_limit{kind}`) are read from the gate at scrape time.
- Background services (`router.supervisor`) are counted by kind (`watch`, `store_writer`, ...,
  a word fixed in code, never a pod or session): a kind's crash counter and `service_up` gauge
  exist from its first start.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router.logs import log_call

PROTOCOLS = frozenset({"macp", "acp"})
LOCATE_RESULTS = frozenset(
    {"hit", "store_hit", "probe_hit", "not_found", "negative_hit", "unknown", "stale"}
)
PROBE_RESULTS = frozenset({"live", "not_found", "unknown"})
BROADCAST_RESULTS = frozenset({"ok", "partial", "failed", "refused"})
PLACEMENT_RESULTS = frozenset({"placed", "lost_race", "released"})
WATCH_EVENTS = frozenset(
    {"created", "resolved", "expired", "suspended", "resumed", "cancelled", "unspecified"}
)
GRPC_CODES = frozenset(code.name for code in grpc.StatusCode)
SERVICE_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")
"""What a background service kind looks like; anything else is exported as "unknown"."""
UNKNOWN = "unknown"

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


RECENT_PLACEMENTS = 20


class Placement(NamedTuple):
    at: float  # wall-clock time.time()
    protocol: str
    pod: str
    result: str
    sid: str


def bounded(value: str, allowed: Iterable[str] | frozenset[str]) -> str:
    """`value` if it is one of `allowed`, else "unknown" (keeps label cardinality bounded)."""
    return value if value in allowed else UNKNOWN


class _CachedSessionsCollector(Collector):
    """`macp_router_cached_sessions{protocol,pod,state}` read from near-caches at scrape time."""

    def __init__(self, known_pods: set[str]) -> None:
        self.sources: dict[str, Callable[[], Mapping[tuple[str, str], int]]] = {}
        self.known_pods = known_pods  # entries cached for a pod that left are not exported

    def collect(self):  # type: ignore[no-untyped-def]
        family = GaugeMetricFamily(
            "macp_router_cached_sessions",
            "Sessions in the near-cache by protocol, pod and state",
            labels=["protocol", "pod", "state"],
        )
        for protocol, source in sorted(self.sources.items()):
            for (pod, state), count in sorted(source().items()):
                if pod in self.known_pods:
                    family.add_metric([protocol, pod, state], count)
        yield family


SIZE_GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "macp_router_negative_cache_entries": (
        "Session ids remembered as held by no pod (the negative cache: bounded by "
        "--negative-cache-max-sessions, each for --negative-cache-ms), by protocol",
        ("protocol",)),
    "macp_router_inflight_lookups": (
        "Single-flight look-ups in flight (one per session id being located past the "
        "near-cache), by protocol",
        ("protocol",)),
    "macp_router_store_entries": (
        "Entries in the in-memory location store (the embedded default; ended sessions "
        "leave it after --retention-s), by protocol; none with a Redis store",
        ("protocol",)),
    "macp_router_acp_connections": (
        "Open ACP connections: side=client (client connections of the front door, HTTP and "
        "WebSocket), side=upstream (their connections to ACP pods; the per-pod control "
        "connections not counted)",
        ("side",)),
    "macp_router_acp_session_streams": (
        "ACP session streams held by client connections (one per session a connection used; "
        "gone when the session is closed or deleted, or the connection closes)",
        ()),
}
"""Gauges read from the router's own structures at scrape time (`Metrics.watch_size`)."""

CACHE_EVICTION_REASONS = ("expired", "terminal", "live")


class _SizesCollector(Collector):
    """The sizes of the router's bounded in-memory structures (`SIZE_GAUGES`) and
    `macp_router_cache_evictions_total{protocol,reason}`, read from the structures themselves
    at scrape time: the hot path touches no metric. A family with no source yet has no series.
    """

    def __init__(self) -> None:
        self.sources: dict[str, dict[tuple[str, ...], Callable[[], float]]] = {
            name: {} for name in SIZE_GAUGES}
        self.evictions: dict[str, Mapping[str, int]] = {}
        self.idle_closed: Mapping[str, int] | None = None

    def collect(self):  # type: ignore[no-untyped-def]
        for name, (text, labels) in SIZE_GAUGES.items():
            family = GaugeMetricFamily(name, text, labels=list(labels))
            for values, read in sorted(self.sources[name].items()):
                family.add_metric(list(values), read())
            yield family
        evictions = CounterMetricFamily(
            "macp_router_cache_evictions",
            "Sessions removed from the near-cache, by reason: expired (an ended session's "
            "--retention-s or a reservation's TTL passed), terminal / live (evicted to make "
            "room at --cache-max-sessions: ended sessions first, then the oldest live ones, "
            "which their next call finds again through the store or a probe)",
            labels=["protocol", "reason"],
        )
        for protocol, counts in sorted(self.evictions.items()):
            for reason in CACHE_EVICTION_REASONS:
                evictions.add_metric([protocol, reason], counts.get(reason, 0))
        yield evictions
        idle = CounterMetricFamily(
            "macp_router_acp_idle_closed",
            "ACP connections the router closed after --acp-idle-timeout-s without traffic: "
            "side=client (a client connection, HTTP or WebSocket), side=upstream (a client's "
            "connection to a pod holding none of its sessions)",
            labels=["side"],
        )
        if self.idle_closed is not None:
            for side in ("client", "upstream"):
                idle.add_metric([side], self.idle_closed.get(side, 0))
        yield idle


class _AsyncioTasksCollector(Collector):
    """`macp_router_asyncio_tasks`: tasks alive on the router's event loop, read at scrape time.

    Scrapes run on the operations HTTP thread; `asyncio.all_tasks(loop)` copes with the loop
    changing its task set meanwhile. No series until `watch(loop)` names the loop.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    def collect(self):  # type: ignore[no-untyped-def]
        family = GaugeMetricFamily(
            "macp_router_asyncio_tasks",
            "asyncio tasks alive on the router's event loop (calls, streams, feeds, services)",
        )
        if self.loop is not None and not self.loop.is_closed():
            family.add_metric([], len(asyncio.all_tasks(self.loop)))
        yield family


class _AdmissionSource(Protocol):
    def snapshot(self) -> Mapping[str, tuple[int, int]]: ...


class _AdmissionCollector(Collector):
    """`macp_router_admission_inflight{kind}` and `macp_router_admission_limit{kind}`, read
    from the router's admission gate (`router.admission`) at scrape time: the hot path only
    moves two ints, never a metric. No series until `watch_admission` names the gate."""

    def __init__(self) -> None:
        self.gate: _AdmissionSource | None = None

    def collect(self):  # type: ignore[no-untyped-def]
        inflight = GaugeMetricFamily(
            "macp_router_admission_inflight",
            "Client calls (kind=call) and streams (kind=stream) in flight in this router "
            "process, as admission control counts them",
            labels=["kind"],
        )
        limit = GaugeMetricFamily(
            "macp_router_admission_limit",
            "The in-flight bound per kind (--max-inflight-calls / --max-inflight-streams); "
            "0 = unbounded",
            labels=["kind"],
        )
        if self.gate is not None:
            for kind, (now, bound) in sorted(self.gate.snapshot().items()):
                inflight.add_metric([kind], now)
                limit.add_metric([kind], bound)
        yield inflight
        yield limit


def _remove_series(metric: Counter | Gauge, label: str, value: str) -> None:
    """Remove every child of `metric` whose `label` is `value` (public collect/remove API)."""
    seen: set[tuple[str, ...]] = set()
    for family in metric.collect():
        for sample in family.samples:
            if sample.labels.get(label) != value:
                continue
            names = [n for n in sample.labels if n not in ("le", "quantile")]
            seen.add(tuple(sample.labels[n] for n in names))
    for values in seen:
        try:
            metric.remove(*values)
        except KeyError:
            pass


class MetricSpec(NamedTuple):
    """One metric of `Metrics`: the attribute it is reached by, its kind, name, help, labels."""

    attr: str
    kind: type[Counter] | type[Gauge] | type[Histogram]
    name: str
    help: str
    labels: tuple[str, ...] = ()


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("requests", Counter, "macp_router_requests",
               "Calls handled, by method, route class, pod and gRPC code",
               ("protocol", "method", "route", "pod", "code")),
    MetricSpec("request_duration", Histogram, "macp_router_request_duration_seconds",
               "Time from a call's arrival to its last byte, by method and route class",
               ("protocol", "method", "route")),
    MetricSpec("unexpected_errors", Counter, "macp_router_unexpected_errors",
               "Calls that ended with an unexpected exception (a router bug), answered INTERNAL",
               ("protocol", "method")),
    MetricSpec("locate", Counter, "macp_router_locate",
               "Session lookups by result (hit, store_hit, probe_hit, not_found, negative_hit, "
               "unknown, stale)",
               ("protocol", "result")),
    MetricSpec("probe_fanouts", Counter, "macp_router_probe_fanouts",
               "Probe fan-outs started on a miss",
               ("protocol",)),
    MetricSpec("probes", Counter, "macp_router_probes",
               "Single-pod probes by answer",
               ("protocol", "pod", "result")),
    MetricSpec("probe_duration", Histogram, "macp_router_probe_duration_seconds",
               "Time for a probe fan-out to reach its answer",
               ("protocol",)),
    MetricSpec("coalesced_misses", Counter, "macp_router_coalesced_misses",
               "Misses that joined a fan-out already in flight for the same session",
               ("protocol",)),
    MetricSpec("duplicate_sessions", Counter, "macp_router_duplicate_sessions",
               "Probe fan-outs where more than one pod answered live for one session",
               ("protocol",)),
    MetricSpec("placements", Counter, "macp_router_placements",
               "Session placements by pod and result (placed, lost_race, released)",
               ("protocol", "pod", "result")),
    MetricSpec("broadcasts", Counter, "macp_router_broadcasts",
               "Broadcast registry calls by method and outcome (ok, partial, failed, refused)",
               ("method", "result")),
    MetricSpec("broadcast_replays", Counter, "macp_router_broadcast_replays",
               "Registry calls replayed to a pod that joined or restarted (ok, failed, refused)",
               ("pod", "result")),
    MetricSpec("broadcast_record_failures", Counter, "macp_router_broadcast_record_failures",
               "Registry calls the pods hold that the store could not remember (or forget): "
               "they are NOT replayed to pods that join or restart; register again once the "
               "store is back",
               ("method",)),
    MetricSpec("list_snapshots", Gauge, "macp_router_list_snapshots",
               "ListSessions listings held for paging (one snapshot per listing, bounded in "
               "count and bytes, expiring when idle)",
               ()),
    MetricSpec("list_snapshot_bytes", Gauge, "macp_router_list_snapshot_bytes",
               "Bytes of the ListSessions snapshots held for paging",
               ()),
    MetricSpec("watch_up", Gauge, "macp_router_watch_up",
               "1 while the pod's WatchSessions feed is connected",
               ("pod",)),
    MetricSpec("watch_reconnects", Counter, "macp_router_watch_reconnects",
               "WatchSessions feed reconnects",
               ("pod",)),
    MetricSpec("watch_events", Counter, "macp_router_watch_events",
               "Lifecycle events applied from the feeds",
               ("pod", "event")),
    MetricSpec("reconcile_dropped", Counter, "macp_router_reconcile_dropped",
               "Cached entries dropped by a post-reconnect ListSessions reconcile",
               ("pod",)),
    MetricSpec("active_streams", Gauge, "macp_router_active_streams",
               "Streaming calls in flight",
               ("protocol", "method")),
    MetricSpec("pod_healthy", Gauge, "macp_router_pod_healthy",
               "1 while the pod answers health checks",
               ("pod",)),
    MetricSpec("pod_draining", Gauge, "macp_router_pod_draining",
               "1 while the pod takes no new placements",
               ("pod",)),
    MetricSpec("pod_credentials_rejected", Gauge, "macp_router_pod_credentials_rejected",
               "1 while the pod rejects the router's own token (UNAUTHENTICATED / "
               "PERMISSION_DENIED to its feed, reconcile, probes or replays): fix --token",
               ("pod",)),
    MetricSpec("store_degraded", Gauge, "macp_router_store_degraded",
               "1 while the location store is unreachable",
               ()),
    MetricSpec("redis_command_duration", Histogram, "macp_router_redis_command_duration_seconds",
               "Redis command (or pipeline) latency",
               ("command",)),
    MetricSpec("pods", Gauge, "macp_router_pods",
               "Pods the router routes to (configured or discovered)",
               ("protocol",)),
    MetricSpec("healthy_pods", Gauge, "macp_router_healthy_pods",
               "Pods that answer health checks; 0 also when the router has no pod at all",
               ("protocol",)),
    MetricSpec("service_crashes", Counter, "macp_router_service_crashes",
               "Background services that raised an unexpected exception (logged with its "
               "traceback; the service is restarted with backoff), by service kind",
               ("service",)),
    MetricSpec("service_up", Gauge, "macp_router_service_up",
               "1 while every background service of this kind runs; 0 while one is down (crashed "
               "and waiting for its restart)",
               ("service",)),
    MetricSpec("admission_refused", Counter, "macp_router_admission_refused",
               "Client calls and streams refused at once because the router was at its "
               "in-flight bound (--max-inflight-calls / --max-inflight-streams), by protocol "
               "and kind (call, stream); each was answered with a retry hint",
               ("protocol", "kind")),
)
"""Every metric `Metrics.__init__` creates, in registration order (histograms get
`LATENCY_BUCKETS`): names, types, help texts and label sets are what dashboards and
alerts rely on, kept here as data."""


class Metrics:
    requests: Counter
    request_duration: Histogram
    unexpected_errors: Counter
    locate: Counter
    probe_fanouts: Counter
    probes: Counter
    probe_duration: Histogram
    coalesced_misses: Counter
    duplicate_sessions: Counter
    placements: Counter
    broadcasts: Counter
    broadcast_replays: Counter
    broadcast_record_failures: Counter
    list_snapshots: Gauge
    list_snapshot_bytes: Gauge
    watch_up: Gauge
    watch_reconnects: Counter
    watch_events: Counter
    reconcile_dropped: Counter
    active_streams: Gauge
    pod_healthy: Gauge
    pod_draining: Gauge
    pod_credentials_rejected: Gauge
    store_degraded: Gauge
    redis_command_duration: Histogram
    pods: Gauge
    healthy_pods: Gauge
    service_crashes: Counter
    service_up: Gauge
    admission_refused: Counter

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.known_pods: set[str] = set()
        self.known_methods: set[str] = set()
        for spec in METRICS:
            options = {"buckets": LATENCY_BUCKETS} if spec.kind is Histogram else {}
            setattr(self, spec.attr, spec.kind(spec.name, spec.help, spec.labels,
                                               registry=r, **options))
        self._cached_sessions = _CachedSessionsCollector(self.known_pods)
        r.register(self._cached_sessions)
        self._asyncio_tasks = _AsyncioTasksCollector()
        r.register(self._asyncio_tasks)
        self._sizes = _SizesCollector()
        r.register(self._sizes)
        self._admission = _AdmissionCollector()
        r.register(self._admission)
        self.recent_placements: deque[Placement] = deque(maxlen=RECENT_PLACEMENTS)
        """The last placements (status page); bounded, never exported as labels."""
        self._request_children: dict[tuple[str, str, str, str, str], tuple[object, object]] = {}
        self._locate_children: dict[tuple[str, str], object] = {}

    def watch_event_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Export `macp_router_asyncio_tasks` for `loop` (the soak's leak detector reads it)."""
        self._asyncio_tasks.loop = loop

    def watch_admission(self, gate: _AdmissionSource, protocols: Iterable[str]) -> None:
        """Export `gate`'s in-flight counts and limits; its refusal series start at 0."""
        self._admission.gate = gate
        for protocol in protocols:
            for kind in ("call", "stream"):
                self.admission_refused.labels(bounded(protocol, PROTOCOLS), kind)

    def record_refused(self, protocol: str, kind: str) -> None:
        """One client call or stream refused by admission control."""
        self.admission_refused.labels(bounded(protocol, PROTOCOLS),
                                      kind if kind in ("call", "stream") else UNKNOWN).inc()

    # -- registration of bounded label sets -------------------------------------------------
    def add_pod(self, pod: str, protocol: str = "macp") -> None:
        """A MACP pod joined: its gauges at 0 and its counters' known label sets at 0."""
        self.known_pods.add(pod)
        self.pod_healthy.labels(pod).set(0)
        self.pod_draining.labels(pod).set(0)
        self.pod_credentials_rejected.labels(pod).set(0)
        self.watch_up.labels(pod).set(0)
        self.watch_reconnects.labels(pod)
        self.reconcile_dropped.labels(pod)
        protocol = bounded(protocol, PROTOCOLS)
        for result in PROBE_RESULTS:
            self.probes.labels(protocol, pod, result)
        for result in PLACEMENT_RESULTS:
            self.placements.labels(protocol, pod, result)
        for result in ("ok", "failed", "refused"):
            self.broadcast_replays.labels(pod, result)

    def remove_pod(self, pod: str) -> None:
        """A pod left: delete every series labelled with it (alerts on it stop).

        Call it once nothing writes the pod's series any more (its feed closed); gauges written
        later for an unknown pod are ignored by the setters.
        """
        self.known_pods.discard(pod)
        for metric in (self.requests, self.probes, self.placements, self.broadcast_replays,
                       self.watch_up, self.watch_reconnects, self.watch_events,
                       self.reconcile_dropped, self.pod_healthy, self.pod_draining,
                       self.pod_credentials_rejected,
                       getattr(self, "_pod_up_gauge", None)):
            if metric is not None:
                _remove_series(metric, "pod", pod)
        for key in [key for key in self._request_children if key[3] == pod]:
            del self._request_children[key]

    def set_pod_counts(self, protocol: str, pods: int, healthy: int) -> None:
        protocol = bounded(protocol, PROTOCOLS)
        self.pods.labels(protocol).set(pods)
        self.healthy_pods.labels(protocol).set(healthy)

    def add_broadcast_methods(self, methods: Iterable[str]) -> None:
        """Broadcast results per registry method start at 0."""
        for method in methods:
            for result in BROADCAST_RESULTS:
                self.broadcasts.labels(bounded(method, self.known_methods), result)
            self.broadcast_record_failures.labels(bounded(method, self.known_methods))

    def _start_protocol(self, protocol: str) -> None:
        protocol = bounded(protocol, PROTOCOLS)
        for result in LOCATE_RESULTS:
            self.locate.labels(protocol, result)
        for counter in (self.probe_fanouts, self.coalesced_misses, self.duplicate_sessions):
            counter.labels(protocol)
        self.pods.labels(protocol)
        self.healthy_pods.labels(protocol)

    def add_methods(self, methods: Iterable[str]) -> None:
        self.known_methods.update(methods)

    def watch_cached_sessions(
        self, source: Callable[[], Mapping[tuple[str, str], int]], protocol: str = "macp"
    ) -> None:
        """Export a near-cache's (pod, state) counts; one source per protocol.

        Each protocol's locator registers here once, so this also starts that protocol's
        locate, fan-out and coalesced-miss series at 0.
        """
        self._cached_sessions.sources[bounded(protocol, PROTOCOLS)] = source
        self._start_protocol(protocol)

    def watch_size(self, name: str, labels: tuple[str, ...],
                   read: Callable[[], float]) -> None:
        """Export `read()` (e.g. a dict's `__len__`) as gauge `name`, one of `SIZE_GAUGES`,
        with these label values; read at scrape time on the metrics thread."""
        if name not in SIZE_GAUGES or len(labels) != len(SIZE_GAUGES[name][1]):
            raise ValueError(f"{name}{labels} is no size gauge of SIZE_GAUGES")
        self._sizes.sources[name][labels] = read

    def watch_locator(self, protocol: str, *, evictions: Mapping[str, int],
                      negative: Callable[[], float], inflight: Callable[[], float]) -> None:
        """A locator's near-cache eviction counts, negative-cache and in-flight sizes."""
        protocol = bounded(protocol, PROTOCOLS)
        self._sizes.evictions[protocol] = evictions
        self.watch_size("macp_router_negative_cache_entries", (protocol,), negative)
        self.watch_size("macp_router_inflight_lookups", (protocol,), inflight)

    def watch_idle_closed(self, counts: Mapping[str, int]) -> None:
        """The ACP front door's idle-connection reaper counts, by side (client, upstream)."""
        self._sizes.idle_closed = counts

    def pod_label(self, pod: str | None) -> str:
        if not pod:
            return "none"
        return bounded(pod, self.known_pods)

    # -- hot-path helpers --------------------------------------------------------------------
    def record_request(
        self, protocol: str, method: str, route: str, pod: str | None, code: str, seconds: float
    ) -> None:
        key = (protocol, method, route, pod or "none", code)
        children = self._request_children.get(key)
        if children is None:
            labels = (
                bounded(protocol, PROTOCOLS),
                bounded(method, self.known_methods),
                route,
                self.pod_label(pod),
                bounded(code, GRPC_CODES),
            )
            children = (
                self.requests.labels(*labels),
                self.request_duration.labels(labels[0], labels[1], labels[2]),
            )
            if labels == key:
                # Cached only for known values: a client's made-up method names (or a pod
                # that left) are exported as "unknown" and must not grow this table either.
                self._request_children[key] = children
        counter, histogram = children
        counter.inc()  # type: ignore[attr-defined]
        histogram.observe(seconds)  # type: ignore[attr-defined]
        log_call(protocol, method, route, pod, code, seconds)

    def record_unexpected(self, protocol: str, method: str) -> None:
        """A call ended with an unexpected exception (see `router.core.errors`)."""
        self.unexpected_errors.labels(bounded(protocol, PROTOCOLS),
                                      bounded(method, self.known_methods)).inc()

    def record_locate(self, protocol: str, result: str) -> None:
        key = (protocol, result)
        child = self._locate_children.get(key)
        if child is None:
            child = self.locate.labels(
                bounded(protocol, PROTOCOLS), bounded(result, LOCATE_RESULTS)
            )
            self._locate_children[key] = child
        child.inc()  # type: ignore[attr-defined]

    def record_probe(self, protocol: str, pod: str, result: str) -> None:
        self.probes.labels(
            bounded(protocol, PROTOCOLS), self.pod_label(pod), bounded(result, PROBE_RESULTS)
        ).inc()

    def record_placement(self, protocol: str, pod: str, result: str, sid: str = "") -> None:
        self.placements.labels(
            bounded(protocol, PROTOCOLS), self.pod_label(pod), bounded(result, PLACEMENT_RESULTS)
        ).inc()
        self.recent_placements.append(Placement(time.time(), protocol, pod, result, sid))

    def record_broadcast(self, method: str, result: str) -> None:
        self.broadcasts.labels(
            bounded(method, self.known_methods), bounded(result, BROADCAST_RESULTS)
        ).inc()

    def record_watch_event(self, pod: str, event: str) -> None:
        self.watch_events.labels(self.pod_label(pod), bounded(event, WATCH_EVENTS)).inc()

    def set_pod_health(self, pod: str, healthy: bool, draining: bool) -> None:
        if pod not in self.known_pods:
            return  # a pod that left: its series are gone and stay gone
        label = pod
        self.pod_healthy.labels(label).set(1 if healthy else 0)
        self.pod_draining.labels(label).set(1 if draining else 0)

    def set_pod_credentials_rejected(self, pod: str, rejected: bool) -> None:
        if pod in self.known_pods:
            self.pod_credentials_rejected.labels(pod).set(1 if rejected else 0)

    def set_service_up(self, kind: str, up: bool) -> None:
        """A background service kind's state (its crash counter starts at 0 with it)."""
        label = kind if SERVICE_KIND.fullmatch(kind) else UNKNOWN
        self.service_crashes.labels(label)
        self.service_up.labels(label).set(1 if up else 0)

    def record_service_crash(self, kind: str) -> None:
        self.service_crashes.labels(kind if SERVICE_KIND.fullmatch(kind) else UNKNOWN).inc()

    def observe_redis(self, command: str, seconds: float) -> None:
        self.redis_command_duration.labels(command.lower()[:32]).observe(seconds)

    # -- pods of other front doors (ACP) -----------------------------------------------------
    def add_protocol_pod(self, protocol: str, pod: str) -> None:
        """Register a pod of a non-MACP front door: a known pod label, `pod_up` gauge at 0.

        `add_pod` also creates the MACP watch-feed gauge, which such pods do not have (and
        whose alert would then fire for them).
        """
        self.known_pods.add(pod)
        self._pod_up().labels(bounded(protocol, PROTOCOLS), pod).set(0)

    def set_protocol_pod_up(self, protocol: str, pod: str, up: bool) -> None:
        if pod not in self.known_pods:
            return
        self._pod_up().labels(bounded(protocol, PROTOCOLS), pod).set(
            1 if up else 0
        )

    def _pod_up(self) -> Gauge:
        gauge: Gauge | None = getattr(self, "_pod_up_gauge", None)
        if gauge is None:
            gauge = Gauge(
                "macp_router_pod_up",
                "1 while a front door's pod answers, by protocol (acp: its control connection "
                "is open and answers pings)",
                ["protocol", "pod"],
                registry=self.registry,
            )
            self._pod_up_gauge = gauge
        return gauge
