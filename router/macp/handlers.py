"""The MACP front door's gRPC glue: one raw-bytes handler per method of the route table.

`MacpProxy` registers a handler for every method of `macp.v1.MACPRuntimeService`
(`routes.build_routes`) that takes and returns bytes, and hands each call, as one `Call`
object, to the module of its route class:

    session   router.macp.session    (the hot path: sid -> near-cache -> forward)
    start     router.macp.start      (place, forward, confirm / release)
    fan-out   router.macp.fanout     (ListSessions, merged watch streams)
    broadcast router.macp.broadcast  (registry calls to every pod, replay)
    any       router.macp.any        (one healthy pod, unread)
    streams   router.macp.streams    (server streams, bidi relay with one re-route)

Every call ends here: its status comes from `router.core.errors.outcome_of` (an `Abort`, a
frame that does not parse, or an unexpected exception, logged and counted) and its metric from
`Call.finish`.

Invariants:
- A frame the router routes on (session, start, fan-out, broadcast) that does not parse is
  answered INVALID_ARGUMENT and never forwarded; `any`-class requests go to one pod unread.
- Every call records exactly one request metric, with the pod it last went to; a call that
  ends cancelled is recorded DEADLINE_EXCEEDED when its deadline ran out, else CANCELLED.
- On shutdown (`end_streams`) every open stream ends UNAVAILABLE so clients reconnect to
  another replica; unary calls are left to finish.
- Admission control (`router.admission`) comes first: a call or stream past its kind's bound
  is answered UNAVAILABLE with a `grpc-retry-pushback-ms` trailer before a `Call` exists
  (nothing parsed, no pod contacted) and is counted in the refusal metric and as a request with
  pod "none"; an admitted one holds its slot until its handler returns, raises or is
  cancelled, and releases it exactly once (a `finally` around the whole handler).
  UNAVAILABLE, not RESOURCE_EXHAUSTED: see README "Admission control".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from router import routes, tracing
from router.admission import CALL, PUSHBACK_KEY, STREAM, Admission
from router.core.call import Call
from router.core.errors import cancelled_code, outcome_of
from router.core.session_router import SessionRouter
from router.credentials import FIX_HINT
from router.locator import Locator
from router.macp.any import AnyCalls, client_stream_handler
from router.macp.backend import MacpBackend
from router.macp.broadcast import BroadcastCalls
from router.macp.fanout import FanOutCalls
from router.macp.listing import Listings
from router.macp.session import SessionCalls
from router.macp.streams import FIRST_ANSWER_WARN_S, StreamCalls
from router.metrics import Metrics
from router.pods import Pod, PodSet
from router.routes import Route, RouteClass, Shape
from router.scope import DiscoveryScope
from router.store import LocationStore

PROTOCOL = "macp"
SHUTDOWN_DETAILS = "macp-router is shutting down: reconnect (another replica serves) (retry)"

UnaryBody = Callable[[Call, bytes], Awaitable[bytes]]
StreamBody = Callable[[Call, bytes], Awaitable[None]]


class MacpProxy:
    """The MACP front door: route-class handlers over one `SessionRouter`."""

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
        admission: Admission | None = None,
        listings: Listings | None = None,
    ) -> None:
        self.pods = pods
        self.admission = admission if admission is not None else Admission(metrics=metrics)
        """The process's in-flight bounds (shared with the ACP front door); unbounded if none
        is given."""
        self.locator = locator
        self.metrics = metrics
        self.routes = routes.build_routes()
        self.backend = MacpBackend(pods, router_metadata, locator)
        self.core = SessionRouter(locator, self.backend, unknown_causes=self.unknown_causes,
                                  why_not_placeable=self._why_not_placeable)
        self.sessions = SessionCalls(self.core, self.backend)
        self.any = AnyCalls(self.backend)
        self.fanout = FanOutCalls(pods, scope, listings)
        """ListSessions paging keeps one snapshot per listing in `listings` (bounded, expiring;
        the default bounds when none is given)."""
        self.broadcasts = BroadcastCalls(
            pods=pods, store=store, metrics=metrics, routes_by_path=self.routes,
            router_metadata=router_metadata, broadcast_timeout_s=broadcast_timeout_s)
        self.streams = StreamCalls(self)
        self.first_answer_warn_s = FIRST_ANSWER_WARN_S
        """A stream whose first envelope frame gets no answer this long is logged (pod named)."""
        metrics.add_methods(route.method for route in self.routes.values())
        self._handlers = {path: tracing.traced_handler(route.method, self._make_handler(route))
                          for path, route in self.routes.items()}
        self._active_streams: set[asyncio.Task[object]] = set()
        self._closing = False

    # -- what the app and the locator ask of the MACP adapter ---------------------------------
    async def probe(self, pod_name: str, sid: str) -> str:
        """The locator's probe: GetSession with the router's credentials."""
        return await self.backend.probe(pod_name, sid)

    async def answers(self, pod: Pod) -> bool:
        """Does `pod` answer a MACP call at all? (its health beyond the health service)"""
        return await self.backend.answers(pod)

    async def replay_broadcasts(self, pod: Pod) -> None:
        await self.broadcasts.replay_broadcasts(pod)

    async def replay_deferred(self) -> None:
        await self.broadcasts.replay_deferred()

    def unknown_causes(self) -> dict[str, str]:
        """Pods whose silence has a known cause: they reject the router's own credentials."""
        return {pod.name: f"rejects the router's credentials ({pod.credentials_rejected}); "
                          f"{FIX_HINT}"
                for pod in self.pods if pod.credentials_rejected}

    def _why_not_placeable(self) -> str:
        reasons = [f"{pod.name}: {pod.not_placeable_reason}" for pod in self.pods
                   if pod.not_placeable_reason]
        return f" ({'; '.join(reasons)})" if reasons else ""

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
        cls = route.route_class
        if route.shape is Shape.UNARY:
            if route.method == "Send":
                body: UnaryBody = self.sessions.send
            elif cls is RouteClass.SESSION:
                body = self.sessions.session_unary
            elif route.method == "ListSessions":
                body = self.fanout.list_sessions
            elif cls is RouteClass.BROADCAST:
                body = self.broadcasts.broadcast
            else:
                body = self.any.unary
            return grpc.unary_unary_rpc_method_handler(self._unary(route, body))
        if route.shape is Shape.SERVER_STREAM:
            stream: StreamBody = (self.fanout.merged if cls is RouteClass.FANOUT
                                  else self.streams.session_server_stream
                                  if cls is RouteClass.SESSION else self.any.server_stream)
            return grpc.unary_stream_rpc_method_handler(self._server_stream(route, stream))
        if route.shape is Shape.BIDI:
            return grpc.stream_stream_rpc_method_handler(self._bidi(route))
        return grpc.stream_unary_rpc_method_handler(
            self._client_stream(route, client_stream_handler(self.pods, route.path,
                                                             route.method)))

    async def _refuse(self, context: grpc.aio.ServicerContext, route: Route, kind: str) -> None:
        """Answer a call past the admission bound: UNAVAILABLE + pushback, counted (raises)."""
        gate = self.admission
        pushback = gate.refuse(PROTOCOL, kind)
        self.metrics.record_request(PROTOCOL, route.method, route.route_class, None,
                                    "UNAVAILABLE", 0.0)
        await context.abort(grpc.StatusCode.UNAVAILABLE, gate.details(kind),
                            ((PUSHBACK_KEY, str(pushback)),))

    def _unary(self, route: Route, body: UnaryBody):  # type: ignore[no-untyped-def]
        method, route_class, metrics = route.method, route.route_class, self.metrics
        what = f"request is not a valid {route.request_class.DESCRIPTOR.name}"

        gate, refuse = self.admission, self._refuse

        async def behavior(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if gate.calls >= gate.call_limit:
                await refuse(context, route, CALL)
            gate.calls += 1
            try:
                call = Call(PROTOCOL, method, route_class, route, context)
                try:
                    response = await body(call, request)
                except grpc.aio.AbortError:
                    call.finish(metrics, "UNKNOWN")
                    raise
                except asyncio.CancelledError:  # the client cancelled, or the deadline passed
                    call.finish(metrics, cancelled_code(context.time_remaining()))
                    raise
                except Exception as exc:
                    abort = outcome_of(exc, PROTOCOL, method, what, metrics)
                    call.finish(metrics, abort.code.name)
                    await context.abort(abort.code, abort.details, abort.trailing)
                call.finish(metrics)
                return response
            finally:
                gate.calls -= 1

        return behavior

    def _server_stream(self, route: Route, body: StreamBody):  # type: ignore[no-untyped-def]
        async def run(request: bytes, context: grpc.aio.ServicerContext) -> None:
            call = Call(PROTOCOL, route.method, route.route_class, route, context)
            await self._run_stream(call, "request", body(call, request))

        return self._stream_gate(route, run)

    def _bidi(self, route: Route):  # type: ignore[no-untyped-def]
        async def run(_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            call = Call(PROTOCOL, route.method, route.route_class, route, context)
            await self._run_stream(call, "first frame", self.streams.bidi(call))

        return self._stream_gate(route, run)

    def _client_stream(self, route: Route, handler):  # type: ignore[no-untyped-def]
        """A client-streaming call counts as a stream (it is open while the client writes)."""
        return self._stream_gate(route, handler)

    def _stream_gate(self, route: Route, run):  # type: ignore[no-untyped-def]
        """`run` behind the stream admission bound: refused at once past it, else it holds one
        stream slot until it returns, whichever way."""
        gate, refuse = self.admission, self._refuse

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if gate.streams >= gate.stream_limit:
                await refuse(context, route, STREAM)
            gate.streams += 1
            try:
                return await run(request, context)
            finally:
                gate.streams -= 1

        return behavior

    async def _run_stream(self, call: Call, what: str, body: Awaitable[None]) -> None:
        """One streaming call's bookkeeping: active-streams gauge, shutdown, status, metrics."""
        context: grpc.aio.ServicerContext = call.context
        gauge = self.metrics.active_streams.labels(PROTOCOL, call.method)
        gauge.inc()
        task = self._track_stream()
        try:
            await body
        except asyncio.CancelledError:  # the client cancelled, the deadline passed, or shutdown
            call.code = cancelled_code(context.time_remaining())
            if not self._closing:
                raise
            call.code = "UNAVAILABLE"
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTDOWN_DETAILS)
        except grpc.aio.AbortError:
            call.code = "UNKNOWN"
            raise
        except Exception as exc:
            abort = outcome_of(
                exc, PROTOCOL, call.method,
                f"{what} is not a valid {call.route.request_class.DESCRIPTOR.name}", self.metrics)
            call.code = abort.code.name
            await context.abort(abort.code, abort.details, abort.trailing)
        finally:
            self._active_streams.discard(task)
            gauge.dec()
            call.finish(self.metrics)

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
