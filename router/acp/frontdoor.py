"""The ACP front door: clients speak ACP's remote transport to the router as to one agent.

`AcpFrontDoor` is served by acp's own ASGI adapter (`acp.http.asgi.AcpAsgiApp`) under
hypercorn: it implements the server-core interface that adapter drives (`handle_post`,
`validate_stream`, `open_stream`, `handle_delete`, `close`, and `create_websocket_connection` /
`registry` for WebSocket clients), so JSON bodies, SSE framing and keepalives, WebSocket frames
and the transport's HTTP errors are acp's. Behind it, each client gets a `VirtualConnection`
with lazily opened upstreams to the pods, and every call is routed by the table in
`router.acp.routes` through the session core shared with MACP (`router.core.SessionRouter`:
near-cache -> store -> parallel `session/status` probes over the router's control
connections, placement, reservations). This module is the transport, lifecycle and dispatch;
the routes are `router.acp.session_routes` (session, load, new, fork, status, any) and
`router.acp.fanout` (authenticate, list), over `router.acp.forwarding` (send, relay, stale
re-route); the `initialize` answer is `router.acp.initialize`.

The hot path: a session-scoped POST whose sid is in the near-cache is one dict lookup, then the
message goes to the client's upstream to that pod; the POST returns 202 once the pod has it.

Invariants:
- A session is never loaded where it might already be live: `session/load` / `session/resume`
  go to the pod where it is live; only when every pod answered not_found is the sid reserved
  (atomically, in the store) and placed; if any pod did not answer, the client gets a retryable
  error naming those pods and nothing is loaded.
- Answers carry the client's original JSON-RPC id (value and type).
- A pod that loses its control connection has its routes forgotten (near-cache and store): a
  restarted pod lost its sessions, and only a probe can tell where they are now.
- A stale route (the pod errs and its own `session/status` says not_found) is dropped and the
  call re-routed once.
- Every background task is owned: per client by its `VirtualConnection`, otherwise by the front
  door; `aclose()` ends all of them.
- Background services (pods' health loops `acp_health:<pod>`, the locator's
  `store_writer:acp` / `sweeper:acp`, `acp_reaper`) run under the supervisor it is given (the
  router's `Router.supervisor`), so they appear in `/readyz`, `macp-router pods` and the
  service metrics; `aclose()` stops only those, never the router's supervisor itself.
- Admission control (`router.admission`, the gate the router shares with the MACP front door)
  counts every HTTP POST and every WebSocket message as a call while the router handles it
  (until the pod has it). Past the bound a POST is answered 503 with `Retry-After` and a
  WebSocket request a JSON-RPC error (ROUTER_UNAVAILABLE, data.retryable and
  data.retryAfterMs) at once, before any parsing or routing; a WebSocket notification past the
  bound cannot be answered and is dropped (counted like every refusal). Answers the client
  sends to an agent's request are never refused. An SSE stream (HTTP GET) and a WebSocket
  connection each hold a *stream* slot of the same gate while open (MACP streams count there
  too); past that bound the GET, or the WebSocket upgrade, is answered 503 with `Retry-After`
  before acp's adapter sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from acp._sse import serialize_sse_event, serialize_sse_keepalive
from acp.http.asgi import AcpAsgiApp
from acp.http.protocol import (
    CONNECTION_ID_HEADER,
    SESSION_ID_HEADER,
    is_initialize_request,
    method_requires_session_header,
)
from acp.http.server import SSE_KEEPALIVE_INTERVAL_SECONDS, PostResult

from router.acp import jsonrpc as rpc
from router.acp import routes
from router.acp.asgi import AsgiServer, websocket_ender
from router.acp.backend import AcpBackend
from router.acp.config import AcpConfig
from router.acp.connection import ConnectionTable, VirtualConnection
from router.acp.fanout import AcpFanOutRoutes
from router.acp.forwarding import PROTOCOL
from router.acp.initialize import initialize_answer
from router.acp.jsonrpc import Message
from router.acp.pods import AcpPod, AcpPodRoster
from router.acp.session_routes import AcpSessionRoutes
from router.admission import CALL, STREAM, Admission
from router.core.call import Call
from router.core.errors import outcome_of
from router.core.session_router import SessionRouter
from router.locator import Locator
from router.metrics import Metrics
from router.store import LocationStore, MemoryStore
from router.supervisor import Supervisor

log = logging.getLogger("macp_router.acp")

REAPER = "acp_reaper"
"""The idle-connection reaper's service name."""


class _StreamGate:
    """ASGI middleware: every SSE stream (HTTP GET) and WebSocket connection holds a stream slot
    of `gate` until it ends; past the bound it is refused before the app sees it: 503 with
    `Retry-After` (for a WebSocket, as the upgrade's answer). An SSE stream ends when its
    client disconnects: acp's adapter only writes to a stream (a closed one too, silently) and
    never reads, so this layer reads the disconnect and cancels it."""

    def __init__(self, app: Any, gate: Admission) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        is_stream = kind == "websocket" or (kind == "http" and scope.get("method") == "GET")
        if not is_stream:
            await self.app(scope, receive, send)
            return
        gate = self.gate
        if gate.streams >= gate.stream_limit:
            await self._refuse(kind, receive, send)
            return
        gate.streams += 1
        try:
            if kind == "websocket":  # the app reads the socket: it sees the disconnect itself
                await self.app(scope, receive, send)
            else:
                await self._until_done_or_disconnected(scope, receive, send)
        finally:
            gate.streams -= 1

    async def _refuse(self, kind: str, receive: Any, send: Any) -> None:
        gate = self.gate
        gate.refuse(PROTOCOL, STREAM)
        body = json.dumps({"error": gate.details(STREAM)}).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()),
                   (b"retry-after", str(gate.retry_after_s()).encode())]
        if kind == "websocket":
            await receive()  # websocket.connect
            prefix = "websocket.http.response"  # ASGI's denial response (hypercorn has it)
        else:
            prefix = "http.response"
        await send({"type": f"{prefix}.start", "status": 503, "headers": headers})
        await send({"type": f"{prefix}.body", "body": body})

    async def _until_done_or_disconnected(self, scope: dict[str, Any], receive: Any,
                                          send: Any) -> None:
        disconnected = asyncio.Event()

        async def read_until_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass  # the GET's (empty) body
            disconnected.set()

        async def receive_disconnect() -> dict[str, Any]:  # for an app that reads after all
            await disconnected.wait()
            return {"type": "http.disconnect"}

        reader = asyncio.ensure_future(read_until_disconnect())
        served = asyncio.ensure_future(self.app(scope, receive_disconnect, send))
        try:
            await asyncio.wait({reader, served}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, served):
                task.cancel()
            await asyncio.gather(reader, served, return_exceptions=True)
        if not served.cancelled() and served.exception() is not None:
            raise served.exception()  # type: ignore[misc]


class AcpFrontDoor(AcpSessionRoutes, AcpFanOutRoutes):
    """The ACP server core: transport, lifecycle and dispatch; routes live in the mixins
    (`router.acp.session_routes`, `router.acp.fanout`, `router.acp.forwarding`)."""

    def __init__(
        self,
        config: AcpConfig,
        *,
        metrics: Metrics | None = None,
        store: LocationStore | None = None,
        supervisor: Supervisor | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.admission = admission if admission is not None else Admission(metrics=self.metrics)
        """Client calls in flight and their bound: the router's gate (shared with MACP), or an
        unbounded one of its own for a front door built alone."""
        # A store of its own (a MemoryStore, or a RedisStore with its own prefix): ACP and MACP
        # pods may share names, and the store indexes sessions by pod name.
        self.store = store or MemoryStore(retention_s=config.retention_s,
                                          max_entries=config.cache_max_sessions)
        self._own_supervisor = supervisor is None
        self.supervisor = supervisor if supervisor is not None else Supervisor()
        """Runs the pods' health loops, the locator's loops and the idle-connection reaper:
        the router's (so they show in `/readyz`, `macp-router pods` and the service metrics),
        or a private one for a front door built alone (tests, the ACP demo)."""
        self.roster = AcpPodRoster(
            config.pods,
            supervisor=self.supervisor,
            transport=config.upstream_transport,
            connect_timeout_s=config.connect_timeout_s,
            health_interval_s=config.health_interval_ms / 1000,
            health_timeout_s=max(config.connect_timeout_s, 0.5),
        )
        self.locator = Locator.configured(
            config, roster=self.roster, store=self.store, probe=self.roster.probe,
            metrics=self.metrics, protocol=PROTOCOL)
        self.core = SessionRouter(self.locator, AcpBackend(self.roster))
        """Locate, relocate, place and settle: the session flow MACP uses too."""
        self.connections = ConnectionTable()
        self._watch_connections()
        app = AcpAsgiApp(self)  # type: ignore[arg-type]  # duck-typed AcpServer core
        self._http = AsgiServer(
            _StreamGate(app, self.admission),
            config.listen, name="acp-frontdoor", graceful_timeout_s=config.shutdown_grace_s,
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handlers: dict[str, Callable[[VirtualConnection, Message, str | None],
                                           Awaitable[None]]] = {
            routes.SESSION: self._route_session,
            routes.LOAD: self._route_load,
            routes.NEW: self._route_new,
            routes.FORK: self._route_fork,
            routes.STATUS: self._route_status,
            routes.LIST: self._route_list,
            routes.SESSION_OR_ANY: self._route_session_or_any,
            routes.ANY: self._route_any,
            routes.BROADCAST: self._route_broadcast,
        }
        self.metrics.add_methods(routes.metric_methods())
        for pod in self.roster:
            self.metrics.add_protocol_pod(PROTOCOL, pod.name)
        self.roster.on_health_change.append(self._pod_health_changed)
        self.roster.on_disconnect.append(self._pod_disconnected)
        self.started = False

    def _watch_connections(self) -> None:
        """Export the connection table's sizes, read at scrape time."""
        table, metrics = self.connections, self.metrics
        metrics.watch_size("macp_router_acp_connections", ("client",), table.__len__)
        metrics.watch_size("macp_router_acp_connections", ("upstream",), table.upstream_count)
        metrics.watch_size("macp_router_acp_session_streams", (), table.session_stream_count)
        metrics.watch_idle_closed(table.reaped)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the store, locator and pod health loops, then listen. Raises OSError on bind."""
        await self.store.start()
        await self.locator.start(self.supervisor)
        self.roster.start()
        try:
            await self._http.start()
        except OSError:
            await self._shutdown_components()
            raise
        self.supervisor.spawn(REAPER, self._reap_loop)
        self.started = True

    async def _reap_loop(self) -> None:
        interval = min(30.0, self.config.connection_idle_s / 2)
        while True:
            await asyncio.sleep(interval)
            await self.connections.reap_idle(self.config.connection_idle_s)

    async def aclose(self) -> None:
        await self.connections.close_all()
        await self._http.aclose()
        await self._shutdown_components()
        self.started = False

    async def _shutdown_components(self) -> None:
        await self.roster.aclose()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.locator.flush()
        await self.locator.aclose()
        if self._own_supervisor:
            await self.supervisor.aclose()
        else:  # the router's: stop only this front door's own service
            await self.supervisor.stop(REAPER)
        await self.store.aclose()

    async def __aenter__(self) -> AcpFrontDoor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def address(self) -> str:
        return self._http.address

    @property
    def url(self) -> str:
        return f"http://{self.address}/acp"

    async def wait_ready(self, timeout: float = 10.0) -> bool:
        """Until every pod's control connection is up (or `timeout`)."""
        return await self.roster.wait_healthy(timeout)

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)  # type: ignore[assignment]
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # -- pods ----------------------------------------------------------------------------------
    def _pod_health_changed(self, pod: AcpPod) -> None:
        self.metrics.set_protocol_pod_up(PROTOCOL, pod.name, pod.healthy)

    def _pod_disconnected(self, pod: AcpPod) -> None:
        log.info("ACP pod %s: control connection lost; forgetting its routes", pod.name)
        self._spawn(self.locator.forget_pod(pod.name), f"acp-forget:{pod.name}")

    # -- the server core AcpAsgiApp drives -----------------------------------------------------
    @property
    def registry(self) -> ConnectionTable:
        return self.connections

    async def handle_post(
        self,
        message: Any,
        *,
        content_type: str | None,
        connection_id: str | None,
        session_id: str | None,
    ) -> PostResult:
        gate = self.admission
        # A client's answer to an agent's request (no "method") is never refused: the agent
        # waits on it, and it finishes work already admitted.
        if (gate.calls >= gate.call_limit
                and not (isinstance(message, dict) and "method" not in message)):
            gate.refuse(PROTOCOL, CALL)
            return PostResult(503, {"error": gate.details(CALL)},
                              {"Retry-After": str(gate.retry_after_s())})
        gate.calls += 1
        try:
            return await self._post(message, content_type=content_type,
                                    connection_id=connection_id, session_id=session_id)
        finally:
            gate.calls -= 1

    async def _post(
        self,
        message: Any,
        *,
        content_type: str | None,
        connection_id: str | None,
        session_id: str | None,
    ) -> PostResult:
        if content_type is None or not content_type.lower().startswith("application/json"):
            return PostResult(415, {"error": "Content-Type must be application/json"})
        if isinstance(message, list):
            return PostResult(501, {"error": "Batch requests are not supported"})
        if not isinstance(message, dict):
            return PostResult(400, {"error": "Invalid JSON-RPC message"})
        if is_initialize_request(message):
            return await self._initialize_post(message)
        if connection_id is None:
            return PostResult(400, {"error": "Missing connection id"})
        connection = self.connections.get(connection_id)
        if connection is None:
            return PostResult(404, {"error": "Unknown connection id"})
        connection.touch()
        method = message.get("method")
        if method_requires_session_header(method) and session_id is None:
            return PostResult(400, {"error": "Missing session id header"})
        await self.dispatch(connection, message, session_id)
        return PostResult(202)

    def validate_stream(
        self, *, connection_id: str | None, session_id: str | None
    ) -> PostResult | None:
        if connection_id is None:
            return PostResult(400, {"error": "Missing connection id"})
        connection = self.connections.get(connection_id)
        if connection is None:
            return PostResult(404, {"error": "Unknown connection id"})
        if session_id is not None and not connection.has_session(session_id):
            return PostResult(404, {"error": "Unknown session id"})
        return None

    async def open_stream(
        self, *, connection_id: str, session_id: str | None
    ) -> AsyncIterator[bytes]:
        """SSE frames of one client stream, with acp's keepalive cadence."""
        connection = self.connections.get(connection_id)
        if connection is None:
            return
        stream = connection.attach(session_id)
        gauge = self.metrics.active_streams.labels(
            PROTOCOL, "session_stream" if session_id else "connection_stream"
        )
        gauge.inc()
        messages = stream.iterate()
        pending: asyncio.Future[dict[str, Any]] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(messages.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=SSE_KEEPALIVE_INTERVAL_SECONDS)
                if not done:
                    yield serialize_sse_keepalive()
                    continue
                try:
                    item = pending.result()
                except StopAsyncIteration:
                    return
                finally:
                    pending = None
                yield serialize_sse_event(item)
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending
            await messages.aclose()
            connection.detach(session_id)
            gauge.dec()

    async def handle_delete(self, *, connection_id: str | None) -> PostResult:
        if connection_id is None:
            return PostResult(400, {"error": "Missing connection id"})
        if self.connections.get(connection_id) is None:
            return PostResult(404, {"error": "Unknown connection id"})
        await self.connections.remove(connection_id)
        return PostResult(202)

    async def close(self) -> None:
        """ASGI lifespan shutdown: end every client connection."""
        await self.connections.close_all()

    def create_websocket_connection(self) -> VirtualConnection:
        connection = self._new_connection(None, multiplex=True, end_transport=websocket_ender())
        self.connections.add(connection)
        return connection

    # -- initialize ----------------------------------------------------------------------------
    def _new_connection(
        self, init_params: dict[str, Any] | None, *, multiplex: bool = False,
        end_transport: Callable[[], None] | None = None,
    ) -> VirtualConnection:
        return VirtualConnection(
            uuid.uuid4().hex, init_params, roster=self.roster, dispatch=self._admitted_dispatch,
            cached_pod=self.locator.try_cached, multiplex=multiplex, end_transport=end_transport,
        )

    async def _initialize_post(self, message: Message) -> PostResult:
        call = Call(PROTOCOL, "initialize", routes.INITIALIZE)
        answer = await initialize_answer(self.roster, message, self.config.connect_timeout_s)
        call.finish(self.metrics, rpc.code_label(answer))
        if "error" in answer:
            return PostResult(503, {"error": answer["error"]["message"]})
        connection = self._new_connection(rpc.params_of(message))
        self.connections.add(connection)
        return PostResult(200, answer, {CONNECTION_ID_HEADER: connection.connection_id})

    # -- dispatch ------------------------------------------------------------------------------
    async def _admitted_dispatch(
        self, connection: VirtualConnection, message: Message, header_sid: str | None
    ) -> None:
        """A WebSocket message: `dispatch` under the admission bound (see the module docstring).
        (HTTP POSTs are admitted in `handle_post`, before their body is looked at.)"""
        gate = self.admission
        if gate.calls >= gate.call_limit and isinstance(message, dict) and "method" in message:
            pushback = gate.refuse(PROTOCOL, CALL)
            if "id" in message:
                await connection.deliver(
                    rpc.unavailable(message["id"], gate.details(CALL), retryAfterMs=pushback))
            return
        gate.calls += 1
        try:
            await self.dispatch(connection, message, header_sid)
        finally:
            gate.calls -= 1

    async def dispatch(
        self, connection: VirtualConnection, message: Message, header_sid: str | None
    ) -> None:
        """Route one client message; every answer goes to the client's streams."""
        if not isinstance(message, dict):
            return
        method = message.get("method")
        if method is None:
            if "id" in message:
                await connection.answer_agent(message)
            return
        request_id = message.get("id")
        has_id = "id" in message
        if not isinstance(method, str):
            if has_id:
                await connection.deliver(rpc.error(request_id, rpc.INVALID_REQUEST,
                                                   "Invalid request: method must be a string"))
            return
        if method == routes.INITIALIZE_METHOD:
            await self._initialize_in_band(connection, message)
            return
        if not connection.initialized:
            if has_id:
                await connection.deliver(rpc.error(request_id, rpc.INVALID_REQUEST,
                                                   "Invalid request: initialize first"))
            return
        sid = rpc.session_id_param(message)
        route = routes.route_of(method, sid is not None)
        if route is None or route == routes.INITIALIZE:
            await self._reject(self._call(connection, message, "unknown"), rpc.METHOD_NOT_FOUND,
                               "Method not found", {"method": method})
            return
        call = self._call(connection, message, route)
        if header_sid is not None and sid is not None and header_sid != sid:
            await self._reject(
                call, rpc.INVALID_PARAMS,
                f"Invalid params: {SESSION_ID_HEADER} {header_sid} does not "
                f"match params.sessionId {sid}",
            )
            return
        try:
            await self._handlers[route](connection, message, sid)
        except Exception as exc:  # one mapping for both front doors: logged and counted
            abort = outcome_of(exc, PROTOCOL, method, "params do not parse", self.metrics)
            await self._reject(call, rpc.code_for_status(abort.code.name), abort.details,
                               {"details": repr(exc)})

    async def _initialize_in_band(self, connection: VirtualConnection, message: Message) -> None:
        """`initialize` as the first WebSocket message (HTTP clients initialize by POST)."""
        call = Call(PROTOCOL, "initialize", routes.INITIALIZE)
        answer = await initialize_answer(self.roster, message, self.config.connect_timeout_s)
        if "error" not in answer and not connection.initialized:
            connection.init_params = rpc.params_of(message) or {"protocolVersion": 1}
        call.finish(self.metrics, rpc.code_label(answer))
        if "id" in message:
            await connection.deliver(answer)
