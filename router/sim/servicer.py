"""The gRPC glue of the simulated pod: `macp.v1.MACPRuntimeService` and grpc.health.v1 handlers.

Job: turn each RPC into a call on the pod's pieces (`Admission`, `SessionEngine`, `Registries`,
`LifecycleBus`, `SessionStream`) and their results into replies or statuses. Methods not defined
here answer UNIMPLEMENTED, as the runtime's unimplemented ones do.

Invariants:
- Every handler is wrapped: the call is counted (`pod.calls`), holds a per-connection slot
  (streams only while starting, as tonic), waits while `pod.hang` is set, records a client
  cancellation (`pod.cancelled_calls`) and sends an `Abort` as its status with the registry code
  in a `macp-error-code` trailer (a sim-only aid for tests; the router never reads it).
- Authentication happens before anything else a handler does (for RegisterPolicy /
  UnregisterPolicy after the read-only check, as the runtime).
- A WatchSessions subscriber is registered in the same loop step as its snapshot is taken,
  and headers are sent once subscribed.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health
from macp.v1 import core_pb2, core_pb2_grpc, policy_pb2

from router.sim.auth import bearer_token
from router.sim.mailbox import END, Lagged, Subscriber
from router.sim.protocol import INVALID_REQUEST, STREAM_LAGGED, Abort, status_error
from router.sim.stream import SessionStream

if TYPE_CHECKING:
    from router.sim.admission import Admission
    from router.sim.bus import LifecycleBus
    from router.sim.engine import SessionEngine
    from router.sim.limits import ConnectionLimits
    from router.sim.record import SessionRecord
    from router.sim.registries import Registries


class SimPod(Protocol):
    """What the servicer uses of `router.sim.pod.SimPod` (a Protocol, so this module does not
    import the pod that imports it)."""

    admission: Admission
    bus: LifecycleBus
    engine: SessionEngine
    registries: Registries
    limits: ConnectionLimits
    calls: collections.Counter[str]
    cancelled_calls: collections.Counter[str]
    sessions: dict[str, SessionRecord]
    hang: bool

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]: ...

    def note_cancelled(self, method: str) -> None: ...

    async def _hang_forever(self) -> None: ...


def _token_of(context: grpc.aio.ServicerContext) -> str | None:
    """The call's bearer token as the runtime reads it (None when absent)."""
    return bearer_token(context.invocation_metadata())


F = TypeVar("F", bound=Callable[..., Any])


def _unary(fn: F) -> F:
    """Count the call, honour `hang`, record a client cancellation, send `Abort` statuses."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        pod = self.pod
        pod.calls[name] += 1
        try:
            async with pod.limits.slot(context):
                if pod.hang:
                    await pod._hang_forever()
                return await fn(self, request, context)
        except Abort as exc:
            await send_abort(context, exc)
        except asyncio.CancelledError:
            pod.note_cancelled(name)
            raise

    return wrapper  # type: ignore[return-value]


def _streaming(fn: F) -> F:
    """`_unary` for async-generator handlers (server and bidi streams)."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(
        self: Servicer, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        pod = self.pod
        pod.calls[name] += 1
        try:
            # tonic's per-connection limit holds a slot until the handler hands back its
            # response stream (right after auth), not for the stream's life.
            async with pod.limits.slot(context):
                pass
            if pod.hang:
                await pod._hang_forever()
            async for item in fn(self, request, context):
                yield item
        except Abort as exc:
            await send_abort(context, exc)
        except Lagged:
            await send_abort(
                context,
                Abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{name} subscriber fell behind; resubscribe",
                    STREAM_LAGGED,
                ),
            )
        except asyncio.CancelledError:
            pod.note_cancelled(name)
            raise

    return wrapper  # type: ignore[return-value]


async def send_abort(context: grpc.aio.ServicerContext, exc: Abort) -> None:
    if exc.macp_code:
        context.set_trailing_metadata((("macp-error-code", exc.macp_code),))
    await context.abort(exc.code, exc.details)



class Health(health.aio.HealthServicer):
    """grpc.health.v1 whose Check waits for a connection slot like every runtime request."""

    def __init__(self, pod: SimPod) -> None:
        super().__init__()
        self._pod = pod

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with self._pod.limits.slot(context):
            return await super().Check(request, context)


class Servicer(core_pb2_grpc.MACPRuntimeServiceServicer):
    """Thin gRPC adapter over `SimPod`; methods not defined here answer UNIMPLEMENTED."""

    def __init__(self, pod: SimPod) -> None:
        self.pod = pod

    # ── handshake & discovery ─────────────────────────────────────────
    @_unary
    async def Initialize(
        self, request: core_pb2.InitializeRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.InitializeResponse:
        return self.pod.registries.initialize(request)

    @_unary
    async def GetManifest(
        self, request: core_pb2.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.GetManifestResponse:
        return self.pod.registries.get_manifest(request)

    @_unary
    async def ListModes(
        self, request: core_pb2.ListModesRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.ListModesResponse:
        return core_pb2.ListModesResponse(modes=self.pod.registries.mode_descriptors())

    @_unary
    async def ListRoots(
        self, request: core_pb2.ListRootsRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.ListRootsResponse:
        return core_pb2.ListRootsResponse()

    # ── sessions ───────────────────────────────────────────────────────
    @_unary
    async def Send(
        self, request: core_pb2.SendRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.SendResponse:
        if not request.HasField("envelope"):
            raise status_error(
                grpc.StatusCode.INVALID_ARGUMENT,
                "SendRequest must contain an envelope",
                INVALID_REQUEST,
            )
        return core_pb2.SendResponse(ack=self.pod.engine.send(request.envelope, _token_of(context)))

    @_unary
    async def GetSession(
        self, request: core_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.GetSessionResponse:
        rec = self.pod.engine.access(request.session_id, _token_of(context))
        out = core_pb2.GetSessionResponse()
        out.metadata.CopyFrom(rec.metadata)
        return out

    @_unary
    async def CancelSession(
        self, request: core_pb2.CancelSessionRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.CancelSessionResponse:
        ack = self.pod.engine.control(request.session_id, _token_of(context), "cancel")
        return core_pb2.CancelSessionResponse(ack=ack)

    @_unary
    async def SuspendSession(
        self, request: core_pb2.SuspendSessionRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.SuspendSessionResponse:
        ack = self.pod.engine.control(request.session_id, _token_of(context), "suspend")
        return core_pb2.SuspendSessionResponse(ack=ack)

    @_unary
    async def ResumeSession(
        self, request: core_pb2.ResumeSessionRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.ResumeSessionResponse:
        ack = self.pod.engine.control(request.session_id, _token_of(context), "resume")
        return core_pb2.ResumeSessionResponse(ack=ack)

    @_unary
    async def ListSessions(
        self, request: core_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.ListSessionsResponse:
        self.pod.admission.authenticate(_token_of(context))
        return self.pod.engine.list_sessions()

    @_streaming
    async def WatchSessions(
        self, request: core_pb2.WatchSessionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[core_pb2.WatchSessionsResponse]:
        pod = self.pod
        pod.admission.authenticate(_token_of(context))
        sub = Subscriber()
        # Taken together with the subscription (same loop step): no gap, no duplicate.
        snapshot = pod.bus.snapshot(pod.sessions.values())
        pod.bus.session_watchers.add(sub)
        try:
            # Headers once subscribed, as tonic sends them when the handler returns.
            await context.send_initial_metadata(())
            for item in snapshot:
                yield item
            async for item in sub.items_until_closed():
                yield item
        finally:
            pod.bus.session_watchers.discard(sub)

    @_streaming
    async def WatchSignals(
        self, request: core_pb2.WatchSignalsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[core_pb2.WatchSignalsResponse]:
        pod = self.pod
        pod.admission.authenticate(_token_of(context))
        sub = Subscriber()
        pod.bus.signal_watchers.add(sub)  # subscribed before the headers tell the client so
        try:
            await context.send_initial_metadata(())
            async for item in sub.items_until_closed():
                yield item
        finally:
            pod.bus.signal_watchers.discard(sub)

    @_streaming
    async def StreamSession(
        self,
        request_iterator: AsyncIterator[core_pb2.StreamSessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[core_pb2.StreamSessionResponse]:
        pod = self.pod
        # Before any frame, as the runtime.
        identity = pod.admission.authenticate(_token_of(context))
        await context.send_initial_metadata(())
        stream = SessionStream(pod.engine, identity)
        reader = pod.spawn(stream.read(request_iterator))
        try:
            async for item in stream.out.items_until_closed():
                if isinstance(item, Abort):
                    raise item
                if item is END:
                    return
                yield item
        finally:
            reader.cancel()
            stream.unbind()

    # ── registries ─────────────────────────────────────────────────────
    @_unary
    async def ListExtModes(
        self, request: core_pb2.ListExtModesRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.ListExtModesResponse:
        return core_pb2.ListExtModesResponse(modes=list(self.pod.registries.ext_modes.values()))

    @_unary
    async def RegisterExtMode(
        self, request: core_pb2.RegisterExtModeRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.RegisterExtModeResponse:
        self.pod.admission.authorize_registry(_token_of(context))
        return self.pod.registries.register_ext_mode(request.mode_descriptor)

    @_unary
    async def UnregisterExtMode(
        self, request: core_pb2.UnregisterExtModeRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.UnregisterExtModeResponse:
        self.pod.admission.authorize_registry(_token_of(context))
        return self.pod.registries.unregister_ext_mode(request.mode)

    @_unary
    async def PromoteMode(
        self, request: core_pb2.PromoteModeRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.PromoteModeResponse:
        self.pod.admission.authorize_registry(_token_of(context))
        return self.pod.registries.promote_mode(request.mode, request.promoted_mode_name)

    @_unary
    async def RegisterPolicy(
        self, request: policy_pb2.RegisterPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.RegisterPolicyResponse:
        self.pod.registries.check_policies_writable()
        self.pod.admission.authorize_registry(_token_of(context))
        return self.pod.registries.register_policy(request.policy_descriptor)

    @_unary
    async def UnregisterPolicy(
        self, request: policy_pb2.UnregisterPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.UnregisterPolicyResponse:
        self.pod.registries.check_policies_writable()
        self.pod.admission.authorize_registry(_token_of(context))
        return self.pod.registries.unregister_policy(request.policy_id)

    @_unary
    async def GetPolicy(
        self, request: policy_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.GetPolicyResponse:
        self.pod.admission.authenticate(_token_of(context))
        return self.pod.registries.get_policy(request.policy_id)

    @_unary
    async def ListPolicies(
        self, request: policy_pb2.ListPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.ListPoliciesResponse:
        self.pod.admission.authenticate(_token_of(context))
        return self.pod.registries.list_policies(request.mode)
