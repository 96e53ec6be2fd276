"""A lean ACP client for load: acp's own transports, a minimal JSON-RPC layer on top.

The `acp` package's `ClientSideConnection` validates every message with pydantic, runs each
notification in its own task and builds response models; at a few hundred prompts per second
that costs the generator more CPU than the hop it measures (2 cores shared by everything).
`AcpLoadConn` keeps acp's transports (`acp.ws.create_websocket_stream`, WebSocket, default;
`acp.http.create_http_stream`, Streamable HTTP: POST + SSE), so framing, headers and stream
handling are the library's, and replaces only the JSON-RPC bookkeeping: one reader task,
responses matched to futures by id, `session/update` notifications counted per session, agent
requests answered (`session/request_permission` -> allow, anything else -> -32601).

`check_with_acp_client()` drives the same target once with the real `acp` client (initialize,
new_session, prompt, `session/status` as a raw request), so every run also shows that what it
measures is what a stock ACP client gets. `AcpStockConn` makes the same calls through acp's
`ClientSideConnection` (`--acp-client acp`): what the lean client saves is then measured, not
assumed.

Error labels (what a failed op reports): `RPC_<code>` for a JSON-RPC error, `STOP_<reason>`
for a prompt that did not end with `end_turn`, `MISSING_UPDATES` when the prompt's answer
arrived before all of its streamed chunks, `CLOSED` for a connection that ended,
`TIMEOUT` for a call past its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from typing import Any

WS = "ws"
HTTP = "http"
TRANSPORTS = (WS, HTTP)
CLIENT_INFO = {"name": "macp-loadtest", "title": "macp-router load test", "version": "0"}
INIT_PARAMS: dict[str, Any] = {
    "protocolVersion": 1,
    "clientCapabilities": {"fs": {"readTextFile": False, "writeTextFile": False},
                           "terminal": False},
    "clientInfo": CLIENT_INFO,
}


class AcpCallError(Exception):
    """A failed call; `code` is the op's error label."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


def ws_url(url: str) -> str:
    return "ws://" + url.removeprefix("http://") if url.startswith("http://") else url


async def open_transport(url: str, transport: str, timeout: float) -> Any:
    """An acp `Transport` (send/receive/close of JSON-RPC dicts) to `url` (http://HOST:PORT/acp)."""
    if transport == WS:
        from acp.ws import create_websocket_stream

        return await asyncio.wait_for(create_websocket_stream(ws_url(url)), timeout)
    if transport == HTTP:
        import httpx
        from acp.http import create_http_stream

        # HTTP/1.1 (acp's default client asks for h2, which only costs CPU here) and no read
        # timeout (SSE streams are long-lived); every call has its own deadline.
        client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=timeout),
                                   limits=httpx.Limits(max_connections=None))
        return create_http_stream(url, client=client)
    raise ValueError(f"transport must be one of {TRANSPORTS}")


class AcpLoadConn:
    """One ACP client connection: `call()` JSON-RPC requests, count streamed updates."""

    def __init__(self, transport: Any, name: str = "") -> None:
        self.transport = transport
        self.name = name
        self.updates: Counter[str] = Counter()
        self.agent_requests = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self._answers: set[asyncio.Task[None]] = set()
        self.closed = False
        self.close_reason = ""

    @classmethod
    async def connect(cls, url: str, transport: str = WS, *, timeout: float = 5.0,
                      name: str = "") -> AcpLoadConn:
        """Open the transport, start reading, `initialize`."""
        conn = cls(await open_transport(url, transport, timeout), name)
        conn._reader = asyncio.create_task(conn._read(), name=f"acp-load-reader:{name}")
        try:
            await conn.call("initialize", INIT_PARAMS, timeout)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _read(self) -> None:
        pending = self._pending
        updates = self.updates
        try:
            while True:
                message = await self.transport.receive()
                if message is None:
                    self.close_reason = "end of stream"
                    return
                method = message.get("method")
                if method is None:
                    future = pending.pop(message.get("id"), None)  # type: ignore[arg-type]
                    if future is not None and not future.done():
                        future.set_result(message)
                elif method == "session/update":
                    params = message.get("params")
                    if isinstance(params, dict):
                        updates[params.get("sessionId", "")] += 1
                elif "id" in message:
                    self._answer_agent(message)
        except Exception as exc:  # a broken transport ends the connection, never the run
            self.close_reason = repr(exc)
        finally:
            self.closed = True
            for future in pending.values():
                if not future.done():
                    future.set_exception(AcpCallError("CLOSED", self.close_reason))
            pending.clear()

    def _answer_agent(self, message: dict[str, Any]) -> None:
        self.agent_requests += 1
        if message["method"] == "session/request_permission":
            reply: dict[str, Any] = {"jsonrpc": "2.0", "id": message["id"], "result": {
                "outcome": {"outcome": "selected", "optionId": "allow"}}}
        else:
            reply = {"jsonrpc": "2.0", "id": message["id"],
                     "error": {"code": -32601, "message": "Method not found"}}
        task = asyncio.create_task(self.transport.send(reply))
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def call(self, method: str, params: Any, timeout: float) -> Any:
        """The result of `method`; AcpCallError (`RPC_<code>`, `CLOSED`) or TimeoutError."""
        if self.closed:
            raise AcpCallError("CLOSED", self.close_reason)
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self.transport.send(
                {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
            async with asyncio.timeout(timeout):
                reply = await future
        except (ConnectionError, OSError) as exc:
            raise AcpCallError("CLOSED", repr(exc)) from None
        except Exception as exc:
            if isinstance(exc, (AcpCallError, TimeoutError)):
                raise
            # acp's HTTP transport raises AcpHttpStatusError for a refused POST
            status = getattr(exc, "status_code", None)
            raise AcpCallError(f"HTTP_{status}" if status else type(exc).__name__,
                               str(exc)) from None
        finally:
            self._pending.pop(request_id, None)
        error = reply.get("error")
        if error is not None:
            code = error.get("code") if isinstance(error, dict) else None
            raise AcpCallError(f"RPC_{code}", str(error.get("message", ""))
                               if isinstance(error, dict) else str(error))
        return reply.get("result")

    # -- the calls the load test makes -------------------------------------------------------
    async def new_session(self, timeout: float, cwd: str = "/work") -> str:
        result = await self.call("session/new", {"cwd": cwd, "mcpServers": []}, timeout)
        return str(result["sessionId"])

    async def prompt(self, sid: str, text: str, timeout: float, chunks: int) -> None:
        """One prompt round trip: its `chunks` streamed updates consumed, `end_turn` back."""
        before = self.updates[sid]
        result = await self.call(
            "session/prompt", {"sessionId": sid, "prompt": [{"type": "text", "text": text}]},
            timeout)
        stop = result.get("stopReason") if isinstance(result, dict) else None
        if stop != "end_turn":
            raise AcpCallError(f"STOP_{stop}")
        if self.updates[sid] - before < chunks:
            raise AcpCallError("MISSING_UPDATES",
                               f"{self.updates[sid] - before} of {chunks} chunks")

    async def status(self, sid: str, timeout: float) -> str:
        result = await self.call("session/status", {"sessionId": sid}, timeout)
        return str(result.get("status")) if isinstance(result, dict) else "?"

    async def close(self) -> None:
        """Close the transport (HTTP: DELETE the connection); bounded, never raises."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.transport.close(), 5.0)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        for task in list(self._answers):
            task.cancel()
        client = getattr(self.transport, "_client", None)  # the HTTP transport's httpx client
        if client is not None and hasattr(client, "aclose"):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 5.0)


class _Recorder:
    """The client side for acp's ClientSideConnection: counts updates, allows permissions."""

    def __init__(self) -> None:
        self.updates: Counter[str] = Counter()

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        self.updates[session_id] += 1

    async def request_permission(self, *args: Any, **kwargs: Any) -> Any:
        from acp.schema import AllowedOutcome, RequestPermissionResponse

        return RequestPermissionResponse(
            outcome=AllowedOutcome(outcome="selected", option_id="allow"))


class AcpStockConn:
    """`AcpLoadConn`'s calls through the stock `acp` client (`acp.connect_to_agent`)."""

    def __init__(self, conn: Any, recorder: _Recorder, transport: Any) -> None:
        self.conn = conn
        self.recorder = recorder
        self.transport = transport

    @classmethod
    async def connect(cls, url: str, transport: str = WS, *, timeout: float = 5.0,
                      name: str = "") -> AcpStockConn:
        import acp

        recorder = _Recorder()
        stream = await open_transport(url, transport, timeout)
        self = cls(acp.connect_to_agent(recorder, stream), recorder, stream)  # type: ignore[arg-type]
        try:
            await self._call(self.conn.initialize(protocol_version=1), timeout)
        except BaseException:
            await self.close()
            raise
        return self

    @staticmethod
    async def _call(coro: Any, timeout: float) -> Any:
        from acp.exceptions import RequestError

        try:
            return await asyncio.wait_for(coro, timeout)
        except RequestError as exc:
            raise AcpCallError(f"RPC_{exc.code}", str(exc)) from None
        except (ConnectionError, OSError) as exc:
            raise AcpCallError("CLOSED", repr(exc)) from None

    async def new_session(self, timeout: float, cwd: str = "/work") -> str:
        reply = await self._call(self.conn.new_session(cwd=cwd, mcp_servers=[]), timeout)
        return str(reply.session_id)

    async def prompt(self, sid: str, text: str, timeout: float, chunks: int) -> None:
        from acp import helpers

        before = self.recorder.updates[sid]
        reply = await self._call(
            self.conn.prompt(session_id=sid, prompt=[helpers.text_block(text)]), timeout)
        if reply.stop_reason != "end_turn":
            raise AcpCallError(f"STOP_{reply.stop_reason}")
        if self.recorder.updates[sid] - before < chunks:
            raise AcpCallError("MISSING_UPDATES",
                               f"{self.recorder.updates[sid] - before} of {chunks} chunks")

    async def status(self, sid: str, timeout: float) -> str:
        # not in acp 0.12.1's client API: a raw request, as router.acp.demo sends it
        reply = await self._call(
            self.conn._conn.send_request("session/status", {"sessionId": sid}), timeout)
        return str(reply.get("status")) if isinstance(reply, dict) else "?"

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.conn.close(), 5.0)
        client = getattr(self.transport, "_client", None)
        if client is not None and hasattr(client, "aclose"):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 5.0)


CLIENTS: dict[str, type[AcpLoadConn] | type[AcpStockConn]] = {
    "lean": AcpLoadConn, "acp": AcpStockConn}


def error_label(exc: BaseException) -> str:
    if isinstance(exc, AcpCallError):
        return exc.code
    if isinstance(exc, TimeoutError):
        return "TIMEOUT"
    return type(exc).__name__


async def check_with_acp_client(url: str, transport: str, timeout: float) -> dict[str, Any]:
    """One flow with the real `acp` client against `url`: what a stock client gets.

    initialize, session/new, session/prompt (chunks streamed back), session/status (raw
    request: not in acp 0.12.1's client API). Raises on any failure.
    """
    import acp
    from acp import helpers

    class Recorder:
        def __init__(self) -> None:
            self.chunks = 0

        async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
            self.chunks += 1

        async def request_permission(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("no permission request expected")

    recorder = Recorder()
    stream = await open_transport(url, transport, timeout)
    conn = acp.connect_to_agent(recorder, stream)  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(conn.initialize(protocol_version=1), timeout)
        new = await asyncio.wait_for(conn.new_session(cwd="/work", mcp_servers=[]), timeout)
        sid = str(new.session_id)
        reply = await asyncio.wait_for(
            conn.prompt(session_id=sid, prompt=[helpers.text_block("hello")]), timeout)
        status = await asyncio.wait_for(
            conn._conn.send_request("session/status", {"sessionId": sid}), timeout)
        return {"stop_reason": str(reply.stop_reason), "chunks": recorder.chunks,
                "status": str(status["status"])}
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), timeout)
        client = getattr(stream, "_client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), timeout)
