"""A bare passthrough proxy: the practical limit of one Python gRPC hop (the router's yardstick).

It serves every method of `macp.v1.MACPRuntimeService` with a raw-bytes grpc.aio generic
handler and forwards each call to ONE upstream: no parsing, no routing, no cache. Unary
methods are forwarded unary-unary; every streaming method (bidi StreamSession and the
server-streaming Watch* methods, which are wire-compatible with a bidi call) stream-stream.
Request and response bytes are never deserialized (`request_deserializer` /
`response_serializer` None). Request metadata is forwarded minus transport headers, the
client's deadline is propagated, and the upstream's status, details and trailing metadata
come back unchanged. Plain grpc.aio on the default asyncio loop, one upstream channel.

The router does strictly more per call (extract the session id, look it up, choose a channel),
so its throughput over this proxy's is the router's routing overhead; the goal is >= 0.85x
(`loadtest.report.quality_bars`).

`SyncPassthrough` is the same hop on grpc's synchronous API (a thread pool server and one
sync channel): grpc's C-core threads poll and do the I/O and each call runs in a pool thread,
blocking on the upstream call. It is a prototype leg (`run --sync-passthrough`) measuring
whether the synchronous stack beats grpc.aio per call on this machine (issue 16).

Run standalone: `python -m loadtest passthrough --listen 127.0.0.1:PORT --upstream HOST:PORT`
(`--mode sync` for the synchronous hop; prints one line containing `ready`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import grpc.aio
from macp.v1 import core_pb2

SERVICE = "macp.v1.MACPRuntimeService"
_DROP_HEADERS = frozenset({"user-agent", "content-type", "te", "host"})


def service_methods() -> dict[str, bool]:
    """Full method path -> True if the method streams in either direction."""
    desc = core_pb2.DESCRIPTOR.services_by_name["MACPRuntimeService"]
    return {
        f"/{SERVICE}/{m.name}": bool(m.client_streaming or m.server_streaming)
        for m in desc.methods
    }


def _forward_metadata(md: Any) -> tuple[tuple[str, str | bytes], ...]:
    return tuple(
        (k, v)
        for k, v in (md or ())
        if not k.startswith(":") and not k.startswith("grpc-") and k not in _DROP_HEADERS
    )


class _Forwarder(grpc.GenericRpcHandler):
    """Generic handler: method path -> raw-bytes forwarding handler for that method."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method, streaming in service_methods().items():
            if streaming:
                self._handlers[method] = grpc.stream_stream_rpc_method_handler(
                    self._stream_handler(channel.stream_stream(method))
                )
            else:
                self._handlers[method] = grpc.unary_unary_rpc_method_handler(
                    self._unary_handler(channel.unary_unary(method))
                )

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)  # None -> UNIMPLEMENTED

    @staticmethod
    def _unary_handler(upstream: grpc.aio.UnaryUnaryMultiCallable) -> Any:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            call = upstream(
                request,
                metadata=_forward_metadata(context.invocation_metadata()),
                timeout=context.time_remaining(),
            )
            try:
                response = await call
            except grpc.aio.AioRpcError as err:
                context.set_trailing_metadata(err.trailing_metadata() or ())
                await context.abort(err.code(), err.details() or "")
            trailing = await call.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(trailing)
            return response

        return handle

    @staticmethod
    def _stream_handler(upstream: grpc.aio.StreamStreamMultiCallable) -> Any:
        async def handle(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            call = upstream(
                metadata=_forward_metadata(context.invocation_metadata()),
                timeout=context.time_remaining(),
            )

            async def pump() -> None:
                async for request in requests:
                    await call.write(request)
                await call.done_writing()

            pumping = asyncio.create_task(pump())
            try:
                async for response in call:
                    yield response
                trailing = await call.trailing_metadata()
                if trailing:
                    context.set_trailing_metadata(trailing)
            except grpc.aio.AioRpcError as err:
                context.set_trailing_metadata(err.trailing_metadata() or ())
                await context.abort(err.code(), err.details() or "")
            finally:
                pumping.cancel()
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await pumping

        return handle


class Passthrough:
    """The bare proxy as an object: `await start()`, `.address`, `await stop()`."""

    def __init__(self, upstream: str, listen: str = "127.0.0.1:0") -> None:
        self.upstream = upstream
        self.listen = listen
        self.address = ""
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.upstream)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((_Forwarder(self._channel),))
        host = self.listen.rpartition(":")[0]
        port = server.add_insecure_port(self.listen)
        if not port:
            raise RuntimeError(f"passthrough could not bind {self.listen}")
        self.address = f"{host}:{port}"
        await server.start()
        self._server = server

    async def stop(self, grace: float | None = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


async def serve(listen: str, upstream: str) -> None:
    """Run the proxy until SIGTERM/SIGINT; prints a `ready` line with the bound address."""
    proxy = Passthrough(upstream, listen)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"passthrough ready on {proxy.address} -> {upstream}", flush=True)
    try:
        await stop.wait()
    finally:
        await proxy.stop()


class _SyncForwarder(grpc.GenericRpcHandler):
    """`_Forwarder` on the synchronous API: each call blocks a pool thread on the upstream."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method, streaming in service_methods().items():
            if streaming:
                self._handlers[method] = grpc.stream_stream_rpc_method_handler(
                    self._stream_handler(channel.stream_stream(method)))
            else:
                self._handlers[method] = grpc.unary_unary_rpc_method_handler(
                    self._unary_handler(channel.unary_unary(method)))

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)

    @staticmethod
    def _unary_handler(upstream: grpc.UnaryUnaryMultiCallable) -> Any:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                response, call = upstream.with_call(
                    request,
                    metadata=_forward_metadata(context.invocation_metadata()),
                    timeout=context.time_remaining(),
                )
            except grpc.RpcError as err:
                context.set_trailing_metadata(err.trailing_metadata() or ())  # type: ignore[attr-defined]
                context.abort(err.code(), err.details() or "")  # type: ignore[attr-defined]
            trailing = call.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(trailing)
            return response  # type: ignore[no-any-return]

        return handle

    @staticmethod
    def _stream_handler(upstream: grpc.StreamStreamMultiCallable) -> Any:
        def handle(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            call = upstream(requests, metadata=_forward_metadata(context.invocation_metadata()),
                            timeout=context.time_remaining())
            context.add_callback(call.cancel)
            try:
                yield from call
                trailing = call.trailing_metadata()
                if trailing:
                    context.set_trailing_metadata(trailing)
            except grpc.RpcError as err:
                context.set_trailing_metadata(err.trailing_metadata() or ())  # type: ignore[attr-defined]
                context.abort(err.code(), err.details() or "")  # type: ignore[attr-defined]

        return handle


class SyncPassthrough:
    """The bare hop on grpc's synchronous server and channel (see the module docstring)."""

    def __init__(self, upstream: str, listen: str = "127.0.0.1:0", threads: int = 64) -> None:
        self.upstream = upstream
        self.listen = listen
        self.threads = threads
        self.address = ""
        self._server: grpc.Server | None = None
        self._channel: grpc.Channel | None = None

    def start(self) -> None:
        self._channel = grpc.insecure_channel(self.upstream)
        server = grpc.server(ThreadPoolExecutor(max_workers=self.threads),
                             options=[("grpc.so_reuseport", 0)],
                             maximum_concurrent_rpcs=None)
        server.add_generic_rpc_handlers((_SyncForwarder(self._channel),))
        host = self.listen.rpartition(":")[0]
        port = server.add_insecure_port(self.listen)
        if not port:
            raise RuntimeError(f"sync passthrough could not bind {self.listen}")
        self.address = f"{host}:{port}"
        server.start()
        self._server = server

    def stop(self, grace: float | None = 0.5) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def serve_sync(listen: str, upstream: str, threads: int = 64) -> None:
    """`serve` for `SyncPassthrough`: until SIGTERM/SIGINT, a `ready` line once bound."""
    proxy = SyncPassthrough(upstream, listen, threads)
    proxy.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"sync passthrough ready on {proxy.address} -> {upstream}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        proxy.stop()
