"""The pod set: runtime pods by stable name, their pooled channels, health and drain state.

A pod is identified by its name (a StatefulSet pod name), never by its address. Each pod owns
a pool of gRPC channels that grows with its load (the runtime allows 128 concurrent streams and
64 requests in flight per connection: a new connection is added when every channel is near
either limit, up to `max_channels`, and the newest added one is closed again after
`idle_close_s` without calls), a health channel of its own (health checks never queue
behind client calls), a list channel with a large receive limit (the runtime's unpaged
ListSessions reply), and one health loop that checks `grpc.health.v1` and wakes early when a
forward or probe fails.

Invariants:
- Health is `router.core.health.PodHealth`, the state machine MACP and ACP pods share.
  `healthy` is False from the first failed forward/probe/check until a health check answers
  SERVING; a pod is offered for placement only when healthy, not draining, its feed up and
  its registry replayed (`placeable`, `not_placeable_reason`). A pod that did not
  answer at all within a deadline (`report_silent`: it accepts calls, never answers) stays
  unhealthy until it answers a call again (`answer_check`), not merely its health service.
- Channel reconnect backoff is capped at about 1 s, so a restarted pod is reachable within
  seconds and its health flips back within one check interval.
- A pod's health loop runs as the supervisor's service `health:<pod>` (`router.supervisor`):
  a crash is logged, counted and the loop restarted; `aclose()` stops it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.core.health import PodHealth
from router.credentials import FIX_HINT
from router.supervisor import Supervisor
from router.validate import parse_named_targets

log = logging.getLogger("macp_router.pods")

GET_MANIFEST_PATH = "/macp.v1.MACPRuntimeService/GetManifest"


class _RosterPod(Protocol):
    name: str
    healthy: bool

    @property
    def placeable(self) -> bool: ...


P = TypeVar("P", bound=_RosterPod)

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Keepalive pings only while calls are open (a watch feed always is), at a pace gRPC
    # servers accept: faster idle pings earn a GOAWAY "too_many_pings". Dead pods are found
    # sooner by the health loop; this catches a silently dropped connection under a feed.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # One TCP connection per channel: pooled channels must not share a subchannel.
    ("grpc.use_local_subchannel_pool", 1),
]


UNARY_SOFT_LIMIT = 48
"""Unary calls in flight on one pooled channel before the pool prefers (or adds) another: the
runtime serves 64 requests per connection at a time and queues the rest."""
STREAM_SOFT_LIMIT = 100
"""Open streams on one pooled channel before the pool prefers (or adds) another: the runtime
allows 128 concurrent streams per connection, and a stream beyond that waits for a free one."""
LIST_RECEIVE_BYTES = 256 * 1024 * 1024
"""Default receive limit of the list channel (--max-list-bytes): a v0.6.1 runtime answers
ListSessions with every in-memory session in one reply (~300 bytes each: ~850k sessions)."""


class _Counted:
    """A multicallable that counts its calls in flight on one channel of the pool."""

    __slots__ = ("_counts", "_index", "_multicallable")

    def __init__(self, multicallable: object, counts: list[int], index: int) -> None:
        self._multicallable = multicallable
        self._counts = counts
        self._index = index

    def __call__(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        call = self._multicallable(*args, **kwargs)  # type: ignore[operator]
        counts, index = self._counts, self._index
        counts[index] += 1

        def done(_call: object) -> None:
            counts[index] -= 1

        call.add_done_callback(done)
        return call


@dataclass(frozen=True, slots=True)
class PodSpec:
    name: str
    address: str


def _check_host_port(name: str, address: str) -> str | None:
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"pod {name!r}: address {address!r} is not HOST:PORT"
    return None


def parse_pod_list(text: str) -> list[PodSpec]:
    """Parse `NAME=HOST:PORT[,NAME=HOST:PORT...]`; raise ValueError naming the bad part."""
    return [PodSpec(name, address) for name, address in
            parse_named_targets(text, what="pod", form="NAME=HOST:PORT", check=_check_host_port)]


class Pod(PodHealth):
    """One runtime pod: channels, health (`PodHealth`), and per-method multicallables."""

    def __init__(
        self,
        spec: PodSpec,
        *,
        channels: int = 2,
        max_channels: int = 16,
        idle_close_s: float = 60.0,
        channel_options: Iterable[tuple[str, object]] = (),
        list_receive_bytes: int | None = None,
        health_interval_s: float = 1.0,
        health_timeout_s: float = 1.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        super().__init__()
        self.name = spec.name
        self.address = spec.address
        self.describe = f"pod {spec.name} ({spec.address})"
        self._credentials = credentials
        self._options: list[tuple[str, object]] = [*CHANNEL_OPTIONS, *channel_options]
        self.min_channels = max(1, channels)
        self.max_channels = max(channels, max_channels)
        self.idle_close_s = idle_close_s
        """An added connection idle this long is closed again (the pool shrinks to its start)."""
        self._idle_since: float | None = None
        self._channels: list[grpc.aio.Channel] = []
        self._unary: list[dict[str, _Counted]] = []
        self._in_flight: list[int] = []
        """Unary calls in flight per pooled channel."""
        self._streams: list[int] = []
        """Open streams per pooled channel."""
        self._cursor = 0
        for _ in range(max(1, channels)):
            self._add_channel()
        # Health checks get a channel of their own, so they never queue behind client calls
        # on a busy connection (the runtime's per-connection limits).
        self._health_channel = self._make_channel(self._options)
        self._health_stub = health_pb2_grpc.HealthStub(self._health_channel)
        # One pod-wide ListSessions reply can be huge (the runtime does not page): it gets a
        # channel whose receive limit is --max-list-bytes instead of the per-call limit.
        self.list_receive_bytes = list_receive_bytes or LIST_RECEIVE_BYTES
        self._list_channel = self._make_channel(
            [*(o for o in self._options if o[0] != "grpc.max_receive_message_length"),
             ("grpc.max_receive_message_length", self.list_receive_bytes)])
        self.feed_up = False
        self.registry_synced = False
        """The remembered registry calls were replayed to this incarnation of the pod."""
        self._health_interval_s = health_interval_s
        self._health_timeout_s = health_timeout_s
        self.health_fallback = False
        """True once the pod answered Health/Check UNIMPLEMENTED (a runtime built before
        grpc.health.v1): it is checked with GetManifest, which needs no token, instead."""
        self.answer_check: Callable[[Pod], Awaitable[bool]] | None = None
        """Does the pod answer a call (not only health checks)? Set by the protocol adapter."""

    def __repr__(self) -> str:
        return f"Pod({self.name}@{self.address}, healthy={self.healthy})"

    # -- calls -------------------------------------------------------------------------------
    def _make_channel(self, options: list[tuple[str, object]]) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.address, options=options)
        return grpc.aio.secure_channel(self.address, self._credentials, options=options)

    def _add_channel(self) -> int:
        self._channels.append(self._make_channel(self._options))
        self._unary.append({})
        self._in_flight.append(0)
        self._streams.append(0)
        if len(self._channels) > 1 and (any(self._in_flight) or any(self._streams)):
            log.info("pod %s: channel pool grown to %d connections (%d unary calls, %d streams "
                     "in flight)", self.name, len(self._channels), sum(self._in_flight),
                     sum(self._streams))
        return len(self._channels) - 1

    def _pick(self, unary: bool) -> int:
        """A channel with room (round robin from the last pick); a new channel when every one
        is full and the pool may grow; else the least loaded.

        Every call is an HTTP/2 stream, so a channel has room for a stream while its streams
        plus unary calls are under STREAM_SOFT_LIMIT, and for a unary call when, besides,
        its unary calls are under UNARY_SOFT_LIMIT.
        """
        in_flight, streams = self._in_flight, self._streams
        count = len(streams)
        start = self._cursor
        for step in range(count):
            index = (start + step) % count
            if (in_flight[index] + streams[index] < STREAM_SOFT_LIMIT
                    and (not unary or in_flight[index] < UNARY_SOFT_LIMIT)):
                self._cursor = index + 1
                return index
        if count < self.max_channels:
            return self._add_channel()
        return min(range(count), key=lambda i: in_flight[i] + streams[i])

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    def in_flight(self) -> tuple[int, int]:
        """(unary calls, streams) in flight on the pooled channels."""
        return sum(self._in_flight), sum(self._streams)

    def unary(self, path: str) -> grpc.aio.UnaryUnaryMultiCallable:
        """A raw-bytes unary multicallable on a pooled channel with room (cached per channel)."""
        index = self._pick(unary=True)
        cache = self._unary[index]
        multicallable = cache.get(path)
        if multicallable is None:
            multicallable = _Counted(self._channels[index].unary_unary(path), self._in_flight,
                                     index)
            cache[path] = multicallable
        return multicallable  # type: ignore[return-value]

    def _stream_channel(self) -> tuple[grpc.aio.Channel, int]:
        index = self._pick(unary=False)
        return self._channels[index], index

    def unary_stream(self, path: str) -> grpc.aio.UnaryStreamMultiCallable:
        channel, index = self._stream_channel()
        return _Counted(channel.unary_stream(path), self._streams, index)  # type: ignore[return-value]

    def stream_stream(self, path: str) -> grpc.aio.StreamStreamMultiCallable:
        channel, index = self._stream_channel()
        return _Counted(channel.stream_stream(path), self._streams, index)  # type: ignore[return-value]

    def stream_unary(self, path: str) -> grpc.aio.StreamUnaryMultiCallable:
        channel, index = self._stream_channel()
        return _Counted(channel.stream_unary(path), self._streams, index)  # type: ignore[return-value]

    def list_unary(self, path: str) -> grpc.aio.UnaryUnaryMultiCallable:
        """A unary multicallable on the list channel (receive limit `list_receive_bytes`)."""
        return self._list_channel.unary_unary(path)

    @property
    def placeable(self) -> bool:
        """Ready for new sessions: healthy, not draining, its feed up and reconciled, and the
        broadcast registry replayed to it. Its existing sessions route regardless."""
        return self.healthy and not self.draining and self.feed_up and self.registry_synced

    @property
    def not_placeable_reason(self) -> str:
        """Why the pod takes no new sessions ("" when it does)."""
        reason = super().not_placeable_reason
        if reason:
            return reason
        if not self.feed_up:
            if self.credentials_rejected:
                return f"rejects the router's credentials ({self.credentials_rejected})"
            return "watch feed not up and reconciled yet"
        if not self.registry_synced:
            return "registry replay pending"
        return ""

    # -- health (the state machine is `PodHealth`) ---------------------------------------------
    def _health_changed(self, healthy: bool) -> None:
        if not healthy:
            self.registry_synced = False  # a restart empties the runtime's registries

    def report_credentials_rejected(  # type: ignore[override]
        self, call: str, code: grpc.StatusCode, details: str
    ) -> None:
        """Set by the feed, the reconcile, probes and replays (UNAUTHENTICATED /
        PERMISSION_DENIED): see `PodHealth.report_credentials_rejected`."""
        super().report_credentials_rejected(call, code, details, FIX_HINT)

    async def _check_without_health_service(self) -> health_pb2.HealthCheckResponse:
        """An older runtime: any answer to GetManifest (no token needed) means serving."""
        await self._health_channel.unary_unary(GET_MANIFEST_PATH)(
            b"", timeout=self._health_timeout_s)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def check_health(self) -> bool:
        try:
            if self.health_fallback:
                reply = await self._check_without_health_service()
            else:
                try:
                    reply = await self._health_stub.Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=self._health_timeout_s
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    self.health_fallback = True
                    log.warning("pod %s has no grpc.health.v1 (Health/Check answered "
                                "UNIMPLEMENTED: a runtime built before it); checking it with "
                                "GetManifest instead", self.name)
                    reply = await self._check_without_health_service()
        except grpc.aio.AioRpcError as exc:
            self.check_failed(
                f"health check failed: {exc.code().name} {exc.details() or ''}".strip())
            return False
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            self.report_failure(f"health check answered {status_name}")
            return False
        if self.silent and self.answer_check is not None and not await self.answer_check(self):
            return False  # its health service answers, its calls still do not
        self.report_success()
        return True

    async def _shrink_idle(self) -> None:
        """Close the newest added connection once it has carried nothing for `idle_close_s`.

        Only the last channel is ever closed, so the indices of the others (and the counters
        of their calls in flight) never move; it is closed only while it has no call in flight.
        """
        last = len(self._channels) - 1
        if last < self.min_channels or self._in_flight[last] or self._streams[last]:
            self._idle_since = None
            return
        now = asyncio.get_running_loop().time()
        if self._idle_since is None:
            self._idle_since = now
            return
        if now - self._idle_since < self.idle_close_s:
            return
        channel = self._channels.pop()
        self._unary.pop()
        self._in_flight.pop()
        self._streams.pop()
        self._cursor = 0
        self._idle_since = None
        log.info("pod %s: channel pool shrunk to %d connections (one idle for %.0f s)",
                 self.name, len(self._channels), self.idle_close_s)
        await channel.close()

    async def _health_loop(self) -> None:
        while True:
            await self.check_health()
            self.checked()
            await self._shrink_idle()
            await self.pause(self._health_interval_s)

    # -- lifecycle ---------------------------------------------------------------------------
    async def aclose(self) -> None:
        await self.stop_health_loop()
        for channel in (*self._channels, self._health_channel, self._list_channel):
            await channel.close()


class NamedPods(Generic[P]):
    """Pods by name and the views every front door needs (the locator's `PodRoster`).

    A pod is anything with `name`, `healthy` and `placeable`; subclasses fill `_pods`.
    """

    def __init__(self) -> None:
        self._pods: dict[str, P] = {}
        self._round_robin = itertools.count()

    def __len__(self) -> int:
        return len(self._pods)

    def __iter__(self) -> Iterator[P]:
        return iter(list(self._pods.values()))

    def get(self, name: str) -> P | None:
        return self._pods.get(name)

    def names(self) -> list[str]:
        return list(self._pods)

    def is_healthy(self, name: str) -> bool:
        pod = self._pods.get(name)
        return pod is not None and pod.healthy

    def healthy(self) -> list[P]:
        return [pod for pod in self._pods.values() if pod.healthy]

    def placeable_names(self) -> list[str]:
        return [pod.name for pod in self._pods.values() if pod.placeable]

    def any_healthy(self) -> P | None:
        """One healthy pod, round robin; None when none is healthy."""
        healthy = self.healthy()
        if not healthy:
            return None
        return healthy[next(self._round_robin) % len(healthy)]


class PodSet(NamedPods[Pod]):
    """The MACP pods: gRPC channels, health loops, joins and leaves."""

    def __init__(self, *, supervisor: Supervisor | None = None, **pod_options: object) -> None:
        super().__init__()
        self.supervisor = supervisor
        """Runs every pod's health loop (`health:<pod>`); each pod gets a private one if None."""
        self._pod_options = pod_options
        self.on_join: list[Callable[[Pod], None]] = []
        self.on_leave: list[Callable[[Pod], None]] = []
        self.on_health_change: list[Callable[[Pod], None]] = []

    def report_silent(self, name: str, reason: str) -> None:
        pod = self._pods.get(name)
        if pod is not None:
            pod.report_silent(reason)

    def add(self, spec: PodSpec) -> Pod:
        if spec.name in self._pods:
            raise ValueError(f"pod {spec.name!r} already exists")
        pod = Pod(spec, **self._pod_options)  # type: ignore[arg-type]
        pod.on_health_change = self._health_changed
        self._pods[spec.name] = pod
        pod.start(self.supervisor)
        for callback in self.on_join:
            callback(pod)
        return pod

    async def remove(self, name: str) -> None:
        pod = self._pods.pop(name, None)
        if pod is None:
            return
        for callback in self.on_leave:
            callback(pod)
        await pod.aclose()

    def _health_changed(self, pod: Pod) -> None:
        for callback in self.on_health_change:
            callback(pod)

    async def aclose(self) -> None:
        for name in list(self._pods):
            await self.remove(name)
