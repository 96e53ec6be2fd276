"""A client's virtual connection to the router: its streams, its sessions, its upstreams.

One ACP client connection (minted by `initialize`, `Acp-Connection-Id`) fans out to many pods.
The router opens one upstream connection per pod lazily, initialized with the client's own
`initialize` params (and its `authenticate`, replayed), so each pod sees the client as if it
had connected directly.

Invariants:
- Agent->client requests get a fresh id from this connection's own counter before they reach
  the client (two pods' request ids never collide); the client's answer goes back to the pod
  that asked, under that pod's original id. Nothing else rewrites ids here.
- A message for session S goes on S's session stream only while the client has that stream
  open; otherwise on the connection stream. The client always reads the connection stream and
  opens a session stream only after it saw S in a message, so nothing is ever pushed where the
  client will not look (acp's stock server routes loads differently and the client hangs).
- A session is registered on the connection when `session/new` answers it, when a load,
  resume or session-scoped request for it arrives, or when the locator already knows it:
  registered sessions are the ones whose `Acp-Session-Id` POSTs and GET streams are accepted.
- Every task the connection starts is owned by it and cancelled by `aclose()`, which also
  closes its upstreams, ends its streams, forgets its sessions and (a WebSocket client) ends
  the client's socket.
- Bounded: a connection holds at most one upstream per pod and one session stream per session
  it uses; a session's stream goes when the session is closed or deleted through it
  (`forget`), or, not being read, once the router no longer knows the session (`prune`).
  `ConnectionTable.reap_idle` closes client connections (WebSocket ones too) and upstreams
  that carried nothing for the idle timeout (`--acp-idle-timeout-s`); an upstream to a pod
  that holds a session of the client is kept while the client connection lives (a stock acp
  pod ends a connection's sessions with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from acp.http.server import OutboundStream

from router.acp.jsonrpc import Message, is_request, session_id_param
from router.acp.pods import AcpPodRoster
from router.acp.upstream import Upstream, UpstreamClosed

log = logging.getLogger("macp_router.acp.connection")

Dispatch = Callable[["VirtualConnection", Message, "str | None"], Awaitable[None]]


class VirtualConnection:
    def __init__(
        self,
        connection_id: str,
        init_params: dict[str, Any] | None,
        *,
        roster: AcpPodRoster,
        dispatch: Dispatch,
        cached_pod: Callable[[str], str | None],
        multiplex: bool = False,
        end_transport: Callable[[], None] | None = None,
    ) -> None:
        self.connection_id = connection_id
        self.init_params = init_params or {}
        self.auth_params: dict[str, Any] | None = None
        self._roster = roster
        self._dispatch = dispatch
        self._cached_pod = cached_pod
        self.connection_stream = OutboundStream()
        self.session_streams: dict[str, OutboundStream] = {}
        self._attached: dict[str, int] = {}
        self._multiplex = OutboundStream() if multiplex else None
        self.upstreams: dict[str, Upstream] = {}
        self._opening: dict[str, asyncio.Future[Upstream]] = {}
        self._agent_requests: dict[int, tuple[Upstream, Any]] = {}
        self._agent_request_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._open_streams = 0
        self.last_active = time.monotonic()
        self.multiplex = multiplex
        self._end_transport = end_transport
        """Ends the client's WebSocket (its next receive is a disconnect); None for HTTP."""
        self.closed = False

    def __repr__(self) -> str:
        return (f"VirtualConnection({self.connection_id[:8]}, upstreams={sorted(self.upstreams)}, "
                f"sessions={len(self.session_streams)})")

    @property
    def initialized(self) -> bool:
        return bool(self.init_params)

    # -- sessions and streams ------------------------------------------------------------------
    def register(self, sid: str) -> OutboundStream:
        stream = self.session_streams.get(sid)
        if stream is None:
            stream = OutboundStream()
            self.session_streams[sid] = stream
        return stream

    def has_session(self, sid: str) -> bool:
        """Registered here, or live somewhere as far as the near-cache knows (then registered)."""
        if sid in self.session_streams:
            return True
        if self._cached_pod(sid) is not None:
            self.register(sid)
            return True
        return False

    def forget(self, sid: str) -> None:
        """The client closed or deleted `sid` through this connection: drop its stream (a GET
        still reading it ends)."""
        stream = self.session_streams.pop(sid, None)
        self._attached.pop(sid, None)
        if stream is not None:
            stream.close()

    def prune(self) -> int:
        """Drop the streams nobody reads of sessions the router no longer knows (ended and
        expired, or forgotten with their pod); returns how many. A later call naming one
        registers it again once the router finds it."""
        gone = [sid for sid in self.session_streams
                if sid not in self._attached and self._cached_pod(sid) is None]
        for sid in gone:
            self.session_streams.pop(sid).close()
        return len(gone)

    def idle_for(self, now: float) -> float:
        """Seconds without an open stream, a call in flight or any traffic (0 while busy)."""
        if self._open_streams or self._tasks:
            return 0.0
        return now - self.last_active

    async def reap_idle_upstreams(self, now: float, idle_s: float) -> int:
        """Close upstreams idle for more than `idle_s` to pods holding none of this client's
        sessions; returns how many."""
        busy = {upstream for upstream, _ in self._agent_requests.values()}
        holding = {self._cached_pod(sid) for sid in self.session_streams}
        idle = [upstream for pod, upstream in self.upstreams.items()
                if upstream not in busy and pod not in holding
                and upstream.idle_for(now) > idle_s]
        for upstream in idle:
            log.info("closing idle ACP upstream of client connection %s to pod %s",
                     self.connection_id[:8], upstream.pod)
            await upstream.aclose(f"idle for more than {idle_s:g} s")
        return len(idle)

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def attach(self, sid: str | None) -> OutboundStream:
        """The client opened a stream (GET): the connection stream or S's session stream."""
        self._open_streams += 1
        self.touch()
        if sid is None:
            return self.connection_stream
        self._attached[sid] = self._attached.get(sid, 0) + 1
        return self.register(sid)

    def detach(self, sid: str | None) -> None:
        self._open_streams -= 1
        self.touch()
        if sid is None:
            return
        count = self._attached.get(sid, 0) - 1
        if count > 0:
            self._attached[sid] = count
        else:
            self._attached.pop(sid, None)

    async def deliver(self, message: Message, sid: str | None = None) -> None:
        """Push a message to the client on the stream it is reading for `sid`."""
        if self.closed:
            return
        self.last_active = time.monotonic()
        if self._multiplex is not None:
            await self._multiplex.push(message)
        elif sid is not None and sid in self._attached:
            await self.session_streams[sid].push(message)
        else:
            await self.connection_stream.push(message)

    # -- upstreams -----------------------------------------------------------------------------
    async def upstream(self, pod: str) -> Upstream:
        """This client's open connection to `pod`, opened now if needed (single-flight)."""
        current = self.upstreams.get(pod)
        if current is not None and not current.closed:
            return current
        opening = self._opening.get(pod)
        if opening is not None:
            return await asyncio.shield(opening)
        future: asyncio.Future[Upstream] = asyncio.get_running_loop().create_future()
        self._opening[pod] = future
        try:
            upstream = await self._open(pod)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        else:
            future.set_result(upstream)
            return upstream
        finally:
            self._opening.pop(pod, None)

    async def _open(self, pod_name: str) -> Upstream:
        if self.closed:
            raise UpstreamClosed(pod_name, "client connection closed")
        pod = self._roster.get(pod_name)
        if pod is None:
            raise UpstreamClosed(pod_name, "no such pod")
        upstream = pod.upstream(on_message=self._from_agent, on_close=self._upstream_closed)
        await upstream.open(self.init_params)
        if self.auth_params is not None:
            with contextlib.suppress(TimeoutError):
                await upstream.call("authenticate", self.auth_params, upstream.connect_timeout_s)
        if self.closed:
            await upstream.aclose()
            raise UpstreamClosed(pod_name, "client connection closed")
        self.upstreams[pod_name] = upstream
        return upstream

    def _upstream_closed(self, upstream: Upstream) -> None:
        if self.upstreams.get(upstream.pod) is upstream:
            del self.upstreams[upstream.pod]
        for key, (owner, _) in list(self._agent_requests.items()):
            if owner is upstream:
                del self._agent_requests[key]

    # -- agent -> client ---------------------------------------------------------------------
    async def _from_agent(self, upstream: Upstream, message: Message) -> None:
        """A request or notification from a pod: relay it (requests under a fresh id)."""
        sid = session_id_param(message)
        if is_request(message):
            client_id = next(self._agent_request_ids)
            self._agent_requests[client_id] = (upstream, message["id"])
            message = {**message, "id": client_id}
        await self.deliver(message, sid)

    async def answer_agent(self, message: Message) -> bool:
        """The client answered an agent's request: send it to that pod under the pod's id."""
        key = message.get("id")
        entry = self._agent_requests.pop(key, None) if type(key) is int else None
        if entry is None:
            return False
        upstream, original_id = entry
        reply: Message = {"jsonrpc": "2.0", "id": original_id}
        if "error" in message:
            reply["error"] = message["error"]
        else:
            reply["result"] = message.get("result")
        try:
            await upstream.send(reply)
        except UpstreamClosed as exc:
            log.info("answer to pod %s dropped: %s", upstream.pod, exc.reason)
        return True

    # -- owned tasks -----------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        if self.closed:
            coro.close()
            return
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self.touch()
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # -- the WebSocket face (acp.ws.server drives these) ---------------------------------------
    async def deliver_to_agent(self, message: dict[str, Any]) -> None:
        self.last_active = time.monotonic()
        await self._dispatch(self, message, None)

    async def iter_all_outbound(self) -> AsyncIterator[dict[str, Any]]:
        assert self._multiplex is not None, "only WebSocket connections multiplex"
        async for message in self._multiplex.iterate():
            yield message

    # -- lifecycle -------------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for upstream in list(self.upstreams.values()):
            await upstream.aclose("client connection closed")
        self.upstreams.clear()
        self._agent_requests.clear()
        self.connection_stream.close()
        for stream in self.session_streams.values():
            stream.close()
        self.session_streams.clear()
        self._attached.clear()
        if self._multiplex is not None:
            self._multiplex.close()
        if self._end_transport is not None:
            self._end_transport()


class ConnectionTable:
    """connection id -> `VirtualConnection` (the `registry` acp's WebSocket handler uses)."""

    def __init__(self) -> None:
        self._connections: dict[str, VirtualConnection] = {}
        self.reaped = {"client": 0, "upstream": 0}
        """Connections closed for being idle, by side (`macp_router_acp_idle_closed_total`)."""

    def __len__(self) -> int:
        return len(self._connections)

    def upstream_count(self) -> int:
        """Open upstreams of every client connection (read on the metrics thread)."""
        return sum(len(c.upstreams) for c in list(self._connections.values()))

    def session_stream_count(self) -> int:
        """Session streams of every client connection (read on the metrics thread)."""
        return sum(len(c.session_streams) for c in list(self._connections.values()))

    def add(self, connection: VirtualConnection) -> None:
        self._connections[connection.connection_id] = connection

    def get(self, connection_id: str) -> VirtualConnection | None:
        return self._connections.get(connection_id)

    def all(self) -> list[VirtualConnection]:
        return list(self._connections.values())

    async def reap_idle(self, idle_s: float) -> int:
        """Close client connections idle for more than `idle_s` (HTTP and WebSocket), then the
        idle upstreams and unread streams of unknown sessions of the others; returns how many
        client connections were closed."""
        now = time.monotonic()
        idle = [c.connection_id for c in self._connections.values() if c.idle_for(now) > idle_s]
        for connection_id in idle:
            log.info("closing idle ACP client connection %s", connection_id[:8])
            await self.remove(connection_id)
        self.reaped["client"] += len(idle)
        for connection in list(self._connections.values()):
            connection.prune()
            self.reaped["upstream"] += await connection.reap_idle_upstreams(now, idle_s)
        return len(idle)

    async def remove(self, connection_id: str) -> None:
        connection = self._connections.pop(connection_id, None)
        if connection is not None:
            await connection.aclose()

    async def close_all(self) -> None:
        for connection_id in list(self._connections):
            await self.remove(connection_id)
