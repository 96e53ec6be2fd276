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

import grpc
from macp.v1 import core_pb2

from router import routes
from router.locator import LIVE, NOT_FOUND, Locator, NoPlaceablePod
from router.metrics import Metrics
from router.pods import Pod, PodSet
from router.routes import Route, RouteClass, Shape
from router.scope import DiscoveryScope
from router.store import BroadcastRecord, LocationStore, StoreUnavailable
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
    timeout: float | None,
) -> tuple[grpc.aio.UnaryUnaryCall, bytes]:
    """One unary call to `pod`; a connect failure is tried once more on the next channel.

    After a pod restarts, one pooled channel can still sit in reconnect backoff (failing fast
    with "connection refused") while another is connected again. A connect failure means the
    request was never sent, so trying the next channel is safe.
    """
    call = pod.unary(path)(request, metadata=metadata, timeout=timeout)
    try:
        return call, await call
    except grpc.aio.AioRpcError as exc:
        if not _is_connect_failure(exc):
            raise
    call = pod.unary(path)(request, metadata=metadata, timeout=timeout)
    return call, await call


def _ack_error_code(response: bytes) -> str:
    """The Ack error code of a SendResponse ("" when ok)."""
    ack = core_pb2.SendResponse.FromString(response).ack
    return "" if ack.ok else ack.error.code


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
        self.router_metadata = tuple(router_metadata)
        self.broadcast_timeout_s = broadcast_timeout_s
        self.routes = routes.build_routes()
        metrics.add_methods(route.method for route in self.routes.values())
        self._handlers = {path: self._make_handler(route) for path, route in self.routes.items()}
        self._active_streams: set[asyncio.Task[object]] = set()
        self._cache_hits = metrics.locate.labels("macp", "hit")
        self._closing = False

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
            if _ack_error_code(response) == "SESSION_NOT_FOUND":
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
            located.describe_unknown(sid, self.locator.probe_timeout_s),
        )

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
                located.describe_unknown(sid, self.locator.probe_timeout_s),
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
            raise Abort(grpc.StatusCode.UNAVAILABLE, f"SessionStart {sid}: {exc} (retry)") from None
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
        error_code = _ack_error_code(response)
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
            metadata=forwardable(context.invocation_metadata()),
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
        """The pod holding `sid` for a stream (no retry: a stream cannot be replayed)."""
        name = self.locator.try_cached(sid)
        if name is None:
            located = await self.locator.lookup(sid)
            if located.status == LIVE:
                assert located.pod is not None
                name = located.pod
            elif located.status == NOT_FOUND:
                return self._any_pod(method)
            else:
                raise Abort(
                    grpc.StatusCode.UNAVAILABLE,
                    located.describe_unknown(sid, self.locator.probe_timeout_s),
                )
        return self._pod(name)

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
        if route.method == "StreamSession":
            key = routes.stream_session_key(first)
            if key.route is RouteClass.START:
                owner, _won = await self._place_for_stream(key.session_id)
                pod = self._pod(owner)
            elif key.route is RouteClass.AMBIENT:
                pod = self._any_pod(route.method)
            else:
                if not key.session_id:
                    raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "StreamSession: the first frame must name a session "
                                "(envelope.session_id or subscribe_session_id)")
                pod = await self._session_pod(key.session_id, route.method)
        else:
            pod = self._any_pod(route.method)
        target.append(pod.name)
        await self._relay_bidi(pod, route, first, context)

    async def _place_for_stream(self, sid: str) -> tuple[str, bool]:
        if not sid:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "SessionStart: session_id is required")
        try:
            return await self.locator.place(sid)
        except NoPlaceablePod as exc:
            raise Abort(grpc.StatusCode.UNAVAILABLE, f"SessionStart {sid}: {exc} (retry)") from None

    async def _relay_bidi(
        self, pod: Pod, route: Route, first: bytes, context: grpc.aio.ServicerContext
    ) -> None:
        call = pod.stream_stream(route.path)(
            metadata=forwardable(context.invocation_metadata()),
            timeout=context.time_remaining(),
        )

        async def client_to_pod() -> None:
            await call.write(first)
            while True:
                frame = await context.read()
                if frame is grpc.aio.EOF:
                    break
                await call.write(frame)
            # A client's cancel reaches this read as EOF before grpc cancels the handler task;
            # give the cancel a moment to arrive (the finally below then cancels this pump and
            # the upstream call) so the pod sees a cancel, not a half-close it would finish.
            await asyncio.sleep(CANCEL_AFTER_EOF_GRACE_S)
            await call.done_writing()

        pump = asyncio.create_task(client_to_pod(), name=f"bidi-up:{pod.name}")
        try:
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(forwardable(initial))
            async for message in call:
                await context.write(message)
            code = await call.code()
        except grpc.aio.AioRpcError as exc:
            raise _upstream_abort(pod, exc) from None
        finally:
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError,
                                     grpc.aio.UsageError):
                await pump
            call.cancel()
        trailing = await call.trailing_metadata()
        if code is not grpc.StatusCode.OK:
            raise Abort(code, await call.details() or "", forwardable(trailing))
        if trailing:
            context.set_trailing_metadata(forwardable(trailing))

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
            multicallable = pod.unary(route.path)
            while True:
                page_request = core_pb2.ListSessionsRequest(page_size=LIST_PAGE_DEFAULT,
                                                             page_token=token)
                raw = await multicallable(page_request.SerializeToString(), metadata=metadata,
                                          timeout=timeout)
                page = core_pb2.ListSessionsResponse.FromString(raw)
                sessions.extend(page.sessions)
                token = page.next_page_token
                if not token:
                    return sessions

        results = await asyncio.gather(*(collect(pod) for pod in pods), return_exceptions=True)
        merged: dict[str, core_pb2.SessionMetadata] = {}
        failed: list[str] = []
        for pod, result in zip(pods, results, strict=True):
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
            call = pod.unary_stream(route.path)(request, metadata=metadata, timeout=timeout)
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
        answers = [(pod, r) for pod, r in zip(pods, results, strict=True)
                   if isinstance(r, bytes)]
        failures = [(pod, r) for pod, r in zip(pods, results, strict=True)
                    if not isinstance(r, bytes)]
        if answers:
            with contextlib.suppress(StoreUnavailable):
                if adds:
                    await self.store.record_broadcast(BroadcastRecord(key, route.method, request))
                else:
                    await self.store.forget_broadcast(key)
        if not failures:
            self.metrics.record_broadcast(route.method, "ok")
            return answers[0][1]  # type: ignore[return-value]
        described = ", ".join(f"{pod.name} ({_describe(error)})" for pod, error in failures)
        self.metrics.record_broadcast(route.method, "partial" if answers else "failed")
        if answers:
            done = ", ".join(pod.name for pod, _ in answers)
            raise Abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{route.method} {key}: applied on {done}; failed on {described}. It is "
                "remembered and will be replayed to those pods when they reconnect (retry "
                "is safe)",
            )
        first = failures[0][1]
        if (isinstance(first, grpc.aio.AioRpcError)
                and first.code() is not grpc.StatusCode.UNAVAILABLE):
            raise Abort(first.code(), first.details() or "",
                        forwardable(first.trailing_metadata()))
        raise Abort(grpc.StatusCode.UNAVAILABLE,
                    f"{route.method} {key}: failed on every pod: {described} (retry)")

    async def replay_broadcasts(self, pod: Pod) -> None:
        """Give a pod that joined or restarted every remembered registry call, in order."""
        try:
            records = await self.store.broadcasts()
        except StoreUnavailable:
            log.warning("pod %s: cannot replay registry calls while the store is degraded",
                        pod.name)
            return
        for record in records:
            path = f"/{routes.SERVICE}/{record.method}"
            try:
                await pod.unary(path)(record.request, metadata=self.router_metadata,
                                      timeout=self.broadcast_timeout_s)
                self.metrics.broadcast_replays.labels(self.metrics.pod_label(pod.name),
                                                      "ok").inc()
            except grpc.aio.AioRpcError as exc:
                self.metrics.broadcast_replays.labels(self.metrics.pod_label(pod.name),
                                                      "failed").inc()
                log.warning("pod %s: replay of %s %s failed: %s %s", pod.name, record.method,
                            record.key, exc.code().name, exc.details())

    # -- probe: the MACP adapter's answer to "does this pod hold sid?" --------------------------
    async def probe(self, pod_name: str, sid: str) -> str:
        """GetSession with the router's credentials: OK/PERMISSION_DENIED live, NOT_FOUND not."""
        pod = self.pods.get(pod_name)
        if pod is None:
            return "unknown"
        request = core_pb2.GetSessionRequest(session_id=sid).SerializeToString()
        try:
            await _unary_call(pod, GET_SESSION_PATH, request, self.router_metadata,
                              self.locator.probe_timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.NOT_FOUND:
                return "not_found"
            if code is grpc.StatusCode.PERMISSION_DENIED:
                return "live"
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
