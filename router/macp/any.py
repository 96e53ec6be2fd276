"""Any-class MACP calls: requests no session owns, answered by one healthy pod.

`GetManifest`, `ListModes`, ambient stream frames and the like go to one healthy pod (round
robin) unread, and the caller gets that pod's own answer.

Invariants:
- An any-class request is never parsed: its bytes go to one pod as they came.
- No healthy pod: UNAVAILABLE naming every pod and why it is down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from router.core.call import Call
from router.macp.backend import MacpBackend, forwardable, no_pod_message, upstream_abort
from router.macp.streams import relay_server_stream
from router.pods import PodSet


class AnyCalls:
    """Unary, server-streaming and client-streaming calls for any healthy pod."""

    def __init__(self, backend: MacpBackend) -> None:
        self.backend = backend

    async def unary(self, call: Call, request: bytes) -> bytes:
        pod = self.backend.any_pod(call.method)
        call.pod = pod.name
        return await self.backend.forward(call, pod.name, request)

    async def server_stream(self, call: Call, request: bytes) -> None:
        pod = self.backend.any_pod(call.method)
        call.pod = pod.name
        await relay_server_stream(pod, call, request)


def client_stream_handler(pods: PodSet, path: str, method: str):  # type: ignore[no-untyped-def]
    """A client-streaming call: the request stream goes to one healthy pod as it comes."""

    async def behavior(request_iterator: AsyncIterator[bytes],
                       context: grpc.aio.ServicerContext) -> bytes:
        pod = pods.any_healthy()
        if pod is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, no_pod_message(pods, method))
        assert pod is not None
        upstream = pod.stream_unary(path)(
            request_iterator,
            metadata=forwardable(context.invocation_metadata()),
            timeout=context.time_remaining(),
        )
        try:
            return await upstream
        except grpc.aio.AioRpcError as exc:
            abort = upstream_abort(pod, exc)
            await context.abort(abort.code, abort.details, abort.trailing)
            raise

    return behavior
