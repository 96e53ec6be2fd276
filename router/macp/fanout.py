"""Fan-out MACP calls: every pod's answer merged into one (ListSessions, WatchSessions,
WatchSignals), with the caller's own credentials.

Invariants:
- A list is never partial: a pod that does not answer fails the call naming it (a partial
  list would hide its sessions); a pod that refuses the caller's credentials fails it with
  that pod's own status.
- Pages are the router's own, whatever the pods' own paging: a listing fans out once (its
  first page) and every later page is a slice of that listing's snapshot
  (`router.macp.listing`: bounded, expiring, bound to the caller's credentials); a token
  this process did not issue, or whose listing it no longer holds, is INVALID_ARGUMENT.
- A merged stream adds pods that become healthy while it is open, and ends (with that pod's
  status) when one pod's stream fails, so the client resubscribes instead of missing events.
- A merged stream's headers go out once every pod has answered its own (the runtime sends
  them once subscribed: from then on no event is missed), or with the first event or end.
- A frame that does not parse never opens N streams (INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError
from macp.v1 import core_pb2

from router import tracing
from router.core.call import Call
from router.core.errors import Abort
from router.macp.backend import forwardable, no_pod_message, upstream_abort
from router.macp.listing import Listings, caller_digest, encode_page, frame_session
from router.pods import Pod, PodSet
from router.scope import DiscoveryScope
from router.watch import is_too_large, too_large
from router.wire import WireError

log = logging.getLogger("macp_router.proxy")

LIST_PAGE_DEFAULT = 1000


class FanOutCalls:
    """ListSessions (paged, merged) and the merged watch streams."""

    def __init__(self, pods: PodSet, scope: DiscoveryScope | None,
                 listings: Listings | None = None) -> None:
        self.pods = pods
        self.scope = scope
        self.listings = listings if listings is not None else Listings()

    async def list_sessions(self, call: Call, request: bytes) -> bytes:
        """One page of the merged list: the first page fans out to every pod and keeps the
        sorted result as the listing's snapshot; a page token reads that snapshot."""
        try:
            query = core_pb2.ListSessionsRequest.FromString(request)
        except Exception as exc:  # protobuf's DecodeError
            raise WireError(str(exc)) from None
        context: grpc.aio.ServicerContext = call.context
        caller = caller_digest(context.invocation_metadata())
        size = query.page_size if query.page_size > 0 else LIST_PAGE_DEFAULT
        if query.page_token:
            listing, offset = self.listings.parse(query.page_token)
            entries = self.listings.get(listing, caller).entries
        else:
            entries = await self._fan_out(call)
            if len(entries) <= size:
                return encode_page(entries, "")  # one page: nothing to keep
            listing, offset = self.listings.add(caller, entries), 0
        end = offset + size
        next_token = self.listings.token(listing, end) if end < len(entries) else ""
        return encode_page(entries[offset:end], next_token)

    async def _fan_out(self, call: Call) -> tuple[bytes, ...]:
        """Every pod's sessions, merged, filtered for the caller and sorted by (started_at,
        session_id), each framed for a ListSessionsResponse."""
        pods = list(self.pods)
        if not pods:
            raise Abort(grpc.StatusCode.UNAVAILABLE, no_pod_message(self.pods, call.method))
        context: grpc.aio.ServicerContext = call.context
        metadata = forwardable(context.invocation_metadata())
        timeout = context.time_remaining()
        results = await asyncio.gather(
            *(_collect(pod, call.route.path, metadata, timeout) for pod in pods),
            return_exceptions=True)
        merged = _merge(pods, results)
        if self.scope is not None:
            visible = self.scope.visible_to(context.invocation_metadata())
            if visible is not None:
                merged = {sid: s for sid, s in merged.items() if visible(s)}
        ordered = sorted(merged.values(), key=lambda s: (s.started_at_unix_ms, s.session_id))
        return tuple(frame_session(session.SerializeToString()) for session in ordered)

    async def merged(self, call: Call, request: bytes) -> None:
        """WatchSessions / WatchSignals: every pod's stream, with the caller's credentials."""
        route = call.route
        try:
            route.request_class.FromString(request)  # never open N streams for garbage
        except Exception as exc:  # protobuf's DecodeError
            raise WireError(str(exc)) from None
        pods = self.pods.healthy()
        if not pods:
            raise Abort(grpc.StatusCode.UNAVAILABLE, no_pod_message(self.pods, route.method))
        context: grpc.aio.ServicerContext = call.context
        visible = None
        if self.scope is not None and route.method == "WatchSessions":
            visible = self.scope.visible_to(context.invocation_metadata())
        merge = _Merge(route.path, request, forwardable(context.invocation_metadata()),
                       context.time_remaining())
        for pod in pods:
            merge.add(pod)

        def joined(pod: Pod) -> None:
            if pod.healthy:
                merge.add(pod)

        self.pods.on_health_change.append(joined)
        try:
            await merge.relay(context, visible)
        finally:
            self.pods.on_health_change.remove(joined)
            await merge.close()


async def _collect(
    pod: Pod, path: str, metadata: tuple, timeout: float | None
) -> list[core_pb2.SessionMetadata]:
    """Every session one pod lists, page by page."""
    sessions: list[core_pb2.SessionMetadata] = []
    token = ""
    multicallable = pod.list_unary(path)  # one unpaged reply can be huge
    while True:
        page_request = core_pb2.ListSessionsRequest(page_size=LIST_PAGE_DEFAULT,
                                                     page_token=token)
        try:
            raw = await multicallable(page_request.SerializeToString(),
                                      metadata=metadata, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if is_too_large(exc):
                log.error("ListSessions: %s", too_large(pod, exc))
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"ListSessions: {too_large(pod, exc)}") from None
            raise
        try:
            page = core_pb2.ListSessionsResponse.FromString(raw)
        except DecodeError:
            raise Abort(grpc.StatusCode.INTERNAL,
                        f"ListSessions: pod {pod.name} ({pod.address}) answered bytes "
                        "that are not a ListSessionsResponse: is it a MACP runtime of "
                        "a supported version? (check that pod)") from None
        sessions.extend(page.sessions)
        token = page.next_page_token
        if not token:
            return sessions


def _merge(pods: list[Pod], results: list[object]) -> dict[str, core_pb2.SessionMetadata]:
    """One pod's sessions per result, merged by sid; any failure fails the whole list."""
    merged: dict[str, core_pb2.SessionMetadata] = {}
    failed: list[str] = []
    for pod, result in zip(pods, results, strict=True):
        if isinstance(result, Abort):
            raise result
        if isinstance(result, grpc.aio.AioRpcError):
            if result.code() in (grpc.StatusCode.PERMISSION_DENIED,
                                 grpc.StatusCode.UNAUTHENTICATED):
                raise Abort(result.code(), result.details() or "",
                            forwardable(result.trailing_metadata()))
            failed.append(f"{pod.name} ({result.code().name})")
            continue
        if isinstance(result, BaseException):
            failed.append(f"{pod.name} ({result!r})")
            continue
        for session in result:  # type: ignore[attr-defined]
            merged.setdefault(session.session_id, session)
    if failed:
        raise Abort(
            grpc.StatusCode.UNAVAILABLE,
            f"ListSessions: pods {', '.join(failed)} did not answer; a partial list would "
            "hide their sessions (retry)",
        )
    return merged


class _Merge:
    """The pods' streams of one merged watch, pumped into one queue."""

    def __init__(self, path: str, request: bytes, metadata: tuple, timeout: float | None) -> None:
        self.path = path
        self.request = request
        self.metadata = metadata
        self.timeout = timeout
        self.queue: asyncio.Queue[tuple[Pod, bytes | None, grpc.aio.AioRpcError | None]] = (
            asyncio.Queue(maxsize=1024))
        self.calls: list[grpc.aio.UnaryStreamCall] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.pumped: set[str] = set()
        self.unanswered = 0
        """Pods added before the client got its headers that have not answered theirs."""
        self.subscribed = asyncio.Event()
        """Every such pod answered (or one sent something): the client may get its headers."""

    def add(self, pod: Pod) -> None:
        if pod.name not in self.pumped:
            self.pumped.add(pod.name)
            if not self.subscribed.is_set():
                self.unanswered += 1
            self.tasks.append(asyncio.create_task(self._pump(pod), name=f"merge:{pod.name}"))

    def _answered(self) -> None:
        self.unanswered -= 1
        if self.unanswered <= 0:
            self.subscribed.set()

    async def _pump(self, pod: Pod) -> None:
        upstream = pod.unary_stream(self.path)(
            self.request, metadata=tracing.stream_metadata(pod.name, pod.address, self.path,
                                                           self.metadata), timeout=self.timeout)
        self.calls.append(upstream)
        counted = not self.subscribed.is_set()  # as in add(): the client waits for this pod
        try:
            await upstream.initial_metadata()  # the pod has subscribed (or the call ended)
            if counted:
                self._answered()
            async for message in upstream:
                await self._put(pod, message, None)
        except grpc.aio.AioRpcError as exc:
            await self._put(pod, None, exc)
            return
        await self._put(pod, None, None)

    async def _put(self, pod: Pod, message: bytes | None,
                   error: grpc.aio.AioRpcError | None) -> None:
        await self.queue.put((pod, message, error))
        self.subscribed.set()  # something to relay: the client's headers go out now at the latest

    async def relay(
        self, context: grpc.aio.ServicerContext,
        visible: Callable[[core_pb2.SessionMetadata], bool] | None,
    ) -> None:
        # Headers once every pod has subscribed, as the runtime sends them once it has: a
        # client may read them as "no event from now on is missed".
        await self.subscribed.wait()
        await context.send_initial_metadata(())
        while True:
            pod, message, error = await self.queue.get()
            if message is not None:
                if visible is not None and not visible(
                    core_pb2.WatchSessionsResponse.FromString(message).event.session
                ):
                    continue
                await context.write(message)
                continue
            if error is not None:
                if error.code() is grpc.StatusCode.CANCELLED:
                    return
                raise upstream_abort(pod, error)
            return  # one pod ended its stream (OK): end ours, the client resubscribes

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for upstream in self.calls:
            upstream.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

