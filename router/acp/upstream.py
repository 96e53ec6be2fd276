"""One JSON-RPC connection from the router to one ACP pod, over acp's own client transports.

An `Upstream` is opened with an `initialize` (the client's params for a client's virtual
connection, the router's own for the control connection that probes and health-checks), then
carries requests the router sends and relays what the agent sends back.

Transports (both from the `acp` package; no HTTP/SSE/WebSocket framing here):
- `ws` (default): `acp.ws.create_websocket_stream` on the pod's `/acp` endpoint. acp 0.12.1's
  HTTP server registers a session on a connection only when a response *result* carries
  `sessionId`, so after `session/load` a stock pod answers every session-scoped POST with 404
  "Unknown session id"; its WebSocket mode (same endpoint, same AcpServer) has no such check.
- `http`: `acp.http.create_http_stream` with a shared httpx client (Streamable HTTP, POST +
  SSE). Works for new sessions; load-then-prompt needs a pod whose server registers loaded
  sessions (not acp 0.12.1's).

Invariants:
- Ids the router sends are this upstream's own counter (ints), so requests of different
  clients, or of one client to different pods, never collide; the caller keeps the client's
  original id and answers with it.
- A 4xx answer to a session-scoped POST (http transport) raises `UpstreamRefused` and keeps
  the connection: the sessions the pod registered on it stay usable.
- Every request future is resolved exactly once: by the pod's reply, or with `UpstreamClosed`
  when the connection ends (EOF, send failure, `aclose()`); nothing waits forever on a dead pod.
- The reader task is owned by the upstream; `on_close` runs once, after pending calls failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from acp.http.protocol import method_requires_session_header

from router.acp.config import HTTP, WS
from router.acp.jsonrpc import Message, is_response

log = logging.getLogger("macp_router.acp.upstream")


OnMessage = Callable[["Upstream", Message], Awaitable[None]]
OnClose = Callable[["Upstream"], None]


class UpstreamClosed(ConnectionError):
    """The connection to the pod ended (or never opened) before the pod answered."""

    def __init__(self, pod: str, reason: str, *, sent: bool = False) -> None:
        super().__init__(f"pod {pod}: {reason}")
        self.pod = pod
        self.reason = reason
        self.sent = sent
        """True when the request may have reached the pod (it must not be re-sent blindly)."""


class UpstreamRefused(Exception):
    """The pod's HTTP server answered a POST with a 4xx: the pod is up, the call was refused.

    With acp 0.12.1 pods over `http` this is what a session-scoped call on a session the pod
    did not create on this connection gets (404 "Unknown session id"), e.g. after a load.
    """

    def __init__(self, pod: str, status: int, method: str) -> None:
        super().__init__(f"pod {pod} refused {method} with HTTP {status}")
        self.pod = pod
        self.status = status
        self.method = method


def _refusal(
    pod: str, transport: str, exc: Exception, method: str | None
) -> UpstreamRefused | None:
    status = getattr(exc, "status_code", None)
    if (transport == HTTP and isinstance(status, int) and 400 <= status < 500
            and method_requires_session_header(method)):
        # The connection is fine (a dead one ends its SSE stream and closes the upstream).
        return UpstreamRefused(pod, status, method or "")
    return None


def ws_url(url: str) -> str:
    if url.startswith("https://"):
        return "wss://" + url[len("https://"):]
    if url.startswith("http://"):
        return "ws://" + url[len("http://"):]
    return url


async def open_transport(
    url: str, transport: str, http_client: httpx.AsyncClient | None, timeout_s: float
) -> Any:
    """An acp `Transport` (send/receive/close of JSON-RPC dicts) to the pod at `url`."""
    if transport == WS:
        from acp.ws import create_websocket_stream

        return await asyncio.wait_for(create_websocket_stream(ws_url(url)), timeout_s)
    if transport == HTTP:
        from acp.http import create_http_stream

        return create_http_stream(url, client=http_client)
    raise ValueError(f"unknown ACP upstream transport {transport!r}; choose ws or http")


class Upstream:
    def __init__(
        self,
        pod: str,
        url: str,
        *,
        transport: str = WS,
        http_client: httpx.AsyncClient | None = None,
        on_message: OnMessage | None = None,
        on_close: OnClose | None = None,
        connect_timeout_s: float = 2.0,
    ) -> None:
        self.pod = pod
        self.url = url
        self.transport_name = transport
        self._http_client = http_client
        self._on_message = on_message
        self._on_close = on_close
        self.connect_timeout_s = connect_timeout_s
        self._transport: Any = None
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.closed = False
        self.close_reason = ""
        self.init_result: dict[str, Any] = {}
        self.last_active = time.monotonic()
        """When a message last went to or came from the pod."""

    def __repr__(self) -> str:
        return f"Upstream({self.pod}, closed={self.closed}, pending={len(self._pending)})"

    def idle_for(self, now: float) -> float:
        """Seconds since the last message either way; 0 while a call waits for its answer."""
        return 0.0 if self._pending else now - self.last_active

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self, init_params: dict[str, Any]) -> dict[str, Any]:
        """Connect and `initialize`; returns the pod's initialize result. Raises UpstreamClosed."""
        try:
            self._transport = await open_transport(
                self.url, self.transport_name, self._http_client, self.connect_timeout_s
            )
        except Exception as exc:  # OSError, TimeoutError, websockets' and httpx's errors
            await self._finish(f"cannot connect to {self.url}: {exc!r}")
            raise UpstreamClosed(self.pod, f"cannot connect to {self.url}: {exc}") from None
        self._reader = asyncio.create_task(self._read_loop(), name=f"acp-upstream:{self.pod}")
        try:
            reply = await self.call("initialize", init_params, self.connect_timeout_s)
        except TimeoutError:
            await self.aclose("initialize timed out")
            raise UpstreamClosed(
                self.pod, f"did not answer initialize within {self.connect_timeout_s:g} s"
            ) from None
        except UpstreamClosed:
            await self.aclose("initialize failed")
            raise
        if "error" in reply:
            await self.aclose("initialize rejected")
            raise UpstreamClosed(self.pod, f"initialize rejected: {reply['error']}")
        result = reply.get("result")
        self.init_result = result if isinstance(result, dict) else {}
        return self.init_result

    async def aclose(self, reason: str = "closed by the router") -> None:
        transport, self._transport = self._transport, None
        await self._finish(reason)
        if transport is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(transport.close(), 2.0)
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(UpstreamClosed(self.pod, reason, sent=True))
                future.exception()  # retrieved: nobody may be waiting any more
        if self._on_close is not None:
            try:
                self._on_close(self)
            except Exception:
                log.exception("on_close callback for pod %s failed", self.pod)

    # -- calls -------------------------------------------------------------------------------
    async def request(self, method: str, params: Any) -> asyncio.Future[Message]:
        """Send a request; returns the future of the pod's reply (result or error message).

        Raises `UpstreamClosed(sent=False)` when the request could not be handed to the pod.
        """
        if self.closed or self._transport is None:
            raise UpstreamClosed(self.pod, self.close_reason or "not connected")
        request_id = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        message: Message = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self.last_active = time.monotonic()
        try:
            await self._transport.send(message)
        except Exception as exc:
            self._pending.pop(request_id, None)
            future.cancel()
            refused = _refusal(self.pod, self.transport_name, exc, method)
            if refused is not None:
                raise refused from None
            reason = f"send failed: {exc}"
            await self.aclose(reason)
            raise UpstreamClosed(self.pod, reason) from None
        return future

    async def call(self, method: str, params: Any, timeout_s: float | None) -> Message:
        """`request` and wait for the reply (at most `timeout_s`); the slot is freed on timeout."""
        future = await self.request(method, params)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            self._forget(future)
            raise

    def _forget(self, future: asyncio.Future[Message]) -> None:
        for key, value in list(self._pending.items()):
            if value is future:
                del self._pending[key]
        if not future.done():
            future.cancel()

    async def send(self, message: Message) -> None:
        """Send a notification or a reply to the agent's own request, as is."""
        if self.closed or self._transport is None:
            raise UpstreamClosed(self.pod, self.close_reason or "not connected")
        self.last_active = time.monotonic()
        try:
            await self._transport.send(message)
        except Exception as exc:
            refused = _refusal(self.pod, self.transport_name, exc, message.get("method"))
            if refused is not None:
                raise refused from None
            reason = f"send failed: {exc}"
            await self.aclose(reason)
            raise UpstreamClosed(self.pod, reason) from None

    # -- the reader --------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        reason = "connection closed by the pod"
        try:
            while True:
                message = await self._transport.receive()
                if message is None:
                    break
                self.last_active = time.monotonic()
                if not isinstance(message, dict):
                    continue
                if is_response(message):
                    key = message.get("id")
                    future = (self._pending.pop(key, None)
                              if type(key) is int else None)  # we only send int ids
                    if future is not None and not future.done():
                        future.set_result(message)
                    continue
                if self._on_message is not None:
                    try:
                        await self._on_message(self, message)
                    except Exception:
                        log.exception("relaying a message from pod %s failed", self.pod)
        except asyncio.CancelledError:
            reason = "closed by the router"
            raise
        except Exception as exc:
            reason = f"connection to the pod failed: {exc!r}"
        finally:
            await self.aclose(reason)
