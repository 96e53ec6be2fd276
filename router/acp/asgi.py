"""Serve one ASGI app over HTTP/1.1 (+ WebSocket) with hypercorn, on a socket bound up front.

The front door and the simulated ACP pods both serve `acp.http.asgi.AcpAsgiApp`; hypercorn is
the ASGI server acp's ASGI module suggests. We bind (and listen on) the socket ourselves and
hand hypercorn its file descriptor, so `HOST:0` yields a known port before `start()` returns and
a restarted pod can take its old port back (SO_REUSEADDR).

Invariants:
- `start()` returns only once the socket is listening: a connect right after it queues in the
  backlog instead of being refused.
- The serving task is owned by this object; `aclose()` first ends every open WebSocket (the
  app sees `websocket.disconnect`, hypercorn sends the close frame), then asks hypercorn to shut
  down and waits for it (bounded by the graceful timeout plus a margin), then cancels it.
- The app can end one WebSocket the same way: code running for that socket's handler reads
  `websocket_ender()` (e.g. to close an idle client's socket later).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

from router.config import parse_host_port

log = logging.getLogger("macp_router.acp.asgi")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_WEBSOCKET_END: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "websocket_end", default=None)


def websocket_ender() -> Callable[[], None] | None:
    """Inside a WebSocket's handler: a function that ends this socket (the app's next receive
    is a disconnect, then hypercorn sends the close frame); None outside one."""
    return _WEBSOCKET_END.get()


class _EndWebSocketsOnClose:
    """ASGI middleware: once `closing` is set, every WebSocket's next receive is a disconnect.

    hypercorn does not end open WebSockets on shutdown; it cancels their tasks after the
    graceful timeout, which drops the TCP connection without a close frame.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.closing = False
        self._sockets: set[asyncio.Event] = set()

    def end_all(self) -> None:
        """Every open WebSocket's next receive is a disconnect (and every later one's)."""
        self.closing = True
        for ending in self._sockets:
            ending.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        ending = asyncio.Event()  # this socket's: set on shutdown, or by the app (idle)
        if self.closing:
            ending.set()

        async def receive_until_ending() -> dict[str, Any]:
            if ending.is_set():
                return {"type": "websocket.disconnect", "code": 1001}
            message = asyncio.ensure_future(receive())
            ended = asyncio.ensure_future(ending.wait())
            try:
                await asyncio.wait({message, ended}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
            if message.done():
                return message.result()
            message.cancel()
            return {"type": "websocket.disconnect", "code": 1001}

        self._sockets.add(ending)
        token = _WEBSOCKET_END.set(ending.set)
        try:
            await self.app(scope, receive_until_ending, send)
        finally:
            _WEBSOCKET_END.reset(token)
            self._sockets.discard(ending)


class AsgiServer:
    def __init__(
        self, app: Any, listen: str, *, name: str, graceful_timeout_s: float = 0.5
    ) -> None:
        self.app = app
        self.listen = listen
        self.name = name
        self.graceful_timeout_s = graceful_timeout_s
        self.host, self.port = parse_host_port(listen, "listen")
        self._stop = asyncio.Event()
        self._wrapper: _EndWebSocketsOnClose | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((self.host, self.port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        return sock

    async def start(self) -> None:
        """Bind and start serving; raises OSError when the address cannot be bound."""
        if self._task is not None:
            raise RuntimeError(f"{self.name} is already serving")
        sock = self._bind()
        self.port = sock.getsockname()[1]
        config = Config()
        # hypercorn wraps the descriptor in its own socket object and closes it on shutdown.
        config.bind = [f"fd://{sock.detach()}"]
        config.graceful_timeout = self.graceful_timeout_s
        config.accesslog = None
        config.errorlog = logging.getLogger(f"macp_router.acp.hypercorn.{self.name}")
        config.keep_alive_timeout = 30
        self._stop = asyncio.Event()
        self._wrapper = _EndWebSocketsOnClose(self.app)
        self._task = asyncio.create_task(
            serve(self._wrapper, config, shutdown_trigger=self._stop.wait),  # type: ignore[arg-type]
            name=f"asgi:{self.name}",
        )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        if self._wrapper is not None:
            self._wrapper.end_all()
            await asyncio.sleep(0)  # let the WebSocket handlers see their disconnect
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), self.graceful_timeout_s + 2.0)
        except TimeoutError:
            log.warning("%s: hypercorn did not stop in time; cancelling", self.name)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception as exc:  # a crashed server must not break shutdown
            log.warning("%s: hypercorn stopped with %r", self.name, exc)
