"""The MACP front door: a raw-bytes grpc.aio proxy for `macp.v1.MACPRuntimeService`.

Every method of the route table gets a handler that takes and returns bytes: the router reads
only the fields it routes on (`router.wire`) and forwards the client's bytes, metadata and
deadline unchanged; the pod's status, details and trailing metadata come back unchanged.

The cache-hit path of a session call reads top to bottom in `_session_unary`: extract the sid,
look it up in the near-cache, forward the bytes. Slow paths (locate, place, stale retry,
fan-out, broadcast) live in named methods beside it.

Invariants:
- Client calls carry the client's own credentials upstream; the router's token is used only for
  its own feeds and probes (watch.py, `probe`).
- A frame the router routes on (session, start, fan-out, broadcast) that does not parse is
  answered INVALID_ARGUMENT and never forwarded; `any`-class requests go to one pod unread and
  get that pod's own answer.
- A session is forwarded only to the pod that holds it; if no pod answers for it, the caller
  gets UNAVAILABLE naming the silent pods, never a guess.
- A reservation is released only when its pod provably did not accept the start.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from macp.v1 import core_pb2, policy_pb2

from router import routes, tracing
from router.credentials import FIX_HINT
from router.locator import LIVE, NOT_FOUND, Locator, NoPlaceablePod
from router.metrics import Metrics
from router.pods import Pod, PodSet
from router.routes import Route, RouteClass, Shape
from router.scope import DiscoveryScope
from router.store import BroadcastRecord, LocationStore, StoreUnavailable
from router.watch import is_too_large, too_large
from router.wire import WireError

log = logging.getLogger("macp_router.proxy")

_DROPPED_HEADERS = frozenset({"user-agent", "content-type", "te", "host", "connection"})
_NOT_FOUND_MARK = b"SESSION_NOT_FOUND"
_CONNECT_FAILURE_MARKS = ("failed to connect", "connection refused", "connect failed",
                          "dns resolution failed", "name resolution")
LIST_PAGE_DEFAULT = 1000
GET_SESSION_PATH = f"/{routes.SERVICE}/GetSession"
ANSWER_CHECK_SID = "macp-router-answer-check"  # no pod holds it: any answer is NOT_FOUND
CANCEL_AFTER_EOF_GRACE_S = 0.05
SHUTDOWN_DETAILS = "macp-router is shutting down: reconnect (another replica serves) (retry)"


def forwardable(metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple:
    """Client metadata minus transport headers (`:authority`, `grpc-*`, user-agent, ...)."""
    if not metadata:
        return ()
    return tuple(
        (key, value)
        for key, value in metadata
        if key[0] != ":" and not key.startswith("grpc-") and key not in _DROPPED_HEADERS
    )


class Abort(Exception):
    """Answer the caller with this status (raised inside handlers, turned into an abort)."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: tuple = ()
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing = trailing


def _is_connect_failure(exc: grpc.aio.AioRpcError) -> bool:
    if exc.code() is not grpc.StatusCode.UNAVAILABLE:
        return False
    details = (exc.details() or "").lower()
    return any(mark in details for mark in _CONNECT_FAILURE_MARKS)


def _upstream_abort(pod: Pod, exc: grpc.aio.AioRpcError) -> Abort:
    """The pod's own status, unchanged; transport failures name the pod and say retry."""
    code = exc.code()
    trailing = forwardable(exc.trailing_metadata())
    if code is grpc.StatusCode.UNAVAILABLE:
        pod.report_failure(f"{exc.details() or 'unavailable'}")
        return Abort(
            code,
            f"pod {pod.name} ({pod.address}) unavailable: {exc.details() or 'no details'} (retry)",
            trailing,
        )
    return Abort(code, exc.details() or "", trailing)


async def _unary_call(
    pod: Pod, path: str, request: bytes, metadata: Sequence[tuple[str, str | bytes]],
    timeout: float | None, span: str = "forward",
) -> tuple[grpc.aio.UnaryUnaryCall, bytes]:
    """One unary call to `pod`; a connect failure is tried once more on the next channel.

    After a pod restarts, one pooled channel can still sit in reconnect backoff (failing fast
    with "connection refused") while another is connected again. A connect failure means the
    request was never sent, so trying the next channel is safe.
    """
    if tracing.enabled:
        with tracing.forward_span(pod.name, pod.address, path, metadata, span) as metadata:
            return await _unary_call_retrying(pod, path, request, metadata, timeout)
    return await _unary_call_retrying(pod, path, request, metadata, timeout)


async def _unary_call_retrying(
    pod: Pod, path: str, request: bytes, metadata: Sequence[tuple[str, str | bytes]],
    timeout: float | None,
) -> tuple[grpc.aio.UnaryUnaryCall, bytes]:
    call = pod.unary(path)(request, metadata=metadata, timeout=timeout)
    try:
        return call, await call
    except grpc.aio.AioRpcError as exc:
        if not _is_connect_failure(exc):
            raise
    call = pod.unary(path)(request, metadata=metadata, timeout=timeout)
    return call, await call


ACK_WITHOUT_OK = "ACK_WITHOUT_OK"
"""What `_ack_error_code` calls an Ack that neither says ok nor names an error."""


def _ack_error_code(response: bytes) -> str:
    """The Ack error code of a SendResponse: "" when ok, ACK_WITHOUT_OK when the Ack is
    missing or has neither `ok` nor an error code (never read as success)."""
    ack = core_pb2.SendResponse.FromString(response).ack
    if ack.ok:
        return ""
    return ack.error.code or ACK_WITHOUT_OK


def _send_error_code(pod: Pod, response: bytes, sid: str) -> str:
    """`_ack_error_code`, with a pod's unparsable answer turned into an error naming it."""
    try:
        return _ack_error_code(response)
    except DecodeError:
        log.warning("pod %s (%s) answered Send for session %s with bytes that are not a "
                    "SendResponse", pod.name, pod.address, sid)
        raise Abort(grpc.StatusCode.INTERNAL,
                    f"pod {pod.name} ({pod.address}) answered Send with bytes that are not a "
                    "SendResponse: is it a MACP runtime of a supported version? (check that "
                    "pod; whether it applied the message is unknown)") from None


class MacpProxy:
    def __init__(
        self,
        *,
        pods: PodSet,
        locator: Locator,
        store: LocationStore,
        metrics: Metrics,
        router_metadata: Sequence[tuple[str, str]] = (),
        broadcast_timeout_s: float = 5.0,
        scope: DiscoveryScope | None = None,
    ) -> None:
        self.scope = scope
        self.pods = pods
        self.locator = locator
        self.store = store
        self.metrics = metrics
        self.router_metadata = router_metadata  # a live view: a re-read token applies at once
        self.broadcast_timeout_s = broadcast_timeout_s
        self.routes = routes.build_routes()
        metrics.add_methods(route.method for route in self.routes.values())
        self._handlers = {path: tracing.traced_handler(route.method, self._make_handler(route))
                          for path, route in self.routes.items()}
        self._active_streams: set[asyncio.Task[object]] = set()
        self._cache_hits = metrics.locate.labels("macp", "hit")
        self._closing = False
        self._replay_locks: dict[str, asyncio.Lock] = {}
        self._deferred_replays: set[str] = set()
        self.first_answer_warn_s = FIRST_ANSWER_WARN_S
        """A stream whose first envelope frame gets no answer this long is logged (pod named)."""

    # -- grpc plumbing -----------------------------------------------------------------------
    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers = self._handlers

        class _Handler(grpc.GenericRpcHandler):
            def service(self, handler_call_details):  # type: ignore[no-untyped-def]
                return handlers.get(handler_call_details.method)

        return _Handler()

    def unimplemented_handler(self) -> grpc.GenericRpcHandler:
        """Last-resort handler: UNIMPLEMENTED naming the method (registered after all others).

        grpc.aio gives the method name only to `service()`, so a handler is built per call; it
        is stream-stream so it answers every call shape without reading a request.
        """

        def handler_for(method: str) -> grpc.RpcMethodHandler:
            async def unimplemented(requests: AsyncIterator[bytes],
                                    context: grpc.aio.ServicerContext) -> None:
                await context.abort(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"method {method} is not implemented by macp-router "
                    f"(it routes {routes.SERVICE} and router.v1.RouterAdmin)",
                )

            return grpc.stream_stream_rpc_method_handler(unimplemented)

        class _Fallback(grpc.GenericRpcHandler):
            def service(self, handler_call_details):  # type: ignore[no-untyped-def]
                method = handler_call_details.method
                if isinstance(method, bytes):
                    method = method.decode("utf-8", "replace")
                return handler_for(method)

        return _Fallback()

    def _make_handler(self, route: Route) -> grpc.RpcMethodHandler:
        if route.shape is Shape.UNARY:
            if route.method == "Send":
                behavior = self._wrap_unary(route, self._send)
            elif route.route_class is RouteClass.SESSION:
                behavior = self._wrap_unary(route, self._session_unary)
            elif route.method == "ListSessions":
                behavior = self._wrap_unary(route, self._list_sessions)
            elif route.route_class is RouteClass.BROADCAST:
                behavior = self._wrap_unary(route, self._broadcast)
            else:
                behavior = self._wrap_unary(route, self._any_unary)
            return grpc.unary_unary_rpc_method_handler(behavior)
        if route.shape is Shape.SERVER_STREAM:
            if route.route_class is RouteClass.FANOUT:
                return grpc.unary_stream_rpc_method_handler(self._wrap_stream(route, self._merged))
            if route.route_class is RouteClass.SESSION:
                return grpc.unary_stream_rpc_method_handler(
                    self._wrap_stream(route, self._session_server_stream)
                )
            return grpc.unary_stream_rpc_method_handler(self._wrap_stream(route, self._any_stream))
        if route.shape is Shape.BIDI:
            return grpc.stream_stream_rpc_method_handler(self._wrap_bidi(route))
        return grpc.stream_unary_rpc_method_handler(self._wrap_client_stream(route))

    def _wrap_unary(self, route: Route, inner):  # type: ignore[no-untyped-def]
        method = route.method
        record = self.metrics.record_request

        async def behavior(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            started = time.perf_counter()
            target: list[str] = []
            try:
                response = await inner(route, request, context, target)
            except Abort as abort:
                record("macp", method, route.route_class, target[-1] if target else None,
                       abort.code.name, time.perf_counter() - started)
                await context.abort(abort.code, abort.details, abort.trailing)
            except WireError as exc:
                record("macp", method, route.route_class, None, "INVALID_ARGUMENT",
                       time.perf_counter() - started)
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{method}: request is not a valid {route.request_class.DESCRIPTOR.name}: "
                    f"{exc}",
                )
            record("macp", method, route.route_class, target[-1] if target else None, "OK",
                   time.perf_counter() - started)
            return response

        return behavior

    def _wrap_stream(self, route: Route, inner):  # type: ignore[no-untyped-def]
        """Server-streaming calls; the handler writes with context.write and may raise Abort."""

        async def behavior(request: bytes, context: grpc.aio.ServicerContext) -> None:
            await self._run_stream(route, context, "request",
                                   lambda target: inner(route, request, context, target))

        return behavior

    async def _run_stream(
        self,
        route: Route,
        context: grpc.aio.ServicerContext,
        what: str,
        body: Callable[[list[str]], Awaitable[None]],
    ) -> None:
        """One streaming call's bookkeeping: active-streams gauge, shutdown, status, metrics."""
        started = time.perf_counter()
        target: list[str] = []
        code = "OK"
        gauge = self.metrics.active_streams.labels("macp", route.method)
        gauge.inc()
        task = self._track_stream()
        try:
            await body(target)
        except Abort as abort:
            code = abort.code.name
            await context.abort(abort.code, abort.details, abort.trailing)
        except WireError as exc:
            code = "INVALID_ARGUMENT"
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{route.method}: {what} is not a valid "
                f"{route.request_class.DESCRIPTOR.name}: {exc}",
            )
        except asyncio.CancelledError:
            code = "CANCELLED"
            if not self._closing:
                raise
            code = "UNAVAILABLE"
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTDOWN_DETAILS)
        finally:
            self._active_streams.discard(task)
            gauge.dec()
            self.metrics.record_request("macp", route.method, route.route_class,
                                        target[-1] if target else None, code,
                                        time.perf_counter() - started)

    def _track_stream(self) -> asyncio.Task[object]:
        """Register the calling stream handler so `end_streams` can end it."""
        task: asyncio.Task[object] = asyncio.current_task()  # type: ignore[assignment]
        self._active_streams.add(task)
        if self._closing:
            task.cancel()  # started after end_streams: refused like the others
        return task

    def end_streams(self) -> int:
        """Shutdown: end every open stream now with UNAVAILABLE (clients reconnect to another
        replica) instead of holding it until the grace period ends and gRPC cuts it; streams
        that start from now on are refused the same way. Unary calls are left to finish."""
        self._closing = True
        for task in list(self._active_streams):
            task.cancel()
        return len(self._active_streams)

    # -- common forwarding -------------------------------------------------------------------
    async def _forward_unary(
        self, pod: Pod, route: Route, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        try:
            call, response = await _unary_call(
                pod, route.path, request,
                forwardable(context.invocation_metadata()), context.time_remaining(),
            )
        except grpc.aio.AioRpcError as exc:
            raise _upstream_abort(pod, exc) from None
        trailing = await call.trailing_metadata()
        if trailing:
            context.set_trailing_metadata(forwardable(trailing))
        return response

    def _pod(self, name: str) -> Pod:
        pod = self.pods.get(name)
        if pod is None:
            raise Abort(grpc.StatusCode.UNAVAILABLE,
                        f"pod {name} is no longer in the pod set (retry)")
        return pod

    def _any_pod(self, method: str) -> Pod:
        pod = self.pods.any_healthy()
        if pod is None:
            raise Abort(grpc.StatusCode.UNAVAILABLE, self._no_pod_message(method))
        return pod

    def _why_not_placeable(self) -> str:
        reasons = [f"{pod.name}: {pod.not_placeable_reason}" for pod in self.pods
                   if pod.not_placeable_reason]
        return f" ({'; '.join(reasons)})" if reasons else ""

    def _no_pod_message(self, method: str) -> str:
        if not len(self.pods):
            return f"{method}: no pods configured (start the router with --pods)"
        down = ", ".join(f"{pod.name} ({pod.last_error or 'not answering'})" for pod in self.pods)
        return f"{method}: no healthy pod: {down} (retry)"

    # -- session route: the hot path ---------------------------------------------------------
    async def _send(
        self, route: Route, request: bytes, context: grpc.aio.ServicerContext, target: list[str]
    ) -> bytes:
        key = routes.classify_envelope(1, request)
        if key is None:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "Send: envelope is required")
        if key.route is RouteClass.SESSION:
            if not key.session_id:
                raise Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Send: session_id is required for a {key.message_type or 'untyped'} "
                    "envelope (only Signal and Progress may omit it)",
                )
            return await self._to_session(route, key.session_id, request, context, target)
        if key.route is RouteClass.START:
            return await self._start(route, key.session_id, request, context, target)
        pod = self._any_pod("Send")
        target.append(pod.name)
        return await self._forward_unary(pod, route, request, context)

    async def _session_unary(
        self, route: Route, request: bytes, context: grpc.aio.ServicerContext, target: list[str]
    ) -> bytes:
        sid = route.session_id(request)
        if not sid:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{route.method}: session_id is required")
        return await self._to_session(route, sid, request, context, target)

    async def _to_session(
        self,
        route: Route,
        sid: str,
        request: bytes,
        context: grpc.aio.ServicerContext,
        target: list[str],
    ) -> bytes:
        name = self.locator.try_cached(sid)
        if name is None:
            return await self._locate_and_forward(route, sid, request, context, target)
        self._cache_hits.inc()
        target.append(name)
        pod = self._pod(name)
        try:
            response = await self._forward_unary(pod, route, request, context)
        except Abort as abort:
            if abort.code is not grpc.StatusCode.NOT_FOUND:
                raise
            return await self._stale(route, sid, name, request, context, target, abort)
        if _NOT_FOUND_MARK in response and route.method == "Send":
            if _send_error_code(pod, response, sid) == "SESSION_NOT_FOUND":
                return await self._stale(route, sid, name, request, context, target, response)
        return response

    # -- session route: slow paths -----------------------------------------------------------
    async def _locate_and_forward(
        self,
        route: Route,
        sid: str,
        request: bytes,
        context: grpc.aio.ServicerContext,
        target: list[str],
        *,
        use_negative: bool = True,
    ) -> bytes:
        located = await self.locator.lookup(sid, use_negative=use_negative)
        if located.status == LIVE:
            assert located.pod is not None
            target.append(located.pod)
            return await self._forward_unary(self._pod(located.pod), route, request, context)
        if located.status == NOT_FOUND:
            # The runtime's own not-found answer: any pod gives it (nothing is created).
            pod = self._any_pod(route.method)
            target.append(pod.name)
            return await self._forward_unary(pod, route, request, context)
        raise Abort(
            grpc.StatusCode.UNAVAILABLE,
            located.describe_unknown(sid, self.locator.probe_timeout_s, self.unknown_causes()),
        )

    def unknown_causes(self) -> dict[str, str]:
        """Pods whose silence has a known cause: they reject the router's own credentials."""
        return {pod.name: f"rejects the router's credentials ({pod.credentials_rejected}); "
                          f"{FIX_HINT}"
                for pod in self.pods if pod.credentials_rejected}

    async def _stale(
        self,
        route: Route,
        sid: str,
        pod: str,
        request: bytes,
        context: grpc.aio.ServicerContext,
        target: list[str],
        answer: bytes | Abort,
    ) -> bytes:
        """The cached pod says it does not hold `sid`: forget it, locate once more, retry once."""
        await self.locator.invalidate(sid, pod)
        located = await self.locator.lookup(sid, use_negative=False)
        if located.status == LIVE and located.pod != pod:
            assert located.pod is not None
            target.append(located.pod)
            return await self._forward_unary(self._pod(located.pod), route, request, context)
        if located.status not in (LIVE, NOT_FOUND):
            raise Abort(
                grpc.StatusCode.UNAVAILABLE,
                located.describe_unknown(sid, self.locator.probe_timeout_s,
                                         self.unknown_causes()),
            )
        if isinstance(answer, Abort):
            raise answer
        return answer

    async def _start(
        self,
        route: Route,
        sid: str,
        request: bytes,
        context: grpc.aio.ServicerContext,
        target: list[str],
    ) -> bytes:
        if not sid:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "SessionStart: session_id is required")
        try:
            owner, won = await self.locator.place(sid)
        except NoPlaceablePod as exc:
            raise Abort(grpc.StatusCode.UNAVAILABLE,
                        f"SessionStart {sid}: {exc}{self._why_not_placeable()} (retry)") from None
        target.append(owner)
        pod = self._pod(owner)
        try:
            call, response = await _unary_call(
                pod, route.path, request,
                forwardable(context.invocation_metadata()), context.time_remaining(),
            )
        except grpc.aio.AioRpcError as exc:
            if won and _is_connect_failure(exc):
                await self.locator.release(sid, owner)
            raise _upstream_abort(pod, exc) from None
        trailing = await call.trailing_metadata()
        if trailing:
            context.set_trailing_metadata(forwardable(trailing))
        error_code = _send_error_code(pod, response, sid)
        if error_code == ACK_WITHOUT_OK:
            # Accepted or not, nobody can tell: the reservation stays until its TTL.
            log.warning("pod %s (%s) answered SessionStart %s with an Ack that has neither ok "
                        "nor an error code; is it a MACP runtime of a supported version?",
                        pod.name, pod.address, sid)
            raise Abort(grpc.StatusCode.INTERNAL,
                        f"SessionStart {sid}: pod {pod.name} answered with an Ack that has "
                        "neither ok nor an error code, so whether it started the session is "
                        "unknown; check the session with GetSession before retrying, and check "
                        f"that pod {pod.name} runs a supported MACP runtime")
        if not error_code or error_code == "SESSION_ALREADY_EXISTS":
            self.locator.confirm(sid, owner)
        elif won:
            await self.locator.release(sid, owner)
        return response

    # -- any ----------------------------------------------------------------------------------
    async def _any_unary(
        self, route: Route, request: bytes, context: grpc.aio.ServicerContext, target: list[str]
    ) -> bytes:
        pod = self._any_pod(route.method)
        target.append(pod.name)
        return await self._forward_unary(pod, route, request, context)

    # -- streams ------------------------------------------------------------------------------
    async def _relay_server_stream(
        self, pod: Pod, route: Route, request: bytes, context: grpc.aio.ServicerContext
    ) -> None:
        call = pod.unary_stream(route.path)(
            request,
            metadata=tracing.stream_metadata(pod.name, pod.address, route.path,
                                             forwardable(context.invocation_metadata())),
            timeout=context.time_remaining(),
        )
        try:
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(forwardable(initial))
            async for message in call:
                await context.write(message)
        except grpc.aio.AioRpcError as exc:
            raise _upstream_abort(pod, exc) from None
        finally:
            call.cancel()
        trailing = await call.trailing_metadata()
        if trailing:
            context.set_trailing_metadata(forwardable(trailing))

    async def _any_stream(
        self, route: Route, request: bytes, context: grpc.aio.ServicerContext, target: list[str]
    ) -> None:
        pod = self._any_pod(route.method)
        target.append(pod.name)
        await self._relay_server_stream(pod, route, request, context)

    async def _session_server_stream(
        self, route: Route, request: bytes, context: grpc.aio.ServicerContext, target: list[str]
    ) -> None:
        sid = route.session_id(request)
        if not sid:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{route.method}: session_id is required")
        pod = await self._session_pod(sid, route.method)
        target.append(pod.name)
        await self._relay_server_stream(pod, route, request, context)

    async def _session_pod(self, sid: str, method: str) -> Pod:
        """The pod holding `sid` for a server stream (no retry: it cannot be replayed)."""
        pod, _holds = await self._stream_pod(sid, method)
        return pod

    async def _stream_pod(self, sid: str, method: str) -> tuple[Pod, bool]:
        """The pod for a stream on `sid`, and whether it is believed to hold it.

        False means no pod holds it: any pod gives the runtime's own not-found answer.
        """
        name = self.locator.try_cached(sid)
        if name is None:
            located = await self.locator.lookup(sid)
            if located.status == LIVE:
                assert located.pod is not None
                name = located.pod
            elif located.status == NOT_FOUND:
                return self._any_pod(method), False
            else:
                raise Abort(
                    grpc.StatusCode.UNAVAILABLE,
                    located.describe_unknown(sid, self.locator.probe_timeout_s,
                                             self.unknown_causes()),
                )
        return self._pod(name), True

    def _wrap_bidi(self, route: Route):  # type: ignore[no-untyped-def]
        async def behavior(request_iterator: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext) -> None:
            await self._run_stream(route, context, "first frame",
                                   lambda target: self._bidi(route, context, target))

        return behavior

    async def _bidi(
        self, route: Route, context: grpc.aio.ServicerContext, target: list[str]
    ) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return  # the client half-closed without a frame: nothing to route
        assert isinstance(first, bytes)
        if route.method != "StreamSession":
            pod = self._any_pod(route.method)
            target.append(pod.name)
            await self._relay_bidi(_StreamRoute(pod), route, first, context, target)
            return
        key = routes.stream_session_key(first)
        if key.route is RouteClass.START:
            owner, won = await self._place_for_stream(key.session_id)
            plan = _StreamRoute(self._pod(owner), sid=key.session_id, start=True, won=won,
                                expects_answer=True)
        elif key.route is RouteClass.AMBIENT:
            plan = _StreamRoute(self._any_pod(route.method))
        else:
            if not key.session_id:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                            "StreamSession: the first frame must name a session "
                            "(envelope.session_id or subscribe_session_id)")
            pod, holds = await self._stream_pod(key.session_id, route.method)
            plan = _StreamRoute(pod, sid=key.session_id, relocatable=holds,
                                expects_answer=bool(key.message_type))
        target.append(plan.pod.name)
        await self._relay_bidi(plan, route, first, context, target)

    async def _place_for_stream(self, sid: str) -> tuple[str, bool]:
        if not sid:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "SessionStart: session_id is required")
        try:
            return await self.locator.place(sid)
        except NoPlaceablePod as exc:
            raise Abort(grpc.StatusCode.UNAVAILABLE,
                        f"SessionStart {sid}: {exc}{self._why_not_placeable()} (retry)") from None

    async def _relay_bidi(
        self, plan: _StreamRoute, route: Route, first: bytes,
        context: grpc.aio.ServicerContext, target: list[str],
    ) -> None:
        """Relay a bidi stream; its first answer is read to settle the route:

        - a session stream whose pod answers "unknown session" (inline MACPError or NOT_FOUND)
          before anything was accepted: the route was stale. The entry is dropped, the session
          re-located, and the frames sent so far are re-sent on the right pod; the client
          never sees the stale pod's answer.
        - a stream that starts a session: the echoed SessionStart (or ALREADY_EXISTS) confirms
          the reservation, INVALID_ARGUMENT or an inline error releases it.
        After the first answer every frame is relayed as raw bytes, unread.
        """
        relay = _BidiRelay(self, plan, route, first, context, target)
        try:
            await relay.run()
        finally:
            await relay.close()

    def _wrap_client_stream(self, route: Route):  # type: ignore[no-untyped-def]
        async def behavior(request_iterator: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext) -> bytes:
            pod = self.pods.any_healthy()
            if pod is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, self._no_pod_message(route.method))
            assert pod is not None
            call = pod.stream_unary(route.path)(
                request_iterator,
                metadata=forwardable(context.invocation_metadata()),
                timeout=context.time_remaining(),
            )
            try:
                return await call
            except grpc.aio.AioRpcError as exc:
                abort = _upstream_abort(pod, exc)
                await context.abort(abort.code, abort.details, abort.trailing)
                raise

        return behavior

    # -- fan-out ------------------------------------------------------------------------------
    async def _list_sessions(
        self, route: Route, request: bytes, context: grpc.aio.ServicerContext, target: list[str]
    ) -> bytes:
        try:
            query = core_pb2.ListSessionsRequest.FromString(request)
        except Exception as exc:  # protobuf's DecodeError
            raise WireError(str(exc)) from None
        pods = list(self.pods)
        if not pods:
            raise Abort(grpc.StatusCode.UNAVAILABLE, self._no_pod_message(route.method))
        metadata = forwardable(context.invocation_metadata())
        timeout = context.time_remaining()

        async def collect(pod: Pod) -> list[core_pb2.SessionMetadata]:
            sessions: list[core_pb2.SessionMetadata] = []
            token = ""
            multicallable = pod.list_unary(route.path)  # one unpaged reply can be huge
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

        results = await asyncio.gather(*(collect(pod) for pod in pods), return_exceptions=True)
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
            for session in result:
                merged.setdefault(session.session_id, session)
        if self.scope is not None:
            visible = self.scope.visible_to(context.invocation_metadata())
            if visible is not None:
                merged = {sid: s for sid, s in merged.items() if visible(s)}
        if failed:
            raise Abort(
                grpc.StatusCode.UNAVAILABLE,
                f"ListSessions: pods {', '.join(failed)} did not answer; a partial list would "
                "hide their sessions (retry)",
            )
        ordered = sorted(merged.values(), key=lambda s: (s.started_at_unix_ms, s.session_id))
        start = 0
        if query.page_token:
            start = _decode_page_token(query.page_token, ordered)
        size = query.page_size if query.page_size > 0 else LIST_PAGE_DEFAULT
        page = ordered[start : start + size]
        next_token = ""
        if start + size < len(ordered) and page:
            next_token = _encode_page_token(page[-1])
        return core_pb2.ListSessionsResponse(
            sessions=page, next_page_token=next_token
        ).SerializeToString()

    async def _merged(
        self, route: Route, request: bytes, context: grpc.aio.ServicerContext, target: list[str]
    ) -> None:
        """WatchSessions / WatchSignals: every pod's stream, with the caller's credentials.

        Pods that become healthy while the stream is open (new pods, restarted pods) are added;
        a pod's stream failing ends the merged stream with that pod's status, so the client
        resubscribes instead of silently missing that pod's events.
        """
        try:
            route.request_class.FromString(request)  # never open N streams for garbage
        except Exception as exc:  # protobuf's DecodeError
            raise WireError(str(exc)) from None
        pods = self.pods.healthy()
        if not pods:
            raise Abort(grpc.StatusCode.UNAVAILABLE, self._no_pod_message(route.method))
        metadata = forwardable(context.invocation_metadata())
        timeout = context.time_remaining()
        visible = None
        if self.scope is not None and route.method == "WatchSessions":
            visible = self.scope.visible_to(context.invocation_metadata())
        queue: asyncio.Queue[tuple[Pod, bytes | None, grpc.aio.AioRpcError | None]] = (
            asyncio.Queue(maxsize=1024)
        )
        calls = []

        async def pump(pod: Pod) -> None:
            call = pod.unary_stream(route.path)(
                request, metadata=tracing.stream_metadata(pod.name, pod.address, route.path,
                                                          metadata), timeout=timeout)
            calls.append(call)
            try:
                async for message in call:
                    await queue.put((pod, message, None))
            except grpc.aio.AioRpcError as exc:
                await queue.put((pod, None, exc))
                return
            await queue.put((pod, None, None))

        pumped = {pod.name for pod in pods}
        tasks = [asyncio.create_task(pump(pod), name=f"merge:{pod.name}") for pod in pods]

        def joined(pod: Pod) -> None:
            if pod.healthy and pod.name not in pumped:
                pumped.add(pod.name)
                tasks.append(asyncio.create_task(pump(pod), name=f"merge:{pod.name}"))

        self.pods.on_health_change.append(joined)
        try:
            while True:
                pod, message, error = await queue.get()
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
                    raise _upstream_abort(pod, error)
                return  # one pod ended its stream (OK): end ours, the client resubscribes
        finally:
            self.pods.on_health_change.remove(joined)
            for task in tasks:
                task.cancel()
            for call in calls:
                call.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- broadcast ----------------------------------------------------------------------------
    async def _broadcast(
        self, route: Route, request: bytes, context: grpc.aio.ServicerContext, target: list[str]
    ) -> bytes:
        """A registry call to every healthy pod, remembered for replay only if the pods hold it.

        Each pod's answer is read (`registry_outcome`): held (accepted, or "already
        registered"), refused (in-band ok=false for any other reason, or a status such as
        PERMISSION_DENIED / FAILED_PRECONDITION / INVALID_ARGUMENT) or failed (no answer). It is
        recorded for replay only when some pod holds it and none refused it; when pods
        disagree the caller is told which refused and why.
        """
        try:
            key, adds = routes.broadcast_key(route, request)
        except Exception as exc:  # protobuf's DecodeError
            raise WireError(str(exc)) from None
        pods = self.pods.healthy()
        if not pods:
            self.metrics.record_broadcast(route.method, "failed")
            raise Abort(grpc.StatusCode.UNAVAILABLE, self._no_pod_message(route.method))
        metadata = forwardable(context.invocation_metadata())
        timeout = context.time_remaining() or self.broadcast_timeout_s
        results = await asyncio.gather(
            *(pod.unary(route.path)(request, metadata=metadata, timeout=timeout) for pod in pods),
            return_exceptions=True,
        )
        outcomes = [(pod, result, registry_outcome(route, adds, result))
                    for pod, result in zip(pods, results, strict=True)]
        held = [(pod, result, why) for pod, result, (kind, why) in outcomes if kind == HELD]
        refused = [(pod, result, why) for pod, result, (kind, why) in outcomes
                   if kind == REFUSED]
        failed = [(pod, result, why) for pod, result, (kind, why) in outcomes if kind == FAILED]
        for pod, _result, why in failed:
            pod.registry_synced = False  # it may have missed this call: replay when it is back
            log.warning("pod %s: %s %s got no answer (%s); it is replayed to the pod when its "
                        "feed reconnects", pod.name, route.method, key, why)
        if held and not refused:
            with contextlib.suppress(StoreUnavailable):
                if adds:
                    await self.store.record_broadcast(BroadcastRecord(key, route.method, request))
                else:
                    await self.store.forget_broadcast(key)
        if held and not refused and not failed:
            self.metrics.record_broadcast(route.method, "ok")
            accepted = [result for _pod, result, why in held if not why]
            return (accepted or [held[0][1]])[0]  # type: ignore[return-value]
        described_failed = ", ".join(f"{pod.name} ({why})" for pod, _r, why in failed)
        if refused:
            self.metrics.record_broadcast(route.method, "refused")
            reasons = {why for _pod, _r, why in refused}
            if not held and not failed and len(reasons) == 1:
                return _pass_through(refused[0][1])  # every pod gave the same answer
            described = "; ".join(f"{pod.name} refused it ({why})" for pod, _r, why in refused)
            holders = ", ".join(
                f"{pod.name} ({'already held it' if why else 'accepted'})"
                for pod, _r, why in held
            ) or "none"
            raise Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{route.method} {key}: the pods disagree: {described}; held by {holders}"
                + (f"; no answer from {described_failed}" if failed else "")
                + ". It is not remembered for replay: fix the refusing pods (their "
                "configuration or the caller's registry rights) and call again (pods that "
                "hold it answer 'already registered', which counts as held)",
            )
        self.metrics.record_broadcast(route.method, "partial" if held else "failed")
        if held:
            done = ", ".join(pod.name for pod, _r, _w in held)
            raise Abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{route.method} {key}: applied on {done}; failed on {described_failed}. It is "
                "remembered and will be replayed to those pods when they reconnect (retry "
                "is safe)",
            )
        raise Abort(grpc.StatusCode.UNAVAILABLE,
                    f"{route.method} {key}: failed on every pod: {described_failed} (retry)")

    async def replay_broadcasts(self, pod: Pod) -> None:
        """Give a pod every remembered registry call it does not hold, once per incarnation.

        Runs on every feed (re)connect, before the feed is marked up (so before the pod takes
        new sessions). Calls for what the pod lists (ListPolicies, ListExtModes, ListModes)
        are skipped, so a reconnect of a pod that kept its registry replays nothing and a
        restarted pod gets exactly what it lost. For what a pod cannot list, the call is
        replayed only while `pod.registry_synced` is False: it is cleared when the pod goes
        unhealthy (a restart empties the runtime's in-memory registries) and set once a
        replay had no failure.
        """
        lock = self._replay_locks.setdefault(pod.name, asyncio.Lock())
        async with lock:
            await self._replay(pod)

    async def replay_deferred(self) -> None:
        """The store is back: replay to the pods whose replay it prevented."""
        for name in sorted(self._deferred_replays):
            pod = self.pods.get(name)
            if pod is None:
                self._deferred_replays.discard(name)
                continue
            pod.registry_synced = False
            await self.replay_broadcasts(pod)

    async def _replay(self, pod: Pod) -> None:
        try:
            records = await self.store.broadcasts()
        except StoreUnavailable:
            # A store outage must not stop placement (routing never depends on the store):
            # the pod takes sessions now and gets the replay when the store is back.
            if pod.name not in self._deferred_replays:
                log.warning("pod %s: registry replay deferred until the store is back (it "
                            "cannot be read now); the pod takes new sessions meanwhile",
                            pod.name)
            self._deferred_replays.add(pod.name)
            pod.registry_synced = True
            return
        self._deferred_replays.discard(pod.name)
        holds = await self._registry_listing(pod) if records else None
        complete = True
        for record in records:
            route = self.routes[f"/{routes.SERVICE}/{record.method}"]
            listed = holds(record) if holds is not None else None
            if listed or (listed is None and pod.registry_synced):
                continue  # the pod lists it, or (unlistable) this incarnation already got it
            try:
                result: bytes | BaseException = await pod.unary(route.path)(
                    record.request, metadata=self.router_metadata,
                    timeout=self.broadcast_timeout_s)
            except grpc.aio.AioRpcError as exc:
                result = exc
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.PERMISSION_DENIED):
                    pod.report_credentials_rejected(f"{record.method} replay", exc.code(),
                                                    exc.details() or "")
            kind, why = registry_outcome(route, True, result)
            label = {HELD: "ok", REFUSED: "refused", FAILED: "failed"}[kind]
            self.metrics.broadcast_replays.labels(self.metrics.pod_label(pod.name), label).inc()
            if kind == FAILED:
                complete = False
                log.warning("pod %s: replay of %s %s failed (%s); tried again when its feed "
                            "reconnects", pod.name, record.method, record.key, why)
            elif kind == REFUSED:
                log.warning("pod %s refused the replay of %s %s (%s): its configuration differs "
                            "from the pods that hold it (policies directory, or the router "
                            "token's registry rights: can_manage_mode_registry); it is not "
                            "retried", pod.name, record.method, record.key, why)
        pod.registry_synced = complete

    async def _registry_listing(
        self, pod: Pod
    ) -> Callable[[BroadcastRecord], bool | None]:
        """What the pod already holds, as a predicate over records (None: it cannot list
        that kind)."""
        metadata, timeout = self.router_metadata, self.broadcast_timeout_s

        async def names(method: str, response: type, field: str, attr: str) -> set[str] | None:
            try:
                raw = await pod.unary(f"/{routes.SERVICE}/{method}")(
                    b"", metadata=metadata, timeout=timeout)
                return {getattr(item, attr) for item in getattr(response.FromString(raw), field)}
            except (grpc.aio.AioRpcError, DecodeError) as exc:
                log.info("pod %s: %s failed (%s); replaying its registry calls unchecked",
                         pod.name, method, _describe(exc))
                return None

        policies = await names("ListPolicies", policy_pb2.ListPoliciesResponse,
                               "descriptors", "policy_id")
        ext_modes = await names("ListExtModes", core_pb2.ListExtModesResponse, "modes", "mode")
        modes = await names("ListModes", core_pb2.ListModesResponse, "modes", "mode")

        def holds(record: BroadcastRecord) -> bool | None:
            kind, _, name = record.key.partition(":")
            if kind == "policy" and policies is not None:
                return name in policies
            if kind == "ext_mode" and ext_modes is not None:
                return name in ext_modes
            if kind == "promote" and modes is not None:
                request = core_pb2.PromoteModeRequest.FromString(record.request)
                return (request.promoted_mode_name or request.mode) in modes
            return None

        return holds

    # -- probe: the MACP adapter's answer to "does this pod hold sid?" --------------------------
    async def probe(self, pod_name: str, sid: str) -> str:
        """GetSession with the router's credentials: OK/PERMISSION_DENIED live, NOT_FOUND not."""
        pod = self.pods.get(pod_name)
        if pod is None:
            return "unknown"
        request = core_pb2.GetSessionRequest(session_id=sid).SerializeToString()
        try:
            await _unary_call(pod, GET_SESSION_PATH, request, self.router_metadata,
                              self.locator.probe_timeout_s, span="probe")
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.NOT_FOUND:
                return "not_found"
            if code is grpc.StatusCode.PERMISSION_DENIED:
                # The runtime checks membership after authentication and lookup: the session
                # is here and the router's identity is not an observer of it.
                return "live"
            if code is grpc.StatusCode.UNAUTHENTICATED:
                # Authentication comes before the lookup: nothing is known about the session,
                # and the router's token is what is wrong.
                pod.report_credentials_rejected("GetSession probe", code, exc.details() or "")
                return "unknown"
            if code is grpc.StatusCode.UNAVAILABLE:
                pod.report_failure(f"probe: {exc.details() or 'unavailable'}")
            elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
                pod.report_silent(f"probe: no answer within "
                                  f"{self.locator.probe_timeout_s * 1000:.0f} ms")
            return "unknown"
        return "live"

    async def answers(self, pod: Pod) -> bool:
        """Does `pod` answer a MACP call at all? (Any status but no answer or no connection.)"""
        request = core_pb2.GetSessionRequest(session_id=ANSWER_CHECK_SID).SerializeToString()
        try:
            await pod.unary(GET_SESSION_PATH)(
                request, metadata=self.router_metadata, timeout=self.locator.probe_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.UNAVAILABLE)
        return True


STREAM_REPLAY_FRAMES = 64
"""Frames kept until a stream's first answer, for a transparent re-route (beyond: no re-route)."""
FIRST_ANSWER_WARN_S = 10.0
UNKNOWN_SESSION_CODES = frozenset({"UnknownSession", "SESSION_NOT_FOUND"})
"""Inline StreamSession error codes for "this pod does not hold the session" (the runtime puts
its status message in `code`: "UnknownSession"; older sims and the Ack use SESSION_NOT_FOUND)."""


@dataclass(slots=True)
class _StreamRoute:
    """Where a bidi stream goes and what its first answer must settle."""

    pod: Pod
    sid: str = ""
    start: bool = False
    """The first frame is a SessionStart placed on `pod`."""
    won: bool = False
    """This call made the reservation (it may release it)."""
    relocatable: bool = False
    """`pod` was located as the holder: an "unknown session" first answer means a stale route."""
    expects_answer: bool = False
    """The first frame carries an envelope: the runtime answers it (echo or inline error)."""


class _BidiRelay:
    """One relayed bidi call: client frames up, pod frames down, one re-route at most.

    Until the pod's first answer the frames sent up are kept (at most STREAM_REPLAY_FRAMES) so
    they can be re-sent on another pod; the upstream call is swapped under `_lock`, which the
    client pump holds while it writes. After the first answer nothing is kept or parsed.
    """

    def __init__(
        self, proxy: MacpProxy, plan: _StreamRoute, route: Route, first: bytes,
        context: grpc.aio.ServicerContext, target: list[str],
    ) -> None:
        self.proxy = proxy
        self.plan = plan
        self.route = route
        self.context = context
        self.target = target
        self.pod = plan.pod
        self.metadata = forwardable(context.invocation_metadata())
        self.first = first
        self.kept: list[bytes] | None = [first] if plan.relocatable else None
        """Frames sent before the first answer, kept for a re-route (relocatable streams)."""
        self.settled = False
        self.rerouted = False
        self.client_done = False
        self._lock = asyncio.Lock()
        self.call = self._open(self.pod)
        self._pump: asyncio.Task[None] | None = None
        self._warn: asyncio.TimerHandle | None = None

    def _open(self, pod: Pod) -> grpc.aio.StreamStreamCall:
        return pod.stream_stream(self.route.path)(
            metadata=tracing.stream_metadata(pod.name, pod.address, self.route.path,
                                             self.metadata),
            timeout=self.context.time_remaining(),
        )

    async def _client_to_pod(self) -> None:
        async with self._lock:
            await self.call.write(self.first)
        context = self.context
        while True:
            frame = await context.read()
            if frame is grpc.aio.EOF:
                break
            if self.settled and self.kept is None:
                await self.call.write(frame)  # the hot path: raw bytes, no lock, no copy
                continue
            async with self._lock:
                if self.kept is not None:
                    if len(self.kept) < STREAM_REPLAY_FRAMES:
                        self.kept.append(frame)
                    else:
                        self.kept = None  # too much to re-send: a stale answer passes through
                await self.call.write(frame)
        # A client's cancel reaches this read as EOF before grpc cancels the handler task;
        # give the cancel a moment to arrive (close() then cancels this pump and the upstream
        # call) so the pod sees a cancel, not a half-close it would finish.
        await asyncio.sleep(CANCEL_AFTER_EOF_GRACE_S)
        async with self._lock:
            self.client_done = True
            await self.call.done_writing()

    def _silent_first_answer(self) -> None:
        log.warning(
            "pod %s (%s) has not answered the first frame of a %s stream%s within %.1f s; the "
            "stream stays open (a re-sent message gets no echo), but if this repeats the pod is "
            "overloaded or hung: check its logs and `macp-router pods`",
            self.pod.name, self.pod.address, self.route.method,
            f" for session {self.plan.sid}" if self.plan.sid else "",
            self.proxy.first_answer_warn_s,
        )

    async def run(self) -> None:
        self._pump = asyncio.create_task(self._client_to_pod(), name=f"bidi-up:{self.pod.name}")
        if self.plan.expects_answer:
            self._warn = asyncio.get_running_loop().call_later(
                self.proxy.first_answer_warn_s, self._silent_first_answer)
        context = self.context
        try:
            initial = await self.call.initial_metadata()
            if initial:
                await context.send_initial_metadata(forwardable(initial))
            while True:
                try:
                    message = await self.call.read()
                except grpc.aio.AioRpcError as exc:
                    if not self.settled and await self._first_status(exc):
                        continue
                    raise _upstream_abort(self.pod, exc) from None
                if message is grpc.aio.EOF:
                    break
                if not self.settled and await self._first_answer(message):
                    continue  # the stale pod's answer: swallowed, the stream moved
                await context.write(message)
            code = await self.call.code()
        except grpc.aio.AioRpcError as exc:
            raise _upstream_abort(self.pod, exc) from None
        trailing = await self.call.trailing_metadata()
        if code is not grpc.StatusCode.OK:
            raise Abort(code, await self.call.details() or "", forwardable(trailing))
        if trailing:
            context.set_trailing_metadata(forwardable(trailing))

    def _settle(self) -> None:
        self.settled = True
        self.kept = None
        if self._warn is not None:
            self._warn.cancel()

    async def _first_answer(self, message: bytes) -> bool:
        """Read the pod's first answer; True when it was a stale route and the stream moved."""
        plan = self.plan
        if not (plan.start or plan.relocatable):
            self._settle()
            return False
        try:
            answer = core_pb2.StreamSessionResponse.FromString(message)
        except DecodeError:
            self._settle()  # a start's reservation stays to its TTL: nobody knows the outcome
            raise Abort(
                grpc.StatusCode.INTERNAL,
                f"pod {self.pod.name} ({self.pod.address}) answered StreamSession with bytes "
                "that are not a StreamSessionResponse: is it a MACP runtime of a supported "
                "version? (the router ended the stream; retry, and check that pod)",
            ) from None
        if plan.start:
            self._settle()
            if answer.HasField("envelope"):
                if answer.envelope.session_id == plan.sid:
                    self.proxy.locator.confirm(plan.sid, self.pod.name)
            elif plan.won:
                await self.proxy.locator.release(plan.sid, self.pod.name)
            return False
        if (answer.HasField("error") and answer.error.code in UNKNOWN_SESSION_CODES
                and self.kept is not None and not self.rerouted):
            if await self._reroute(f"inline {answer.error.code}"):
                return True
        self._settle()
        return False

    async def _first_status(self, exc: grpc.aio.AioRpcError) -> bool:
        """The call ended before any answer; True when it was a stale route and moved."""
        plan = self.plan
        code = exc.code()
        if plan.start:
            self._settle()
            if code is grpc.StatusCode.ALREADY_EXISTS:
                self.proxy.locator.confirm(plan.sid, self.pod.name)
            elif plan.won and (code is grpc.StatusCode.INVALID_ARGUMENT
                               or _is_connect_failure(exc)):
                await self.proxy.locator.release(plan.sid, self.pod.name)
            return False
        if (plan.relocatable and code is grpc.StatusCode.NOT_FOUND and self.kept is not None
                and not self.rerouted and await self._reroute("NOT_FOUND")):
            return True
        self._settle()
        return False

    async def _reroute(self, answer: str) -> bool:
        """The located pod does not hold the session: locate it again and move the stream."""
        sid, stale = self.plan.sid, self.pod
        locator = self.proxy.locator
        await locator.invalidate(sid, stale.name)
        located = await locator.lookup(sid, use_negative=False)
        pod = self.proxy.pods.get(located.pod or "") if located.status == LIVE else None
        if pod is None or pod is stale:
            return False
        log.info("StreamSession %s: pod %s answered %s (stale route); moved to pod %s",
                 sid, stale.name, answer, pod.name)
        self.rerouted = True
        async with self._lock:
            kept = self.kept or []
            self.call.cancel()
            self.call = self._open(pod)
            self.pod = pod
            self.target.append(pod.name)
            for frame in kept:
                await self.call.write(frame)
            if self.client_done:
                await self.call.done_writing()
        return True

    async def close(self) -> None:
        if self._warn is not None:
            self._warn.cancel()
        pump = self._pump
        if pump is not None:
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError,
                                     grpc.aio.UsageError, Exception):
                await pump
        self.call.cancel()


HELD = "held"
REFUSED = "refused"
FAILED = "failed"
_HELD_MARKS = ("already registered", "already standards-track")
"""In-band errors of a registry call that mean the pod already holds what was asked."""
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.CANCELLED})


def registry_outcome(route: Route, adds: bool, result: object) -> tuple[str, str]:
    """One pod's answer to a registry call: (HELD | REFUSED | FAILED, why).

    `why` is "" for a plain acceptance, else the pod's own words. A removal the pod answers
    "not found" holds too (the pod does not have it, which is what was asked). A reply that
    does not parse, or says neither ok nor why not, is FAILED: its effect is unknown.
    """
    if isinstance(result, grpc.aio.AioRpcError):
        kind = FAILED if result.code() in _TRANSIENT else REFUSED
        return kind, _describe(result)
    if not isinstance(result, bytes):
        return FAILED, repr(result)
    try:
        answer = route.response_class.FromString(result)
    except DecodeError:
        return FAILED, (f"answered bytes that are not a {route.response_class.DESCRIPTOR.name}:"
                        " is it a MACP runtime of a supported version?")
    if answer.ok:
        return HELD, ""
    error = answer.error
    if not error:
        return FAILED, "answered ok=false without an error (not a MACP runtime's answer?)"
    lowered = error.lower()
    if adds and any(mark in lowered for mark in _HELD_MARKS):
        return HELD, error
    if not adds and "not found" in lowered:
        return HELD, error
    return REFUSED, f"ok=false: {error}"


def _pass_through(result: object) -> bytes:
    """A pod's own answer for the caller: its bytes, or its status as an Abort."""
    if isinstance(result, bytes):
        return result
    if isinstance(result, grpc.aio.AioRpcError):
        raise Abort(result.code(), result.details() or "", forwardable(result.trailing_metadata()))
    raise Abort(grpc.StatusCode.INTERNAL, f"unexpected answer {result!r}")


def _describe(error: object) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details() or ''}".rstrip(": ")
    return repr(error)


def _encode_page_token(last: core_pb2.SessionMetadata) -> str:
    raw = f"{last.started_at_unix_ms}:{last.session_id}".encode()
    return "r1." + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str, ordered: list[core_pb2.SessionMetadata]) -> int:
    """Index of the first session after the one the token names (keyset paging)."""
    if not token.startswith("r1."):
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                    "ListSessions: page_token was not issued by this router")
    body = token[3:]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
        started, _, sid = raw.partition(":")
        key = (int(started), sid)
    except (ValueError, UnicodeDecodeError):
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                    "ListSessions: page_token is malformed") from None
    for index, session in enumerate(ordered):
        if (session.started_at_unix_ms, session.session_id) > key:
            return index
    return len(ordered)


__all__ = ["Abort", "MacpProxy", "forwardable"]
