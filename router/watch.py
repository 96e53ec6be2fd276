"""Per-pod WatchSessions feeds: how the router learns where sessions live without probing.

One `WatchFeed` per pod holds a long-lived `WatchSessions` stream opened with the router's own
credentials. The first events are the pod's snapshot (a CREATED per open session), then live
changes; each is applied to the locator (near-cache, then the store, write-behind).

Invariants:
- The feed is up only once the pod has sent the stream's response headers (the runtime sends
  them after it has subscribed the stream to its lifecycle bus), then listed: `feed_up` never
  claims a subscription the pod has not made yet.
- After every (re)subscribe the feed reconciles with a full `ListSessions`: entries for the pod
  that the pod neither lists nor reported on the new stream are dropped, and listed states win
  over cached ones (a session resolved while the feed was down is not left open).
  The watch stream alone is never trusted to be complete.
- Reconnects use exponential backoff with jitter, capped (default 2 s), reset after a healthy
  connection; a pod that restarts replays its sessions as CREATED and is re-learned.
- Every (re)connect calls `on_connect(pod)` (broadcast replay) before the feed is marked up.
- The feed runs as the router supervisor's service `watch:<pod>` (`start()` spawns it,
  `aclose()` stops it). Failures a pod can cause (a dropped stream, an RPC error, bytes that do
  not parse, a listing too large) are the feed's own: logged in one line, reconnected with the
  feed's backoff. Any other exception is a crash: the supervisor logs it with its traceback,
  counts it and restarts the feed. Whichever way the feed stops, `pod.feed_up` and
  `macp_router_watch_up` go to 0 before anything else runs: a feed that is not following its
  pod is never reported up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc
from google.protobuf.message import DecodeError
from macp.v1 import core_pb2, envelope_pb2

from router import store
from router.aio import wait_event
from router.locator import Locator
from router.metrics import Metrics
from router.pods import Pod
from router.supervisor import Backoff, Supervisor

log = logging.getLogger("macp_router.watch")

WATCH_PATH = "/macp.v1.MACPRuntimeService/WatchSessions"
LIST_PATH = "/macp.v1.MACPRuntimeService/ListSessions"

_EventType = core_pb2.SessionLifecycleEvent.EventType
EVENT_NAMES = {value: name.removeprefix("EVENT_TYPE_").lower()
               for name, value in _EventType.items()}
EVENT_STATES = {
    _EventType.EVENT_TYPE_CREATED: store.OPEN,
    _EventType.EVENT_TYPE_RESUMED: store.OPEN,
    _EventType.EVENT_TYPE_SUSPENDED: store.SUSPENDED,
    _EventType.EVENT_TYPE_RESOLVED: store.RESOLVED,
    _EventType.EVENT_TYPE_EXPIRED: store.EXPIRED,
    _EventType.EVENT_TYPE_CANCELLED: store.CANCELLED,
}
SESSION_STATES = {
    envelope_pb2.SESSION_STATE_OPEN: store.OPEN,
    envelope_pb2.SESSION_STATE_SUSPENDED: store.SUSPENDED,
    envelope_pb2.SESSION_STATE_RESOLVED: store.RESOLVED,
    envelope_pb2.SESSION_STATE_EXPIRED: store.EXPIRED,
    envelope_pb2.SESSION_STATE_CANCELLED: store.CANCELLED,
}


def session_state(metadata: core_pb2.SessionMetadata, fallback: str = store.OPEN) -> str:
    return SESSION_STATES.get(metadata.state, fallback)


class FeedError(ValueError):
    """A pod answered the feed or its reconcile with something no runtime sends (bytes that do
    not parse, a listing whose paging never ends): the feed reconnects."""


class ListTooLarge(RuntimeError):
    """A pod's ListSessions reply is over the list channel's receive limit (--max-list-bytes)."""


def is_too_large(exc: grpc.aio.AioRpcError) -> bool:
    return (exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            and "larger than max" in (exc.details() or "").lower())


def too_large(pod: Pod, exc: grpc.aio.AioRpcError) -> ListTooLarge:
    return ListTooLarge(
        f"pod {pod.name}: its ListSessions reply is larger than --max-list-bytes "
        f"({pod.list_receive_bytes} bytes; {exc.details()}). The runtime returns every "
        "in-memory session in one reply (about 300 bytes each, terminal ones within "
        "MACP_SESSION_RETENTION_SECS too): raise --max-list-bytes "
        "(MACP_ROUTER_MAX_LIST_BYTES), or shorten the pod's retention"
    )


async def list_all_sessions(
    pod: Pod,
    metadata: Sequence[tuple[str, str]],
    timeout_s: float,
    page_size: int = 1000,
) -> list[core_pb2.SessionMetadata]:
    """Every session a pod lists, following its page tokens if it pages (v0.6.1 does not: one
    reply with everything, received on the pod's list channel). ListTooLarge when the reply
    is over that channel's limit."""
    sessions: list[core_pb2.SessionMetadata] = []
    token = ""
    call = pod.list_unary(LIST_PATH)
    for _ in range(100_000):
        request = core_pb2.ListSessionsRequest(page_size=page_size, page_token=token)
        try:
            raw = await call(request.SerializeToString(), metadata=metadata, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if is_too_large(exc):
                raise too_large(pod, exc) from None
            raise
        try:
            page = core_pb2.ListSessionsResponse.FromString(raw)
        except DecodeError as exc:
            raise FeedError(
                f"pod {pod.name} answered ListSessions with bytes that are not a "
                f"ListSessionsResponse ({exc}): is it a MACP runtime of a supported version?"
            ) from None
        sessions.extend(page.sessions)
        token = page.next_page_token
        if not token:
            return sessions
    raise FeedError(f"pod {pod.name}: ListSessions paging did not end after 100000 pages")


class WatchFeed:
    def __init__(
        self,
        pod: Pod,
        locator: Locator,
        metrics: Metrics,
        *,
        supervisor: Supervisor,
        metadata: Sequence[tuple[str, str]] = (),
        list_timeout_s: float = 30.0,
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 2.0,
        on_connect: Callable[[Pod], Awaitable[None]] | None = None,
    ) -> None:
        self.pod = pod
        self.locator = locator
        self.metrics = metrics
        self.metadata = metadata  # a live view: a re-read token applies at once
        self.list_timeout_s = list_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.on_connect = on_connect
        self.applied_events = 0
        self.reconciles = 0
        self.reconnects = 0
        self.last_error = ""
        self._changed = asyncio.Event()
        self._supervisor = supervisor
        self.service = f"watch:{pod.name}"
        """The feed's name in the supervisor (its kind, `watch`, labels the crash counter)."""
        self._seen_on_connection: set[str] = set()
        self._reconciling = False

    @property
    def up(self) -> bool:
        return self.pod.feed_up

    def start(self) -> None:
        if not self._supervisor.running(self.service):
            self._supervisor.spawn(self.service, self._run, backoff=self._backoff())

    def _backoff(self) -> Backoff:
        """Reconnects and crash restarts alike: base doubling to the cap, with jitter."""
        return Backoff(self.backoff_base_s, self.backoff_max_s)

    def cancel(self) -> asyncio.Task[None] | None:
        """Stop following now, without waiting (a pod leaving); the task, to wait for it."""
        task = self._supervisor.cancel(self.service)
        self._set_up(False)
        return task

    async def aclose(self) -> None:
        await self._supervisor.stop(self.service)
        self._set_up(False)

    async def wait_for(self, predicate: Callable[[WatchFeed], bool], timeout: float) -> bool:
        """Wait until `predicate(feed)` holds (tests wait for states, never sleep)."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            await wait_event(self._changed, remaining)
        return True

    def _notify(self) -> None:
        self._changed.set()

    def _set_up(self, up: bool) -> None:
        if self.pod.feed_up != up:
            self.pod.feed_up = up
            self.metrics.watch_up.labels(self.metrics.pod_label(self.pod.name)).set(int(up))

    async def _run(self) -> None:
        """The service body: follow the pod, reconnecting after the failures a pod can cause.

        Leaves only by cancellation or an unexpected exception (a crash, for the supervisor);
        either way the feed is down before the exception goes on.
        """
        try:
            await self._follow_forever()
        except BaseException as exc:
            self._set_up(False)
            if not isinstance(exc, asyncio.CancelledError):
                self.last_error = f"feed crashed: {type(exc).__name__}: {exc}"
                self.reconnects += 1
                self.metrics.watch_reconnects.labels(self.metrics.pod_label(self.pod.name)).inc()
            self._notify()
            raise

    async def _follow_forever(self) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await self._follow()
                outcome = "stream ended"
            except grpc.aio.AioRpcError as exc:
                outcome = f"{exc.code().name}: {exc.details() or ''}".strip()
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.pod.report_failure(f"watch feed: {outcome}")
                elif exc.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                    grpc.StatusCode.PERMISSION_DENIED):
                    # The router's own token: a configuration error, logged once by the pod.
                    self.pod.report_credentials_rejected("WatchSessions/ListSessions",
                                                         exc.code(), exc.details() or "")
            except ListTooLarge as exc:
                outcome = str(exc)
                if outcome != self.last_error:
                    log.error("watch feed of pod %s cannot reconcile: %s", self.pod.name, exc)
            except FeedError as exc:  # unparsable event or listing
                outcome = f"feed error: {exc}"
            self._set_up(False)
            self.last_error = outcome
            self.reconnects += 1
            self.metrics.watch_reconnects.labels(self.metrics.pod_label(self.pod.name)).inc()
            self._notify()
            failures = 0 if time.monotonic() - started > 10 else failures + 1
            delay = self._backoff().delay(failures)
            log.log(logging.WARNING if outcome.startswith("feed error") else logging.INFO,
                    "watch feed of pod %s down (%s); reconnecting in %.2fs",
                    self.pod.name, outcome, delay)
            if not self.pod.healthy:
                await self.pod.wait_healthy(delay + self.backoff_max_s)
            await asyncio.sleep(delay)

    async def _follow(self) -> None:
        """One subscription: apply events while the reconcile runs beside them.

        Whichever fails first ends the subscription (a failed ListSessions must not leave an
        idle pod's feed half-up until its next event).
        """
        self._seen_on_connection = set()
        call = self.pod.unary_stream(WATCH_PATH)(b"", metadata=self.metadata)
        reader = asyncio.create_task(self._read(call), name=f"watch-read:{self.pod.name}")
        reconcile = asyncio.create_task(self._reconcile(call),
                                        name=f"reconcile:{self.pod.name}")
        try:
            done, _ = await asyncio.wait({reader, reconcile},
                                         return_when=asyncio.FIRST_EXCEPTION)
            if reconcile in done and reconcile.exception() is not None:
                raise reconcile.exception()  # type: ignore[misc]
            await reader  # the stream ends (or fails) on its own
        finally:
            for task in (reader, reconcile):
                if not task.done():
                    task.cancel()
            await asyncio.gather(reader, reconcile, return_exceptions=True)
            call.cancel()

    async def _read(self, call: grpc.aio.UnaryStreamCall) -> None:
        async for raw in call:
            try:
                event = core_pb2.WatchSessionsResponse.FromString(raw).event
            except DecodeError as exc:
                raise FeedError(
                    f"pod {self.pod.name} sent WatchSessions bytes that are not a "
                    f"WatchSessionsResponse ({exc}): is it a MACP runtime of a supported "
                    "version? The feed reconnects; until it reconciles the pod takes no new "
                    "sessions") from None
            self._apply(event)

    def _apply(self, event: core_pb2.SessionLifecycleEvent) -> None:
        sid = event.session.session_id
        if not sid:
            return
        state = EVENT_STATES.get(event.event_type)
        if state is None:
            state = session_state(event.session)
        elif event.session.state:
            state = session_state(event.session, state)
        if self._reconciling:
            self._seen_on_connection.add(sid)
        self.locator.observe(self.pod.name, sid, state)
        self.applied_events += 1
        self.metrics.record_watch_event(self.pod.name, EVENT_NAMES.get(event.event_type, ""))
        self._changed.set()

    async def _reconcile(self, call: grpc.aio.UnaryStreamCall) -> None:
        since = time.monotonic()
        self._reconciling = True
        try:
            await self._subscribed(call)
            await self._reconcile_listing(since)
        finally:
            self._reconciling = False
            self._seen_on_connection = set()  # only the reconcile needs it: free 1 sid/session
        self.pod.report_credentials_accepted()  # watched and listed with the router's token
        if self.on_connect is not None:
            await self.on_connect(self.pod)
        self.pod.report_success()
        self._set_up(True)
        self.reconciles += 1
        self._notify()

    async def _subscribed(self, call: grpc.aio.UnaryStreamCall) -> None:
        """Return once the pod answered the WatchSessions call with headers (or ended it: the
        reader reports that); a pod that accepts the call but never answers is a feed error."""
        try:
            await asyncio.wait_for(call.initial_metadata(), self.list_timeout_s)
        except TimeoutError:
            raise FeedError(
                f"pod {self.pod.name} accepted WatchSessions but sent no response headers "
                f"within {self.list_timeout_s:g}s: is it overloaded or hung? The feed "
                "reconnects; until it reconciles the pod takes no new sessions") from None

    async def _reconcile_listing(self, since: float) -> None:
        listed = await list_all_sessions(self.pod, self.metadata, self.list_timeout_s)
        present = set()
        for metadata in listed:
            sid = metadata.session_id
            present.add(sid)
            if sid in self._seen_on_connection:
                continue  # the stream already told us something fresher
            state = session_state(metadata)
            if self.locator.near.entry(sid) != (self.pod.name, state):
                self.locator.observe(self.pod.name, sid, state)
        count = len(listed)
        del listed  # the parsed reply (the largest object of a reconcile) goes now
        present |= self._seen_on_connection
        await self.locator.reconcile(self.pod.name, present, since)
        log.info("watch feed of pod %s up: %d sessions listed", self.pod.name, count)
