"""A simulated MACP runtime pod: an in-memory `macp.v1.MACPRuntimeService` on grpc.aio.

Job: stand in for one real runtime pod (github multiagentcoordinationprotocol/runtime) in
tests, the demo and load tests, faithfully enough that the Python SDK and the router cannot tell
the difference on the paths the router cares about: session placement (SessionStart),
per-session routing (Send, StreamSession, GetSession, Cancel/Suspend/Resume), fan-out reads
(ListSessions paging, WatchSessions, WatchSignals) and broadcast registries (policies, ext modes).

Invariants:
- The event loop is the only lock: every state change and its lifecycle event happen in one
  synchronous step, so a WatchSessions subscriber registered together with its snapshot sees
  every later change exactly once and nothing twice.
- Protocol errors of Send come back inside a gRPC OK (`Ack.ok == false`, registry code in
  `Ack.error.code`); errors of the other RPCs are gRPC statuses carrying the registry code in
  the `macp-error-code` trailer, as runtime >= 0.9 does.
- A session id maps to one record for the pod's life; records are never deleted (terminal
  sessions stay listable and readable, like the runtime's registry).
- The per-call path is O(1) in the number of sessions (ListSessions is O(page)); no per-call
  logging. Persistence is write-behind with a short debounce and flushed on stop.
- Every task and timer the pod creates is referenced by the pod and cancelled on stop.

Instrumentation for tests: `calls` (Counter per method), `cancelled_calls` (Counter per method
of handlers that observed a client cancellation or deadline), `hang` (every MACP method awaits
forever while set; health is unaffected), `drop_watchers()`, `sessions` (sid -> SessionRecord).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2, policy_pb2

log = logging.getLogger("router.sim")

SERVICE_NAME = "macp.v1.MACPRuntimeService"
PROTOCOL_VERSION = "1.0"
RUNTIME_VERSION = "0.9.0-sim"
HALF_CLOSE_GRACE_S = 0.01

MODE_DECISION = "macp.mode.decision.v1"
MODE_PROPOSAL = "macp.mode.proposal.v1"
MODE_TASK = "macp.mode.task.v1"
MODE_HANDOFF = "macp.mode.handoff.v1"
MODE_QUORUM = "macp.mode.quorum.v1"
MODE_MULTI_ROUND = "ext.multi_round.v1"

# mode -> (message types, terminal message types); "Commitment" resolves every mode.
STANDARD_MODES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    MODE_DECISION: (("Proposal", "Evaluation", "Objection", "Vote", "Commitment"), ("Commitment",)),
    MODE_PROPOSAL: (
        ("Proposal", "CounterProposal", "Accept", "Reject", "Withdraw", "Commitment"),
        ("Commitment",),
    ),
    MODE_TASK: (
        (
            "TaskRequest",
            "TaskAccept",
            "TaskReject",
            "TaskUpdate",
            "TaskComplete",
            "TaskFail",
            "Commitment",
        ),
        ("Commitment",),
    ),
    MODE_HANDOFF: (
        ("HandoffOffer", "HandoffContext", "HandoffAccept", "HandoffDecline", "Commitment"),
        ("Commitment",),
    ),
    MODE_QUORUM: (
        ("ApprovalRequest", "Approve", "Reject", "Abstain", "Commitment"),
        ("Commitment",),
    ),
    MODE_MULTI_ROUND: (("Contribute", "Commitment"), ("Commitment",)),
}

MAX_TTL_MS = 24 * 60 * 60 * 1000
DEFAULT_MAX_SUSPEND_MS = 7 * 24 * 60 * 60 * 1000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
WATCH_QUEUE_LIMIT = 10_000
PERSIST_DEBOUNCE_S = 0.05

# Registry error codes (macp_sdk.errors / runtime macp-core error.rs).
SESSION_ALREADY_EXISTS = "SESSION_ALREADY_EXISTS"
SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
SESSION_NOT_OPEN = "SESSION_NOT_OPEN"
INVALID_ENVELOPE = "INVALID_ENVELOPE"
UNSUPPORTED_PROTOCOL_VERSION = "UNSUPPORTED_PROTOCOL_VERSION"
MODE_NOT_SUPPORTED = "MODE_NOT_SUPPORTED"
UNAUTHENTICATED = "UNAUTHENTICATED"
FORBIDDEN = "FORBIDDEN"
INVALID_REQUEST = "INVALID_REQUEST"
AGENT_NOT_FOUND = "AGENT_NOT_FOUND"
STREAM_LAGGED = "STREAM_LAGGED"

State = envelope_pb2.SessionState
OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
EXPIRED = envelope_pb2.SESSION_STATE_EXPIRED
SUSPENDED = envelope_pb2.SESSION_STATE_SUSPENDED
CANCELLED = envelope_pb2.SESSION_STATE_CANCELLED
TERMINAL = frozenset({RESOLVED, EXPIRED, CANCELLED})

Ev = core_pb2.SessionLifecycleEvent
EV_CREATED = Ev.EVENT_TYPE_CREATED
EV_RESOLVED = Ev.EVENT_TYPE_RESOLVED
EV_EXPIRED = Ev.EVENT_TYPE_EXPIRED
EV_SUSPENDED = Ev.EVENT_TYPE_SUSPENDED
EV_RESUMED = Ev.EVENT_TYPE_RESUMED
EV_CANCELLED = Ev.EVENT_TYPE_CANCELLED


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Sub:
    """A subscriber's mailbox: bounded, drained by one streaming handler.

    `push` never blocks; past `limit` pending items the subscriber is marked lagged and its
    stream ends with RESOURCE_EXHAUSTED (what the runtime does to a slow consumer).
    """

    __slots__ = ("closed", "event", "items", "lagged", "limit")

    def __init__(self, limit: int = WATCH_QUEUE_LIMIT) -> None:
        self.items: collections.deque[Any] = collections.deque()
        self.event = asyncio.Event()
        self.closed = False
        self.lagged = False
        self.limit = limit

    def push(self, item: Any) -> None:
        if self.closed or self.lagged:
            return
        if len(self.items) >= self.limit:
            self.lagged = True
        else:
            self.items.append(item)
        self.event.set()

    def close(self, *, discard: bool = False) -> None:
        if discard:
            self.items.clear()
        self.closed = True
        self.event.set()

    async def items_until_closed(self) -> AsyncIterator[Any]:
        """Yield pushed items in order; return once closed and drained; raise if lagged."""
        while True:
            while self.items:
                yield self.items.popleft()
            if self.lagged:
                raise _Lagged
            if self.closed:
                return
            self.event.clear()
            await self.event.wait()


class _Lagged(Exception):
    pass


class _Abort(Exception):
    """A gRPC status to end the current RPC with (raised inside helpers, sent by handlers)."""

    def __init__(self, code: grpc.StatusCode, details: str, macp_code: str | None = None):
        super().__init__(details)
        self.code = code
        self.details = details
        self.macp_code = macp_code


_END = object()


@dataclass(slots=True, eq=False)
class SessionRecord:
    """One session held by the pod.

    `metadata` is the live SessionMetadata (mutated in place; copy before handing it out of the
    event loop). `log` holds accepted envelopes in order (sequence = index + 1, SessionStart
    first). `seen` is the message-id dedup set.
    """

    metadata: core_pb2.SessionMetadata
    members: frozenset[str]
    seen: set[str] = field(default_factory=set)
    log: list[envelope_pb2.Envelope] = field(default_factory=list)
    subs: set[_Sub] = field(default_factory=set)
    max_suspend_ms: int = DEFAULT_MAX_SUSPEND_MS
    banked_ms: int = 0
    activity: dict[str, core_pb2.ParticipantActivity] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None

    @property
    def session_id(self) -> str:
        return self.metadata.session_id

    @property
    def state(self) -> int:
        return self.metadata.state

    @property
    def initiator(self) -> str:
        return self.metadata.initiator


def _ack(
    env: envelope_pb2.Envelope,
    *,
    state: int = 0,
    duplicate: bool = False,
    code: str | None = None,
    message: str = "",
) -> envelope_pb2.Ack:
    ack = envelope_pb2.Ack(
        ok=code is None,
        duplicate=duplicate,
        message_id=env.message_id,
        session_id=env.session_id,
        accepted_at_unix_ms=now_ms(),
        session_state=state,
    )
    if code is not None:
        ack.error.code = code
        ack.error.message = message or code
        ack.error.session_id = env.session_id
        ack.error.message_id = env.message_id
    return ack


def _control_ack(
    session_id: str, *, state: int = 0, code: str | None = None, message: str = ""
) -> envelope_pb2.Ack:
    return _ack(
        envelope_pb2.Envelope(session_id=session_id), state=state, code=code, message=message
    )


def _identity_of(context: grpc.aio.ServicerContext) -> str:
    """The bearer token of the call ("" when absent)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if value[:7].lower() == "bearer ":
                return value[7:].strip()
            return ""
    return ""


F = TypeVar("F", bound=Callable[..., Any])


def _unary(fn: F) -> F:
    """Count the call, honour `hang`, record a client cancellation, send `_Abort` statuses."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: _Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        pod = self.pod
        pod.calls[name] += 1
        try:
            if pod.hang:
                await pod._hang_forever()
            return await fn(self, request, context)
        except _Abort as exc:
            await _send_abort(context, exc)
        except asyncio.CancelledError:
            pod._note_cancelled(name)
            raise

    return wrapper  # type: ignore[return-value]


def _streaming(fn: F) -> F:
    """`_unary` for async-generator handlers (server and bidi streams)."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(
        self: _Servicer, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        pod = self.pod
        pod.calls[name] += 1
        try:
            if pod.hang:
                await pod._hang_forever()
            async for item in fn(self, request, context):
                yield item
        except _Abort as exc:
            await _send_abort(context, exc)
        except _Lagged:
            await _send_abort(
                context,
                _Abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{name} subscriber fell behind; resubscribe",
                    STREAM_LAGGED,
                ),
            )
        except asyncio.CancelledError:
            pod._note_cancelled(name)
            raise

    return wrapper  # type: ignore[return-value]


async def _send_abort(context: grpc.aio.ServicerContext, exc: _Abort) -> None:
    if exc.macp_code:
        context.set_trailing_metadata((("macp-error-code", exc.macp_code),))
    await context.abort(exc.code, exc.details)


def _status(code: grpc.StatusCode, details: str, macp_code: str | None = None) -> _Abort:
    return _Abort(code, details, macp_code)


def _not_found(session_id: str) -> _Abort:
    return _Abort(grpc.StatusCode.NOT_FOUND, f"Session '{session_id}' not found", SESSION_NOT_FOUND)


class _Servicer(core_pb2_grpc.MACPRuntimeServiceServicer):
    """Thin gRPC adapter over `SimPod`; methods not defined here answer UNIMPLEMENTED."""

    def __init__(self, pod: SimPod) -> None:
        self.pod = pod

    # ── handshake & discovery ─────────────────────────────────────────
    @_unary
    async def Initialize(
        self, request: core_pb2.InitializeRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.InitializeResponse:
        return self.pod._initialize(request)

    @_unary
    async def GetManifest(
        self, request: core_pb2.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.GetManifestResponse:
        return self.pod._get_manifest(request)

    @_unary
    async def ListModes(
        self, request: core_pb2.ListModesRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.ListModesResponse:
        return core_pb2.ListModesResponse(modes=self.pod._mode_descriptors())

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
            raise _status(
                grpc.StatusCode.INVALID_ARGUMENT,
                "SendRequest must contain an envelope",
                INVALID_REQUEST,
            )
        return core_pb2.SendResponse(ack=self.pod._process(request.envelope, _identity_of(context)))

    @_unary
    async def GetSession(
        self, request: core_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.GetSessionResponse:
        rec = self.pod._access(request.session_id, _identity_of(context))
        out = core_pb2.GetSessionResponse()
        out.metadata.CopyFrom(rec.metadata)
        return out

    @_unary
    async def CancelSession(
        self, request: core_pb2.CancelSessionRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.CancelSessionResponse:
        ack = self.pod._control(request.session_id, _identity_of(context), "cancel")
        return core_pb2.CancelSessionResponse(ack=ack)

    @_unary
    async def SuspendSession(
        self, request: core_pb2.SuspendSessionRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.SuspendSessionResponse:
        ack = self.pod._control(request.session_id, _identity_of(context), "suspend")
        return core_pb2.SuspendSessionResponse(ack=ack)

    @_unary
    async def ResumeSession(
        self, request: core_pb2.ResumeSessionRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.ResumeSessionResponse:
        ack = self.pod._control(request.session_id, _identity_of(context), "resume")
        return core_pb2.ResumeSessionResponse(ack=ack)

    @_unary
    async def ListSessions(
        self, request: core_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.ListSessionsResponse:
        self.pod._authenticate(_identity_of(context))
        return self.pod._list_sessions(request)

    @_streaming
    async def WatchSessions(
        self, request: core_pb2.WatchSessionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[core_pb2.WatchSessionsResponse]:
        pod = self.pod
        pod._authenticate(_identity_of(context))
        await context.send_initial_metadata(())  # headers now, as tonic does
        sub = _Sub()
        snapshot = pod._snapshot_events()  # taken together with the subscription: no gap
        pod._session_watchers.add(sub)
        try:
            for item in snapshot:
                yield item
            async for item in sub.items_until_closed():
                yield item
        finally:
            pod._session_watchers.discard(sub)

    @_streaming
    async def WatchSignals(
        self, request: core_pb2.WatchSignalsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[core_pb2.WatchSignalsResponse]:
        pod = self.pod
        pod._authenticate(_identity_of(context))
        await context.send_initial_metadata(())
        sub = _Sub()
        pod._signal_watchers.add(sub)
        try:
            async for item in sub.items_until_closed():
                yield item
        finally:
            pod._signal_watchers.discard(sub)

    @_streaming
    async def StreamSession(
        self,
        request_iterator: AsyncIterator[core_pb2.StreamSessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[core_pb2.StreamSessionResponse]:
        pod = self.pod
        await context.send_initial_metadata(())
        stream = _SessionStream(pod, _identity_of(context))
        reader = pod._spawn(stream.read(request_iterator))
        try:
            async for item in stream.out.items_until_closed():
                if isinstance(item, _Abort):
                    raise item
                if item is _END:
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
        return core_pb2.ListExtModesResponse(modes=list(self.pod.ext_modes.values()))

    @_unary
    async def RegisterExtMode(
        self, request: core_pb2.RegisterExtModeRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.RegisterExtModeResponse:
        self.pod._authenticate(_identity_of(context))
        return self.pod._register_ext_mode(request.mode_descriptor)

    @_unary
    async def UnregisterExtMode(
        self, request: core_pb2.UnregisterExtModeRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.UnregisterExtModeResponse:
        self.pod._authenticate(_identity_of(context))
        return self.pod._unregister_ext_mode(request.mode)

    @_unary
    async def PromoteMode(
        self, request: core_pb2.PromoteModeRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.PromoteModeResponse:
        self.pod._authenticate(_identity_of(context))
        return self.pod._promote_mode(request.mode, request.promoted_mode_name)

    @_unary
    async def RegisterPolicy(
        self, request: policy_pb2.RegisterPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.RegisterPolicyResponse:
        self.pod._authenticate(_identity_of(context))
        return self.pod._register_policy(request.policy_descriptor)

    @_unary
    async def UnregisterPolicy(
        self, request: policy_pb2.UnregisterPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.UnregisterPolicyResponse:
        self.pod._authenticate(_identity_of(context))
        return self.pod._unregister_policy(request.policy_id)

    @_unary
    async def GetPolicy(
        self, request: policy_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.GetPolicyResponse:
        desc = self.pod.policies.get(request.policy_id)
        if desc is None:
            raise _status(
                grpc.StatusCode.NOT_FOUND,
                f"Policy '{request.policy_id}' not found",
                "UNKNOWN_POLICY_VERSION",
            )
        return policy_pb2.GetPolicyResponse(policy_descriptor=desc)

    @_unary
    async def ListPolicies(
        self, request: policy_pb2.ListPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.ListPoliciesResponse:
        descs = [
            d for d in self.pod.policies.values() if not request.mode or d.mode == request.mode
        ]
        return policy_pb2.ListPoliciesResponse(descriptors=descs)


class _SessionStream:
    """State of one StreamSession call: the bound session and the outgoing mailbox."""

    __slots__ = ("bound", "out", "pod", "sender", "token")

    def __init__(self, pod: SimPod, token: str) -> None:
        self.pod = pod
        self.token = token
        self.sender = pod._sender_of(token)
        self.out = _Sub()
        self.bound: SessionRecord | None = None

    def unbind(self) -> None:
        if self.bound is not None:
            self.bound.subs.discard(self.out)

    def _bind(self, rec: SessionRecord) -> None:
        if self.bound is None:
            self.bound = rec
            rec.subs.add(self.out)

    async def read(self, frames: AsyncIterator[core_pb2.StreamSessionRequest]) -> None:
        try:
            async for frame in frames:
                self._frame(frame)
            # grpc.aio ends a cancelled call's request stream just like a half-close, and the
            # cancellation reaches the handler a moment later; the real runtime tells the two
            # apart, so wait that moment before treating the end as a half-close.
            await asyncio.sleep(HALF_CLOSE_GRACE_S)
            self.out.push(_END)  # half-close: end OK after what is already queued
        except _Abort as exc:
            self.out.push(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken request stream; end the call rather than hang
            self.out.push(_Abort(grpc.StatusCode.INTERNAL, f"StreamSession read failed: {exc}"))

    def _frame(self, frame: core_pb2.StreamSessionRequest) -> None:
        pod = self.pod
        if frame.subscribe_session_id:
            if frame.HasField("envelope"):
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "StreamSessionRequest must not contain both envelope and subscribe_session_id",
                    INVALID_REQUEST,
                )
            sid = frame.subscribe_session_id
            if self.bound is not None and self.bound.session_id != sid:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "StreamSession may only carry envelopes for one session_id",
                    INVALID_REQUEST,
                )
            rec = pod._access_as(sid, self.sender)
            self._bind(rec)
            for env in rec.log[frame.after_sequence :]:
                self.out.push(core_pb2.StreamSessionResponse(envelope=env))
            return
        if not frame.HasField("envelope"):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "StreamSessionRequest must contain an envelope or subscribe_session_id",
                INVALID_REQUEST,
            )
        env = frame.envelope
        if not env.session_id:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "StreamSession requires a non-empty session_id",
                INVALID_ENVELOPE,
            )
        if self.bound is not None and self.bound.session_id != env.session_id:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "StreamSession may only carry envelopes for one session_id",
                INVALID_REQUEST,
            )
        if env.sender and env.sender != self.sender:
            raise _Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "envelope sender does not match the authenticated identity",
                UNAUTHENTICATED,
            )
        rec = pod.sessions.get(env.session_id)
        if rec is not None:
            self._bind(rec)
        ack = pod._process(env, self.token)
        if rec is None and ack.ok:
            rec = pod.sessions.get(env.session_id)
            if rec is not None and self.bound is None:
                # Started by this frame: bind, then deliver the start envelope just broadcast.
                self._bind(rec)
                self.out.push(core_pb2.StreamSessionResponse(envelope=rec.log[0]))
        if not ack.ok:
            self.out.push(core_pb2.StreamSessionResponse(error=ack.error))


class SimPod:
    """One simulated runtime pod. See the module docstring for behaviour and invariants.

    Public attributes: `name`, `port`, `address` (after start), `calls`, `cancelled_calls`,
    `hang`, `sessions`, `observers`, `policies`, `ext_modes`, `promoted_modes`.
    """

    def __init__(
        self,
        name: str,
        listen: str = "127.0.0.1:0",
        *,
        state_file: str | None = None,
        allow_insecure: bool = True,
        observers: Iterable[str] = ("router", "observer"),
        tokens: Mapping[str, str] | None = None,
        snapshot_terminal: bool = False,
        server_credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.name = name
        self.server_credentials = server_credentials
        self.listen = listen
        self.state_file = state_file
        self.allow_insecure = allow_insecure
        self.observers = frozenset(observers)
        self.tokens = dict(tokens) if tokens is not None else None
        self.snapshot_terminal = snapshot_terminal

        self.port: int = 0
        self.address: str = ""
        self.calls: collections.Counter[str] = collections.Counter()
        self.cancelled_calls: collections.Counter[str] = collections.Counter()
        self.hang = False

        self.sessions: dict[str, SessionRecord] = {}
        self._order: list[str] = []  # creation order: the ListSessions cursor space
        self.policies: dict[str, policy_pb2.PolicyDescriptor] = {}
        self.ext_modes: dict[str, core_pb2.ModeDescriptor] = {}
        self.promoted_modes: dict[str, core_pb2.ModeDescriptor] = {}

        self._session_watchers: set[_Sub] = set()
        self._signal_watchers: set[_Sub] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._stopping = False
        self._persist_handle: asyncio.TimerHandle | None = None
        self._persist_task: asyncio.Task[None] | None = None
        self._dirty = False
        self._dirty_sids: set[str] = set()
        self._encoded: dict[str, str] = {}  # sid -> its JSON entry in the state file

    # ── lifecycle ──────────────────────────────────────────────────────
    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"pod {self.name} already started")
        self._stopping = False
        self._reset_state()
        if self.state_file:
            self._load_state()
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        core_pb2_grpc.add_MACPRuntimeServiceServicer_to_server(_Servicer(self), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        listen = self.listen
        host, _, port_s = listen.rpartition(":")
        if self.port and port_s == "0":  # a restart keeps its address
            listen = f"{host}:{self.port}"
        if self.server_credentials is None:
            self.port = server.add_insecure_port(listen)
        else:
            self.port = server.add_secure_port(listen, self.server_credentials)
        if not self.port:
            raise RuntimeError(f"pod {self.name} could not bind {listen}")
        connect_host = "127.0.0.1" if host in ("", "0.0.0.0", "[::]", "::", "*") else host
        self.address = f"{connect_host}:{self.port}"
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._arm_all_timers()

    async def stop(self, grace: float | None = 0) -> None:
        server = self._server
        if server is None:
            return
        self._stopping = True
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        for sub in (*self._session_watchers, *self._signal_watchers):
            sub.close()
        await server.stop(grace)
        self._server = None
        for rec in self.sessions.values():
            if rec.timer is not None:
                rec.timer.cancel()
                rec.timer = None
        await self.flush()  # first: a write-behind in flight must finish, not be cut off
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> SimPod:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def set_serving(self, serving: bool) -> None:
        """Flip the health status (both service names) without stopping the pod."""
        if self._health is None:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    def drop_watchers(self) -> None:
        """End every current WatchSessions stream with OK (a dropped slow consumer)."""
        for sub in list(self._session_watchers):
            sub.close(discard=True)
        self._session_watchers.clear()

    @property
    def watcher_count(self) -> int:
        """Open WatchSessions streams."""
        return len(self._session_watchers)

    @property
    def signal_watcher_count(self) -> int:
        """Open WatchSignals streams."""
        return len(self._signal_watchers)

    def session_state(self, session_id: str) -> int | None:
        rec = self.sessions.get(session_id)
        return rec.metadata.state if rec is not None else None

    def _reset_state(self) -> None:
        for rec in self.sessions.values():
            if rec.timer is not None:
                rec.timer.cancel()
        self.sessions.clear()
        self._order.clear()
        self._dirty_sids.clear()
        self._encoded.clear()
        self._session_watchers.clear()
        self._signal_watchers.clear()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _hang_forever(self) -> None:
        await asyncio.get_running_loop().create_future()

    def _note_cancelled(self, method: str) -> None:
        if not self._stopping:
            self.cancelled_calls[method] += 1

    # ── auth ───────────────────────────────────────────────────────────
    def _sender_of(self, token: str) -> str:
        """Map a bearer token to the authenticated sender ("" = anonymous / unknown)."""
        if not token:
            return ""
        if self.tokens is not None and token in self.tokens:
            return self.tokens[token]
        return token if self.allow_insecure else ""

    def _authenticate(self, token: str) -> str:
        sender = self._sender_of(token)
        if not sender and not self.allow_insecure:
            raise _status(
                grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token", UNAUTHENTICATED
            )
        return sender

    def _access(self, session_id: str, token: str) -> SessionRecord:
        """The session, if the caller may read it (GetSession / subscribe rules)."""
        return self._access_as(session_id, self._authenticate(token))

    def _access_as(self, session_id: str, sender: str) -> SessionRecord:
        rec = self.sessions.get(session_id)
        if rec is None:
            raise _not_found(session_id)
        self._maybe_expire(rec)
        if not (sender and (sender in self.observers or sender in rec.members)):
            raise _status(
                grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN: session access denied", FORBIDDEN
            )
        return rec

    # ── Initialize & registries ─────────────────────────────────────────
    def _initialize(self, request: core_pb2.InitializeRequest) -> core_pb2.InitializeResponse:
        if not request.supported_protocol_versions:
            raise _status(
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_REQUEST: supported_protocol_versions must not be empty",
                INVALID_REQUEST,
            )
        if PROTOCOL_VERSION not in request.supported_protocol_versions:
            raise _status(
                grpc.StatusCode.FAILED_PRECONDITION,
                "UNSUPPORTED_PROTOCOL_VERSION: no mutually supported protocol version",
                UNSUPPORTED_PROTOCOL_VERSION,
            )
        return core_pb2.InitializeResponse(
            selected_protocol_version=PROTOCOL_VERSION,
            runtime_info=core_pb2.RuntimeInfo(
                name=self.name,
                title="MACP simulated runtime",
                version=RUNTIME_VERSION,
                description="In-memory MACP runtime simulator (macp-router tests)",
            ),
            capabilities=core_pb2.Capabilities(
                sessions=core_pb2.SessionsCapability(
                    stream=True, list_sessions=True, watch_sessions=True
                ),
                cancellation=core_pb2.CancellationCapability(cancel_session=True),
                progress=core_pb2.ProgressCapability(progress=True),
                manifest=core_pb2.ManifestCapability(get_manifest=True),
                mode_registry=core_pb2.ModeRegistryCapability(list_modes=True, list_changed=False),
                roots=core_pb2.RootsCapability(list_roots=True, list_changed=False),
                policy_registry=policy_pb2.PolicyRegistryCapability(
                    register_policy=True,
                    list_policies=True,
                    list_changed=False,
                    what_if_replay=False,
                ),
                decision_receipt=core_pb2.DecisionReceiptCapability(
                    get_decision_receipt=False, signed=False
                ),
                experimental=core_pb2.ExperimentalCapabilities(
                    features={"ext_mode_lifecycle": "true"}
                ),
            ),
            supported_modes=self._supported_modes(),
            instructions="Authenticate requests with Authorization: Bearer <token>.",
        )

    def _supported_modes(self) -> list[str]:
        return [*STANDARD_MODES, *self.ext_modes, *self.promoted_modes]

    def _mode_descriptors(self) -> list[core_pb2.ModeDescriptor]:
        out = [
            core_pb2.ModeDescriptor(
                mode=mode,
                mode_version="1.0.0",
                title=mode,
                message_types=types,
                terminal_message_types=terminal,
            )
            for mode, (types, terminal) in STANDARD_MODES.items()
        ]
        out.extend(self.promoted_modes.values())
        return out

    def _get_manifest(self, request: core_pb2.GetManifestRequest) -> core_pb2.GetManifestResponse:
        if request.agent_id and request.agent_id not in (self.name, "macp-runtime"):
            raise _status(
                grpc.StatusCode.NOT_FOUND, f"Agent '{request.agent_id}' not found", AGENT_NOT_FOUND
            )
        return core_pb2.GetManifestResponse(
            manifest=core_pb2.AgentManifest(
                agent_id=self.name,
                title="MACP simulated runtime",
                description="In-memory MACP runtime simulator",
                supported_modes=self._supported_modes(),
                input_content_types=["application/macp-envelope+proto"],
                output_content_types=["application/macp-envelope+proto"],
            )
        )

    def _register_ext_mode(self, desc: core_pb2.ModeDescriptor) -> core_pb2.RegisterExtModeResponse:
        if not desc.mode:
            return core_pb2.RegisterExtModeResponse(ok=False, error="mode must not be empty")
        if desc.mode in STANDARD_MODES or desc.mode.startswith("macp.mode."):
            return core_pb2.RegisterExtModeResponse(
                ok=False, error=f"mode '{desc.mode}' is reserved"
            )
        if "Commitment" not in desc.terminal_message_types:
            return core_pb2.RegisterExtModeResponse(
                ok=False, error="terminal_message_types must include Commitment"
            )
        self.ext_modes[desc.mode] = core_pb2.ModeDescriptor()
        self.ext_modes[desc.mode].CopyFrom(desc)
        self._mark_dirty()
        return core_pb2.RegisterExtModeResponse(ok=True)

    def _unregister_ext_mode(self, mode: str) -> core_pb2.UnregisterExtModeResponse:
        if self.ext_modes.pop(mode, None) is None:
            return core_pb2.UnregisterExtModeResponse(
                ok=False, error=f"extension mode '{mode}' not registered"
            )
        self._mark_dirty()
        return core_pb2.UnregisterExtModeResponse(ok=True)

    def _promote_mode(self, mode: str, promoted: str) -> core_pb2.PromoteModeResponse:
        desc = self.ext_modes.get(mode)
        if desc is None:
            return core_pb2.PromoteModeResponse(
                ok=False, error=f"extension mode '{mode}' not registered"
            )
        new_name = promoted or mode
        if new_name.startswith("macp.mode."):
            return core_pb2.PromoteModeResponse(
                ok=False, error="cannot promote into the reserved macp.mode.* namespace"
            )
        del self.ext_modes[mode]
        promoted_desc = core_pb2.ModeDescriptor()
        promoted_desc.CopyFrom(desc)
        promoted_desc.mode = new_name
        self.promoted_modes[new_name] = promoted_desc
        self._mark_dirty()
        return core_pb2.PromoteModeResponse(ok=True, mode=new_name)

    def _register_policy(
        self, desc: policy_pb2.PolicyDescriptor
    ) -> policy_pb2.RegisterPolicyResponse:
        if not desc.policy_id:
            return policy_pb2.RegisterPolicyResponse(ok=False, error="policy_id must not be empty")
        if desc.policy_id in self.policies:
            return policy_pb2.RegisterPolicyResponse(
                ok=False, error=f"Policy '{desc.policy_id}' already registered"
            )
        stored = policy_pb2.PolicyDescriptor()
        stored.CopyFrom(desc)
        if not stored.registered_at_unix_ms:
            stored.registered_at_unix_ms = now_ms()
        self.policies[desc.policy_id] = stored
        self._mark_dirty()
        return policy_pb2.RegisterPolicyResponse(ok=True)

    def _unregister_policy(self, policy_id: str) -> policy_pb2.UnregisterPolicyResponse:
        if self.policies.pop(policy_id, None) is None:
            return policy_pb2.UnregisterPolicyResponse(
                ok=False, error=f"Policy '{policy_id}' not found"
            )
        self._mark_dirty()
        return policy_pb2.UnregisterPolicyResponse(ok=True)

    # ── Send ───────────────────────────────────────────────────────────
    def _process(self, env: envelope_pb2.Envelope, token: str) -> envelope_pb2.Ack:
        """Validate and apply one envelope; the Ack says what happened (never raises)."""
        if env.macp_version != PROTOCOL_VERSION:
            return _ack(
                env,
                code=UNSUPPORTED_PROTOCOL_VERSION,
                message=f"unsupported macp_version '{env.macp_version}'",
            )
        mtype = env.message_type
        if not mtype or not env.message_id:
            return _ack(
                env, code=INVALID_ENVELOPE, message="message_type and message_id are required"
            )
        ambient = mtype in ("Signal", "Progress")
        if mtype == "Signal" and (env.session_id or env.mode.strip()):
            return _ack(
                env, code=INVALID_ENVELOPE, message="Signal must have empty session_id and mode"
            )
        if not env.session_id:
            if not ambient:
                return _ack(env, code=INVALID_ENVELOPE, message="session_id is required")
            if env.mode.strip():
                return _ack(
                    env, code=INVALID_ENVELOPE, message="ambient Progress must have an empty mode"
                )
        elif not env.mode.strip():
            return _ack(env, code=INVALID_ENVELOPE, message="mode is required")
        sender = self._sender_of(token)
        if not sender:
            return _ack(env, code=UNAUTHENTICATED, message="missing or invalid bearer token")
        if env.sender and env.sender != sender:
            return _ack(
                env,
                code=UNAUTHENTICATED,
                message="envelope sender does not match the authenticated identity",
            )
        if env.sender != sender:
            accepted = envelope_pb2.Envelope()
            accepted.CopyFrom(env)
            accepted.sender = sender
            env = accepted
        if not env.session_id:
            return self._ambient(env)
        if mtype == "SessionStart":
            return self._start(env, sender)
        if mtype == "Progress":
            return self._session_progress(env)
        return self._message(env, sender)

    def _ambient(self, env: envelope_pb2.Envelope) -> envelope_pb2.Ack:
        try:
            if env.message_type == "Signal" and env.payload:
                sig = core_pb2.SignalPayload.FromString(env.payload)
                if not sig.signal_type.strip():
                    return _ack(env, code=INVALID_ENVELOPE, message="signal_type is required")
            elif env.payload:
                core_pb2.ProgressPayload.FromString(env.payload)
        except DecodeError:
            return _ack(env, code=INVALID_ENVELOPE, message="invalid payload")
        if self._signal_watchers:
            item = core_pb2.WatchSignalsResponse(envelope=env, sender_authenticated=True)
            for sub in self._signal_watchers:
                sub.push(item)
        return _ack(env, state=OPEN)

    def _session_progress(self, env: envelope_pb2.Envelope) -> envelope_pb2.Ack:
        """Session-scoped Progress: published like a signal, never enters the session log.

        The runtime accepts it without looking the session up; the sim answers
        SESSION_NOT_FOUND for an unknown session so a stale route stays visible.
        """
        rec = self.sessions.get(env.session_id)
        if rec is None:
            return _ack(
                env, code=SESSION_NOT_FOUND, message=f"Session '{env.session_id}' not found"
            )
        ack = self._ambient(env)
        if ack.ok:
            ack.session_state = rec.metadata.state
        return ack

    def _start(self, env: envelope_pb2.Envelope, sender: str) -> envelope_pb2.Ack:
        existing = self.sessions.get(env.session_id)
        if existing is not None:
            if env.message_id in existing.seen:
                return _ack(env, state=existing.metadata.state, duplicate=True)
            return _ack(
                env,
                code=SESSION_ALREADY_EXISTS,
                message=f"Session '{env.session_id}' already exists",
            )
        mode = env.mode
        if (
            mode not in STANDARD_MODES
            and mode not in self.ext_modes
            and mode not in self.promoted_modes
        ):
            return _ack(env, code=MODE_NOT_SUPPORTED, message=f"unknown mode '{mode}'")
        if not env.payload:
            return _ack(env, code=INVALID_ENVELOPE, message="SessionStart payload is required")
        try:
            start = core_pb2.SessionStartPayload.FromString(env.payload)
        except DecodeError:
            return _ack(env, code=INVALID_ENVELOPE, message="invalid SessionStartPayload")
        if not 1 <= start.ttl_ms <= MAX_TTL_MS:
            return _ack(env, code=INVALID_ENVELOPE, message="ttl_ms out of range")
        if start.max_suspend_ms < 0 or len(set(start.participants)) != len(start.participants):
            return _ack(env, code=INVALID_ENVELOPE, message="invalid SessionStartPayload")
        now = now_ms()
        meta = core_pb2.SessionMetadata(
            session_id=env.session_id,
            mode=mode,
            state=OPEN,
            started_at_unix_ms=now,
            expires_at_unix_ms=now + start.ttl_ms,
            mode_version=start.mode_version or "1.0.0",
            configuration_version=start.configuration_version,
            policy_version=start.policy_version or "policy.default",
            participants=start.participants,
            initiator=sender,
            context_id=start.context_id,
            extension_keys=sorted(start.extensions),
        )
        rec = SessionRecord(
            metadata=meta,
            members=frozenset((sender, *start.participants)),
            max_suspend_ms=start.max_suspend_ms or DEFAULT_MAX_SUSPEND_MS,
        )
        rec.seen.add(env.message_id)
        self.sessions[env.session_id] = rec
        self._order.append(env.session_id)
        self._record_activity(rec, sender, now)
        self._arm_ttl(rec)
        self._accept(rec, env)
        self._emit(EV_CREATED, rec, now)
        self._mark_dirty(rec)
        return _ack(env, state=OPEN)

    def _message(self, env: envelope_pb2.Envelope, sender: str) -> envelope_pb2.Ack:
        rec = self.sessions.get(env.session_id)
        if rec is None:
            return _ack(
                env, code=SESSION_NOT_FOUND, message=f"Session '{env.session_id}' not found"
            )
        meta = rec.metadata
        if env.message_id in rec.seen:
            return _ack(env, state=meta.state, duplicate=True)
        if env.mode != meta.mode:
            return _ack(
                env, code=INVALID_ENVELOPE, message="envelope mode does not match the session mode"
            )
        self._maybe_expire(rec)
        if meta.state != OPEN:
            return _ack(
                env, code=SESSION_NOT_OPEN, message=f"Session '{env.session_id}' is not open"
            )
        if sender not in rec.members:
            return _ack(
                env, code=FORBIDDEN, message="sender is not a declared participant of this session"
            )
        now = now_ms()
        rec.seen.add(env.message_id)
        self._record_activity(rec, sender, now)
        self._accept(rec, env)
        if env.message_type == "Commitment":
            meta.state = RESOLVED
            self._disarm(rec)
            self._emit(EV_RESOLVED, rec, now)
        self._mark_dirty(rec)
        return _ack(env, state=meta.state)

    def _record_activity(self, rec: SessionRecord, sender: str, now: int) -> None:
        act = rec.activity.get(sender)
        if act is None:
            act = rec.metadata.participant_activity.add(participant_id=sender)
            rec.activity[sender] = act
        act.last_message_at_unix_ms = now
        act.message_count += 1

    def _accept(self, rec: SessionRecord, env: envelope_pb2.Envelope) -> None:
        rec.log.append(env)
        if rec.subs:
            item = core_pb2.StreamSessionResponse(envelope=env)
            for sub in rec.subs:
                sub.push(item)

    # ── control plane ──────────────────────────────────────────────────
    def _control(self, session_id: str, token: str, action: str) -> envelope_pb2.Ack:
        sender = self._sender_of(token)
        if not sender:
            raise _status(
                grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token", UNAUTHENTICATED
            )
        rec = self.sessions.get(session_id)
        if rec is None:
            raise _not_found(session_id)
        if sender != rec.metadata.initiator:
            raise _status(
                grpc.StatusCode.PERMISSION_DENIED,
                f"FORBIDDEN: only the session initiator can {action}",
                FORBIDDEN,
            )
        self._maybe_expire(rec)
        meta = rec.metadata
        now = now_ms()
        if action == "cancel":
            if meta.state in TERMINAL:
                return _control_ack(session_id, state=meta.state)
            meta.state = CANCELLED
            self._disarm(rec)
            self._emit(EV_CANCELLED, rec, now)
        elif action == "suspend":
            if meta.state != OPEN:
                return _control_ack(
                    session_id, code=SESSION_NOT_OPEN, message=f"Session '{session_id}' is not open"
                )
            meta.state = SUSPENDED
            rec.banked_ms = max(0, meta.expires_at_unix_ms - now)
            self._arm(rec, now + rec.max_suspend_ms)
            self._emit(EV_SUSPENDED, rec, now)
        else:
            if meta.state != SUSPENDED:
                return _control_ack(
                    session_id,
                    code=SESSION_NOT_OPEN,
                    message=f"Session '{session_id}' is not suspended",
                )
            meta.state = OPEN
            meta.expires_at_unix_ms = now + rec.banked_ms
            rec.banked_ms = 0
            self._arm_ttl(rec)
            self._emit(EV_RESUMED, rec, now)
        self._mark_dirty(rec)
        return _control_ack(session_id, state=meta.state)

    # ── expiry timers ──────────────────────────────────────────────────
    def _arm_ttl(self, rec: SessionRecord) -> None:
        self._arm(rec, rec.metadata.expires_at_unix_ms)

    def _arm(self, rec: SessionRecord, at_unix_ms: int) -> None:
        if rec.timer is not None:
            rec.timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, (at_unix_ms - now_ms()) / 1000.0)
        rec.timer = loop.call_later(delay, self._on_timer, rec, at_unix_ms)

    def _disarm(self, rec: SessionRecord) -> None:
        if rec.timer is not None:
            rec.timer.cancel()
            rec.timer = None

    def _arm_all_timers(self) -> None:
        for rec in self.sessions.values():
            state = rec.metadata.state
            if state == OPEN:
                self._arm_ttl(rec)
            elif state == SUSPENDED:  # suspension start is not persisted: restart the cap
                self._arm(rec, now_ms() + rec.max_suspend_ms)

    def _on_timer(self, rec: SessionRecord, at_unix_ms: int) -> None:
        rec.timer = None
        if rec.metadata.state in (OPEN, SUSPENDED):
            if now_ms() < at_unix_ms:  # fired a little early: re-arm for the remainder
                self._arm(rec, at_unix_ms)
                return
            self._expire(rec)

    def _maybe_expire(self, rec: SessionRecord) -> None:
        """Lazy expiry, as the runtime's get_session_checked: never serve a stale OPEN."""
        meta = rec.metadata
        if meta.state == OPEN and now_ms() > meta.expires_at_unix_ms:
            self._expire(rec)

    def _expire(self, rec: SessionRecord) -> None:
        self._disarm(rec)
        rec.metadata.state = EXPIRED
        self._emit(EV_EXPIRED, rec, now_ms())
        self._mark_dirty(rec)

    # ── lifecycle feed ─────────────────────────────────────────────────
    def _emit(self, event_type: int, rec: SessionRecord, now: int) -> None:
        if not self._session_watchers:
            return
        item = core_pb2.WatchSessionsResponse()
        ev = item.event
        ev.event_type = event_type
        ev.session.CopyFrom(rec.metadata)
        ev.observed_at_unix_ms = now
        for sub in self._session_watchers:
            sub.push(item)

    def _snapshot_events(self) -> list[core_pb2.WatchSessionsResponse]:
        out = []
        for rec in self.sessions.values():
            if rec.metadata.state in TERMINAL and not self.snapshot_terminal:
                continue
            item = core_pb2.WatchSessionsResponse()
            item.event.event_type = EV_CREATED
            item.event.session.CopyFrom(rec.metadata)
            item.event.observed_at_unix_ms = rec.metadata.started_at_unix_ms
            out.append(item)
        return out

    def _list_sessions(
        self, request: core_pb2.ListSessionsRequest
    ) -> core_pb2.ListSessionsResponse:
        size = request.page_size if request.page_size > 0 else DEFAULT_PAGE_SIZE
        size = min(size, MAX_PAGE_SIZE)
        offset = 0
        if request.page_token:
            offset = _decode_page_token(request.page_token)
        end = offset + size
        resp = core_pb2.ListSessionsResponse()
        for sid in self._order[offset:end]:
            rec = self.sessions[sid]
            self._maybe_expire(rec)
            resp.sessions.append(rec.metadata)
        if end < len(self._order):
            resp.next_page_token = _encode_page_token(end)
        return resp

    # ── persistence ────────────────────────────────────────────────────
    def _mark_dirty(self, rec: SessionRecord | None = None) -> None:
        if not self.state_file or self._stopping:
            return
        if rec is not None:
            self._dirty_sids.add(rec.metadata.session_id)
        self._dirty = True
        if self._persist_handle is None and self._persist_task is None:
            loop = asyncio.get_running_loop()
            self._persist_handle = loop.call_later(PERSIST_DEBOUNCE_S, self._persist_soon)

    def _persist_soon(self) -> None:
        self._persist_handle = None
        # Not in `_tasks`: stop() awaits it through flush() instead of cancelling it, so a
        # write already handed to a thread can never land after the final write.
        self._persist_task = asyncio.ensure_future(self._persist())

    async def _persist(self) -> None:
        try:
            while self._dirty:
                self._dirty = False
                blob = self._serialize()
                await asyncio.to_thread(_atomic_write, self.state_file or "", blob)
        finally:
            self._persist_task = None

    async def flush(self) -> None:
        """Write the state file now (no-op without one)."""
        if self._persist_handle is not None:
            self._persist_handle.cancel()
            self._persist_handle = None
        if self._persist_task is not None:
            await self._persist_task
        if self.state_file:
            self._dirty = False
            _atomic_write(self.state_file, self._serialize())

    def _serialize(self) -> bytes:
        """The state file's bytes; only sessions changed since the last call are re-encoded."""
        cache = self._encoded
        for sid in self._dirty_sids:
            rec = self.sessions[sid]
            cache[sid] = json.dumps(
                {
                    "session_id": sid,
                    "state": envelope_pb2.SessionState.Name(rec.metadata.state),
                    "metadata": _b64(rec.metadata),
                    "seen": list(rec.seen),
                    "log": [_b64(env) for env in rec.log],
                    "max_suspend_ms": rec.max_suspend_ms,
                    "banked_ms": rec.banked_ms,
                },
                separators=(",", ":"),
            )
        self._dirty_sids.clear()
        head = json.dumps(
            {
                "version": 1,
                "name": self.name,
                "policies": [_b64(d) for d in self.policies.values()],
                "ext_modes": [_b64(d) for d in self.ext_modes.values()],
                "promoted_modes": [_b64(d) for d in self.promoted_modes.values()],
            },
            separators=(",", ":"),
        )
        sessions = ",".join(cache[sid] for sid in self._order)
        return f'{head[:-1]},"sessions":[{sessions}]}}'.encode()

    def _load_state(self) -> None:
        path = self.state_file
        if not path or not os.path.exists(path):
            return
        with open(path, "rb") as fh:
            doc = json.loads(fh.read())

        def unb64(cls: Any, text: str) -> Any:
            return cls.FromString(base64.b64decode(text))

        for item in doc.get("sessions", []):
            meta = unb64(core_pb2.SessionMetadata, item["metadata"])
            rec = SessionRecord(
                metadata=meta,
                members=frozenset((meta.initiator, *meta.participants)),
                seen=set(item.get("seen", [])),
                log=[unb64(envelope_pb2.Envelope, t) for t in item.get("log", [])],
                max_suspend_ms=int(item.get("max_suspend_ms", DEFAULT_MAX_SUSPEND_MS)),
                banked_ms=int(item.get("banked_ms", 0)),
            )
            for act in meta.participant_activity:
                rec.activity[act.participant_id] = act
            self.sessions[meta.session_id] = rec
            self._order.append(meta.session_id)
            self._dirty_sids.add(meta.session_id)
        self.policies = {
            d.policy_id: d
            for d in (unb64(policy_pb2.PolicyDescriptor, t) for t in doc.get("policies", []))
        }
        self.ext_modes = {
            d.mode: d for d in (unb64(core_pb2.ModeDescriptor, t) for t in doc.get("ext_modes", []))
        }
        self.promoted_modes = {
            d.mode: d
            for d in (unb64(core_pb2.ModeDescriptor, t) for t in doc.get("promoted_modes", []))
        }


def _b64(msg: Any) -> str:
    return base64.b64encode(msg.SerializeToString()).decode("ascii")


def _encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"sim:{offset}".encode()).decode("ascii")


def _decode_page_token(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
        prefix, _, num = text.partition(":")
        if prefix != "sim":
            raise ValueError(token)
        offset = int(num)
        if offset < 0:
            raise ValueError(token)
        return offset
    except (ValueError, UnicodeError) as exc:
        raise _status(
            grpc.StatusCode.INVALID_ARGUMENT, "invalid page_token", INVALID_REQUEST
        ) from exc


def _atomic_write(path: str, blob: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".simpod-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


async def serve_pod(listen: str, name: str, state_file: str | None) -> None:
    """Run one simulated pod until cancelled or SIGTERM/SIGINT (the `macp-router pod` command).

    Logs exactly one line containing `ready` and the bound address once serving.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    pod = SimPod(name, listen, state_file=state_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    await pod.start()
    try:
        log.info("sim pod %s ready on %s", name, pod.address)
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await pod.stop(grace=1.0)
