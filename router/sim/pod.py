"""A simulated MACP runtime pod: an in-memory `macp.v1.MACPRuntimeService` on grpc.aio.

Job: stand in for one macp-runtime v0.6.1 pod in tests, the demo and load tests, faithfully
enough that the Python SDK and the router cannot tell the difference on the paths the router
cares about: session placement (SessionStart), per-session routing (Send, StreamSession,
GetSession, Cancel/Suspend/Resume), fan-out reads (ListSessions, WatchSessions, WatchSignals)
and broadcast registries (policies, ext modes). `docs/runtime-compat.md` lists every behaviour,
the runtime source it comes from and the test that covers it.

By default the pod is as strict as the runtime:
- Auth where the runtime requires it (token entries in the runtime's MACP_AUTH_TOKENS_JSON
  shape, `router.sim.auth`; no built-in observers). With no entries the pod refuses to start
  unless `allow_insecure` (dev mode: any bearer token is a full identity named by the token);
  plaintext also needs `allow_insecure`, as the runtime requires TLS otherwise.
- Per-sender rate limits on (60 starts / 600 messages per minute); RATE_LIMITED.
- WatchSessions' snapshot holds every in-memory session, terminal ones too; ListSessions is
  one unpaged reply (page_size / page_token ignored).
- Registries live in memory only (empty after a restart; the state file holds sessions only);
  duplicates are answered in-band (`ok=false`, "... is already registered"); writes need
  `can_manage_mode_registry` (PERMISSION_DENIED); with `policies_dir` set, Register/
  UnregisterPolicy are FAILED_PRECONDITION.
- StreamSession ends the stream for UNAUTHENTICATED, INTERNAL, RESOURCE_EXHAUSTED,
  INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS and answers every other error inline with a
  `MACPError` whose code and message are the status message (an unknown session:
  "UnknownSession"), keeping the stream open.
- SessionStart ids must be a lowercase UUID v4/v7 or base64url of 22+ chars (INVALID_SESSION_ID).
- Session-scoped Progress is accepted without looking the session up.
- grpc.health.v1 always answers SERVING (`health=False` removes the service, as in runtimes
  built before it existed: Health/Check is UNIMPLEMENTED).
- At most 128 concurrent streams per connection (HTTP/2 setting) and 64 requests in flight per
  connection (more wait in a queue, as tonic's concurrency limit does).
- Terminal sessions are evicted silently from memory `session_retention_s` (3600) after they
  started, by a sweep every `cleanup_interval_s` (60).
Kinder behaviour exists only behind explicit constructor arguments (raised rate limits,
`allow_insecure` dev mode, a shorter retention) that tests and the demo name.

Invariants:
- The event loop is the only lock: every state change and its lifecycle event happen in one
  synchronous step, so a WatchSessions subscriber registered together with its snapshot sees
  every later change exactly once and nothing twice.
- Protocol errors of Send come back inside a gRPC OK (`Ack.ok == false`, registry code in
  `Ack.error.code`); errors of the other RPCs are gRPC statuses (the sim adds the registry code
  in a `macp-error-code` trailer for tests; the runtime sends no such trailer and nothing in the
  router reads it).
- The per-call path is O(1) in the number of sessions (ListSessions and the snapshot are
  O(sessions), as the runtime's are); no per-call logging. Persistence is write-behind with a
  short debounce and flushed on stop.
- Every task and timer the pod creates is referenced by the pod and cancelled on stop.

Instrumentation for tests: `calls` (Counter per method), `cancelled_calls` (Counter per method
of handlers that observed a client cancellation or deadline), `hang` (every MACP method awaits
forever while set; health is unaffected), `drop_watchers()`, `sessions` (sid -> SessionRecord),
`max_in_flight` (the most requests seen in flight on one connection).
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
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2, policy_pb2

from router.sim.auth import (
    DEFAULT_MESSAGE_LIMIT_PER_MINUTE,
    DEFAULT_START_LIMIT_PER_MINUTE,
    Identity,
    JwtHs256,
    RateLimiter,
    bearer_token,
    dev_identity,
    load_token_file,
    parse_token_entries,
)

log = logging.getLogger("router.sim")

SERVICE_NAME = "macp.v1.MACPRuntimeService"
PROTOCOL_VERSION = "1.0"
RUNTIME_VERSION = "0.6.1-sim"
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
WATCH_QUEUE_LIMIT = 10_000
PERSIST_DEBOUNCE_S = 0.05
# src/main.rs defaults: MACP_MAX_CONCURRENT_STREAMS, MACP_CONCURRENCY_LIMIT_PER_CONNECTION,
# MACP_SESSION_RETENTION_SECS, MACP_CLEANUP_INTERVAL_SECS.
MAX_CONCURRENT_STREAMS = 128
CONCURRENCY_LIMIT_PER_CONNECTION = 64
SESSION_RETENTION_S = 3600.0
CLEANUP_INTERVAL_S = 60.0

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
INVALID_SESSION_ID = "INVALID_SESSION_ID"
RATE_LIMITED = "RATE_LIMITED"

# StreamSession: statuses that end the stream; any other error is answered inline
# (src/server.rs is_stream_terminal_error).
STREAM_TERMINAL_CODES = frozenset({
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
})

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
        known = _RUNTIME_ERRORS.get(code)
        ack.error.message = known[0] if known is not None else (message or code)
        ack.error.session_id = env.session_id
        ack.error.message_id = env.message_id
    return ack


def _control_ack(
    session_id: str, *, state: int = 0, code: str | None = None, message: str = ""
) -> envelope_pb2.Ack:
    return _ack(
        envelope_pb2.Envelope(session_id=session_id), state=state, code=code, message=message
    )


def _token_of(context: grpc.aio.ServicerContext) -> str | None:
    """The call's bearer token as the runtime reads it (None when absent)."""
    return bearer_token(context.invocation_metadata())


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def valid_session_id(session_id: str) -> bool:
    """The runtime's acceptance rule for a new session id (macp-core session.rs).

    A canonical lowercase hyphenated UUID v4 or v7, or base64url (`[A-Za-z0-9_-]`) of 22+
    characters; a 36-character string that parses as a UUID is held to the UUID rule only.
    """
    if not session_id:
        return False
    if len(session_id) == 36 and "-" in session_id:
        try:
            parsed = uuid.UUID(session_id)
        except ValueError:
            parsed = None
        if parsed is not None:
            return str(parsed) == session_id and parsed.version in (4, 7)
    return len(session_id) >= 22 and all(c in _B64URL for c in session_id)


F = TypeVar("F", bound=Callable[..., Any])


def _unary(fn: F) -> F:
    """Count the call, honour `hang`, record a client cancellation, send `_Abort` statuses."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: _Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        pod = self.pod
        pod.calls[name] += 1
        try:
            async with pod._connection_slot(context):
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
            # tonic's per-connection limit holds a slot until the handler hands back its
            # response stream (right after auth), not for the stream's life.
            async with pod._connection_slot(context):
                pass
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


# Registry code -> the runtime's MacpError display string and the status `status_from_error`
# gives it (src/server.rs); Ack.error.message carries the display string, as the runtime's does.
PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
_RUNTIME_ERRORS: dict[str, tuple[str, grpc.StatusCode]] = {
    UNSUPPORTED_PROTOCOL_VERSION: ("InvalidMacpVersion", grpc.StatusCode.FAILED_PRECONDITION),
    INVALID_ENVELOPE: ("InvalidEnvelope", grpc.StatusCode.FAILED_PRECONDITION),
    SESSION_ALREADY_EXISTS: ("SessionAlreadyExists", grpc.StatusCode.ALREADY_EXISTS),
    SESSION_NOT_FOUND: ("UnknownSession", grpc.StatusCode.FAILED_PRECONDITION),
    SESSION_NOT_OPEN: ("SessionNotOpen", grpc.StatusCode.FAILED_PRECONDITION),
    MODE_NOT_SUPPORTED: ("UnknownMode", grpc.StatusCode.FAILED_PRECONDITION),
    FORBIDDEN: ("Forbidden", grpc.StatusCode.PERMISSION_DENIED),
    UNAUTHENTICATED: ("Unauthenticated", grpc.StatusCode.UNAUTHENTICATED),
    PAYLOAD_TOO_LARGE: ("PayloadTooLarge", grpc.StatusCode.RESOURCE_EXHAUSTED),
    RATE_LIMITED: ("RateLimited", grpc.StatusCode.RESOURCE_EXHAUSTED),
    INVALID_SESSION_ID: ("InvalidSessionId", grpc.StatusCode.INVALID_ARGUMENT),
}


def _error_status(code: str) -> _Abort:
    """The status the runtime raises for a registry error code outside Send."""
    display, status = _RUNTIME_ERRORS.get(code, (code, grpc.StatusCode.FAILED_PRECONDITION))
    return _Abort(status, display, code)


def _not_found(session_id: str) -> _Abort:
    return _Abort(grpc.StatusCode.NOT_FOUND, f"Session '{session_id}' not found", SESSION_NOT_FOUND)


class _Health(health.aio.HealthServicer):
    """grpc.health.v1 whose Check waits for a connection slot like every runtime request."""

    def __init__(self, pod: SimPod) -> None:
        super().__init__()
        self._pod = pod

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with self._pod._connection_slot(context):
            return await super().Check(request, context)


class _ConnSlots:
    """The in-flight requests of one client connection (tonic concurrency_limit_per_connection)."""

    __slots__ = ("active", "sem", "users")

    def __init__(self, limit: int) -> None:
        self.sem = asyncio.Semaphore(limit)
        self.users = 0
        self.active = 0


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
        return core_pb2.SendResponse(ack=self.pod._send(request.envelope, _token_of(context)))

    @_unary
    async def GetSession(
        self, request: core_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.GetSessionResponse:
        rec = self.pod._access(request.session_id, _token_of(context))
        out = core_pb2.GetSessionResponse()
        out.metadata.CopyFrom(rec.metadata)
        return out

    @_unary
    async def CancelSession(
        self, request: core_pb2.CancelSessionRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.CancelSessionResponse:
        ack = self.pod._control(request.session_id, _token_of(context), "cancel")
        return core_pb2.CancelSessionResponse(ack=ack)

    @_unary
    async def SuspendSession(
        self, request: core_pb2.SuspendSessionRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.SuspendSessionResponse:
        ack = self.pod._control(request.session_id, _token_of(context), "suspend")
        return core_pb2.SuspendSessionResponse(ack=ack)

    @_unary
    async def ResumeSession(
        self, request: core_pb2.ResumeSessionRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.ResumeSessionResponse:
        ack = self.pod._control(request.session_id, _token_of(context), "resume")
        return core_pb2.ResumeSessionResponse(ack=ack)

    @_unary
    async def ListSessions(
        self, request: core_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.ListSessionsResponse:
        self.pod._authenticate(_token_of(context))
        return self.pod._list_sessions()

    @_streaming
    async def WatchSessions(
        self, request: core_pb2.WatchSessionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[core_pb2.WatchSessionsResponse]:
        pod = self.pod
        pod._authenticate(_token_of(context))
        sub = _Sub()
        snapshot = pod._snapshot_events()  # taken together with the subscription: no gap
        pod._session_watchers.add(sub)
        try:
            # Headers once subscribed, as tonic sends them when the handler returns.
            await context.send_initial_metadata(())
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
        pod._authenticate(_token_of(context))
        sub = _Sub()
        pod._signal_watchers.add(sub)  # subscribed before the headers tell the client so
        try:
            await context.send_initial_metadata(())
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
        identity = pod._authenticate(_token_of(context))  # before any frame, as the runtime
        await context.send_initial_metadata(())
        stream = _SessionStream(pod, identity)
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
        self.pod._authorize_registry(_token_of(context))
        return self.pod._register_ext_mode(request.mode_descriptor)

    @_unary
    async def UnregisterExtMode(
        self, request: core_pb2.UnregisterExtModeRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.UnregisterExtModeResponse:
        self.pod._authorize_registry(_token_of(context))
        return self.pod._unregister_ext_mode(request.mode)

    @_unary
    async def PromoteMode(
        self, request: core_pb2.PromoteModeRequest, context: grpc.aio.ServicerContext
    ) -> core_pb2.PromoteModeResponse:
        self.pod._authorize_registry(_token_of(context))
        return self.pod._promote_mode(request.mode, request.promoted_mode_name)

    @_unary
    async def RegisterPolicy(
        self, request: policy_pb2.RegisterPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.RegisterPolicyResponse:
        self.pod._check_policies_writable()
        self.pod._authorize_registry(_token_of(context))
        return self.pod._register_policy(request.policy_descriptor)

    @_unary
    async def UnregisterPolicy(
        self, request: policy_pb2.UnregisterPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.UnregisterPolicyResponse:
        self.pod._check_policies_writable()
        self.pod._authorize_registry(_token_of(context))
        return self.pod._unregister_policy(request.policy_id)

    @_unary
    async def GetPolicy(
        self, request: policy_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.GetPolicyResponse:
        self.pod._authenticate(_token_of(context))
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
        self.pod._authenticate(_token_of(context))
        descs = [
            d for d in self.pod.policies.values() if not request.mode or d.mode == request.mode
        ]
        return policy_pb2.ListPoliciesResponse(descriptors=descs)


class _SessionStream:
    """State of one StreamSession call: the bound session and the outgoing mailbox.

    Frames are handled as the runtime's `process_stream_request` does: a status in
    `STREAM_TERMINAL_CODES` ends the stream; any other error is sent inline as a `MACPError`
    (code and message = the status message, session_id = the bound session) and the stream
    stays open. The stream binds to the first envelope's session id before it is processed,
    known or not; accepted envelopes of the bound session are streamed back (the start too).
    """

    __slots__ = ("bound", "bound_sid", "identity", "out", "pod")

    def __init__(self, pod: SimPod, identity: Identity) -> None:
        self.pod = pod
        self.identity = identity
        self.out = _Sub()
        self.bound: SessionRecord | None = None
        self.bound_sid: str | None = None

    def unbind(self) -> None:
        if self.bound is not None:
            self.bound.subs.discard(self.out)

    def _bind(self, sid: str) -> None:
        if self.bound_sid is None:
            self.bound_sid = sid
        if self.bound is None and sid == self.bound_sid:
            rec = self.pod.sessions.get(sid)
            if rec is not None:
                self.bound = rec
                rec.subs.add(self.out)

    async def read(self, frames: AsyncIterator[core_pb2.StreamSessionRequest]) -> None:
        try:
            async for frame in frames:
                try:
                    self._frame(frame)
                except _Abort as exc:
                    if exc.code in STREAM_TERMINAL_CODES:
                        raise
                    self._inline(exc.details)
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

    def _inline(self, text: str) -> None:
        err = core_pb2.StreamSessionResponse()
        err.error.code = text
        err.error.message = text
        err.error.session_id = self.bound_sid or ""
        self.out.push(err)

    def _frame(self, frame: core_pb2.StreamSessionRequest) -> None:
        pod = self.pod
        if frame.subscribe_session_id:
            if frame.HasField("envelope"):
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "StreamSessionRequest must not contain both envelope and subscribe_session_id",
                )
            sid = frame.subscribe_session_id
            if self.bound_sid is not None and self.bound_sid != sid:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "StreamSession may only carry envelopes for one session_id",
                )
            rec = pod._access_as(sid, self.identity,
                                 forbidden="FORBIDDEN: caller is not a declared participant or "
                                           "observer for this session")
            self._bind(sid)
            for env in rec.log[frame.after_sequence :]:
                self.out.push(core_pb2.StreamSessionResponse(envelope=env))
            return
        if not frame.HasField("envelope"):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "StreamSessionRequest must contain an envelope or subscribe_session_id",
            )
        env = frame.envelope
        code = pod._shape_error(env)
        if code is not None:
            raise _error_status(code)
        if not env.session_id.strip():
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "StreamSession requires a non-empty session_id")
        if not env.mode.strip():
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "StreamSession requires a non-empty mode")
        if self.bound_sid is not None and self.bound_sid != env.session_id:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "StreamSession may only carry envelopes for one session_id",
            )
        identity = self.identity
        if env.sender and env.sender != identity.sender:
            raise _error_status(UNAUTHENTICATED)
        if env.sender != identity.sender:
            accepted = envelope_pb2.Envelope()
            accepted.CopyFrom(env)
            accepted.sender = identity.sender
            env = accepted
        start = env.message_type == "SessionStart"
        if not start:
            rec = pod.sessions.get(env.session_id)
            if rec is not None:
                pod._maybe_expire(rec)
                if env.mode != rec.metadata.mode:
                    raise _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "INVALID_ENVELOPE: envelope mode does not match the bound session mode",
                    )
                if rec.metadata.state != OPEN:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "SESSION_NOT_OPEN")
        code = pod._authorize_and_limit(identity, env)
        if code is not None:
            raise _error_status(code)
        self._bind(env.session_id)
        existed = self.bound is not None
        ack = pod._apply(env, identity)
        if not ack.ok:
            raise _error_status(ack.error.code)
        if not existed:
            self._bind(env.session_id)
            if self.bound is not None and start and not ack.duplicate:
                # Started by this frame: the start envelope was broadcast before we subscribed.
                self.out.push(core_pb2.StreamSessionResponse(envelope=self.bound.log[0]))


class SimPod:
    """One simulated runtime pod. See the module docstring for behaviour and invariants.

    Public attributes: `name`, `port`, `address` (after start), `calls`, `cancelled_calls`,
    `hang`, `sessions`, `identities`, `policies`, `ext_modes`, `promoted_modes`,
    `max_in_flight`, `queued_calls`.

    Configuration (each argument is the runtime's environment variable of the same meaning):
    `auth_tokens` (MACP_AUTH_TOKENS_JSON: JSON text or parsed entries), `auth_tokens_file`
    (MACP_AUTH_TOKENS_FILE), `allow_insecure` (MACP_ALLOW_INSECURE=1: plaintext, and dev-mode
    auth when no tokens are configured), `start_limit_per_minute` /
    `message_limit_per_minute` (MACP_SESSION_START_LIMIT_PER_MINUTE /
    MACP_MESSAGE_LIMIT_PER_MINUTE), `policies_dir` (MACP_POLICIES_DIR: the policy registry is
    read-only; the directory itself is not read), `max_concurrent_streams`
    (MACP_MAX_CONCURRENT_STREAMS), `concurrency_limit_per_connection`
    (MACP_CONCURRENCY_LIMIT_PER_CONNECTION), `session_retention_s`
    (MACP_SESSION_RETENTION_SECS), `cleanup_interval_s` (MACP_CLEANUP_INTERVAL_SECS),
    `max_payload_bytes` (MACP_MAX_PAYLOAD_BYTES). `health=False` is a runtime built before
    grpc.health.v1 existed.
    """

    def __init__(
        self,
        name: str,
        listen: str = "127.0.0.1:0",
        *,
        state_file: str | None = None,
        auth_tokens: str | Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None,
        auth_tokens_file: str | None = None,
        allow_insecure: bool = False,
        start_limit_per_minute: int = DEFAULT_START_LIMIT_PER_MINUTE,
        message_limit_per_minute: int = DEFAULT_MESSAGE_LIMIT_PER_MINUTE,
        policies_dir: str | None = None,
        health: bool = True,
        max_concurrent_streams: int = MAX_CONCURRENT_STREAMS,
        concurrency_limit_per_connection: int = CONCURRENCY_LIMIT_PER_CONNECTION,
        session_retention_s: float = SESSION_RETENTION_S,
        cleanup_interval_s: float = CLEANUP_INTERVAL_S,
        max_payload_bytes: int = 1_048_576,
        server_credentials: grpc.ServerCredentials | None = None,
        jwt: JwtHs256 | None = None,
    ) -> None:
        self.name = name
        self.jwt = jwt
        """The runtime's JWT resolver (MACP_AUTH_ISSUER + an HS256 JWKS key), if configured."""
        self.server_credentials = server_credentials
        self.listen = listen
        self.state_file = state_file
        self.allow_insecure = allow_insecure
        self.identities: dict[str, Identity] = {}
        if auth_tokens is not None:
            self.identities.update(parse_token_entries(auth_tokens))
        if auth_tokens_file is not None and auth_tokens is None:  # the JSON wins, as env does
            self.identities.update(load_token_file(auth_tokens_file))
        self.start_limit_per_minute = start_limit_per_minute
        self.message_limit_per_minute = message_limit_per_minute
        self.rate_limits = RateLimiter(start_limit_per_minute, message_limit_per_minute)
        self.policies_read_only = policies_dir is not None
        self.health_enabled = health
        self.max_concurrent_streams = max_concurrent_streams
        self.concurrency_limit_per_connection = concurrency_limit_per_connection
        self.session_retention_s = session_retention_s
        self.cleanup_interval_s = cleanup_interval_s
        self.max_payload_bytes = max_payload_bytes
        self.max_in_flight = 0
        self.queued_calls = 0
        self._conn_slots: dict[str, _ConnSlots] = {}

        self.port: int = 0
        self.address: str = ""
        self.calls: collections.Counter[str] = collections.Counter()
        self.cancelled_calls: collections.Counter[str] = collections.Counter()
        self._hang = False
        self._hang_waiters: set[asyncio.Future[None]] = set()

        self.sessions: dict[str, SessionRecord] = {}  # in creation order
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
        self._check_startup_config()
        self._stopping = False
        self._reset_state()
        if self.state_file:
            self._load_state()
        server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.max_receive_message_length", self.max_payload_bytes + 64 * 1024),
        ])
        core_pb2_grpc.add_MACPRuntimeServiceServicer_to_server(_Servicer(self), server)
        self._health = None
        if self.health_enabled:
            self._health = _Health(self)
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
        if self._health is not None:
            for service in ("", SERVICE_NAME):
                await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._arm_all_timers()
        self._spawn(self._cleanup_loop())

    def _check_startup_config(self) -> None:
        """Refuse to start where the runtime refuses to (src/main.rs), with its reasons."""
        if not self.identities and self.jwt is None and not self.allow_insecure:
            raise RuntimeError(
                f"pod {self.name}: no authentication configured: give auth_tokens / "
                "auth_tokens_file (MACP_AUTH_TOKENS_JSON / MACP_AUTH_TOKENS_FILE), or opt into "
                "dev-mode auth with allow_insecure (MACP_ALLOW_INSECURE=1, local development only)"
            )
        if self.server_credentials is None and not self.allow_insecure:
            raise RuntimeError(
                f"pod {self.name}: TLS is required unless allow_insecure (MACP_ALLOW_INSECURE=1): "
                "give server_credentials or allow_insecure"
            )

    async def _cleanup_loop(self) -> None:
        """The runtime's cleanup tick: evict terminal sessions past the retention window."""
        while True:
            await asyncio.sleep(self.cleanup_interval_s)
            self.evict_stale_sessions()

    def evict_stale_sessions(self) -> int:
        """Drop terminal sessions started more than `session_retention_s` ago; no event.

        The runtime removes them from memory only (its disk keeps them); the sim has no disk
        beyond the state file, so they leave the state file too.
        """
        cutoff = now_ms() - int(self.session_retention_s * 1000)
        stale = [sid for sid, rec in self.sessions.items()
                 if rec.metadata.state in TERMINAL and rec.metadata.started_at_unix_ms < cutoff]
        for sid in stale:
            rec = self.sessions.pop(sid)
            self._disarm(rec)
            self._encoded.pop(sid, None)
            self._dirty_sids.discard(sid)
        if stale:
            self._mark_dirty()
            log.info("sim pod %s evicted %d stale sessions from memory", self.name, len(stale))
        return len(stale)

    @contextlib.asynccontextmanager
    async def _connection_slot(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Hold one of the connection's in-flight slots; wait (queue) when all are taken."""
        peer = context.peer()
        slots = self._conn_slots.get(peer)
        if slots is None:
            slots = self._conn_slots[peer] = _ConnSlots(self.concurrency_limit_per_connection)
        slots.users += 1
        try:
            if slots.sem.locked():
                self.queued_calls += 1
            async with slots.sem:
                slots.active += 1
                if slots.active > self.max_in_flight:
                    self.max_in_flight = slots.active
                try:
                    yield
                finally:
                    slots.active -= 1
        finally:
            slots.users -= 1
            if slots.users == 0:
                self._conn_slots.pop(peer, None)

    async def stop(self, grace: float | None = 0) -> None:
        server = self._server
        if server is None:
            return
        self._stopping = True
        # No health flip here: the runtime answers SERVING until its server is gone.
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
        self.policies.clear()  # registries live in memory only: a restart starts empty
        self.ext_modes.clear()
        self.promoted_modes.clear()
        self._conn_slots.clear()
        self._dirty_sids.clear()
        self._encoded.clear()
        self._session_watchers.clear()
        self._signal_watchers.clear()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def hang(self) -> bool:
        """While True every MACP method waits (health is unaffected); False releases them."""
        return self._hang

    @hang.setter
    def hang(self, value: bool) -> None:
        self._hang = value
        if not value:
            for waiter in self._hang_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._hang_waiters.clear()

    async def _hang_forever(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hang_waiters.add(waiter)
        try:
            await waiter
        finally:
            self._hang_waiters.discard(waiter)

    def _note_cancelled(self, method: str) -> None:
        if not self._stopping:
            self.cancelled_calls[method] += 1

    # ── auth ───────────────────────────────────────────────────────────
    def _identity(self, token: str | None) -> Identity | None:
        """The caller's identity (None = UNAUTHENTICATED), as the runtime's resolver chain."""
        if token is None:
            return None
        if "." in token and self.jwt is not None:  # the runtime's chain: JWT resolver first
            return self.jwt.identify(token)
        if self.identities:
            if "." in token:  # JWT-shaped: the static resolver declines it
                return None
            return self.identities.get(token)
        return dev_identity(token) if self.allow_insecure else None

    def _authenticate(self, token: str | None) -> Identity:
        identity = self._identity(token)
        if identity is None:
            raise _status(grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated", UNAUTHENTICATED)
        return identity

    def _authorize_registry(self, token: str | None) -> Identity:
        identity = self._authenticate(token)
        if not identity.can_manage_mode_registry:
            raise _status(grpc.StatusCode.PERMISSION_DENIED, "Forbidden", FORBIDDEN)
        return identity

    def _check_policies_writable(self) -> None:
        if self.policies_read_only:
            raise _status(
                grpc.StatusCode.FAILED_PRECONDITION,
                "policy registry is read-only: policies are file-loaded via MACP_POLICIES_DIR",
            )

    def _access(self, session_id: str, token: str | None) -> SessionRecord:
        """The session, if the caller may read it (GetSession / subscribe rules)."""
        return self._access_as(session_id, self._authenticate(token))

    def _access_as(self, session_id: str, identity: Identity,
                   forbidden: str = "FORBIDDEN: session access denied") -> SessionRecord:
        rec = self.sessions.get(session_id)
        if rec is None:
            raise _not_found(session_id)
        self._maybe_expire(rec)
        if not (identity.is_observer or identity.sender in rec.members):
            raise _status(grpc.StatusCode.PERMISSION_DENIED, forbidden, FORBIDDEN)
        return rec

    def _authorize_and_limit(self, identity: Identity, env: envelope_pb2.Envelope) -> str | None:
        """The runtime's authorize_mode then enforce_rate_limit: an error code or None."""
        start = env.message_type == "SessionStart"
        if start and not identity.can_start_sessions:
            return FORBIDDEN
        if identity.allowed_modes is not None and env.mode not in identity.allowed_modes:
            return FORBIDDEN
        if not self.rate_limits.allow(identity.sender, is_session_start=start):
            return RATE_LIMITED
        return None

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
                    register_policy=not self.policies_read_only,
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
        if desc.mode in self.ext_modes or desc.mode in self.promoted_modes:
            return core_pb2.RegisterExtModeResponse(
                ok=False, error=f"mode '{desc.mode}' is already registered"
            )
        self.ext_modes[desc.mode] = core_pb2.ModeDescriptor()
        self.ext_modes[desc.mode].CopyFrom(desc)
        return core_pb2.RegisterExtModeResponse(ok=True)

    def _unregister_ext_mode(self, mode: str) -> core_pb2.UnregisterExtModeResponse:
        if self.ext_modes.pop(mode, None) is None:
            return core_pb2.UnregisterExtModeResponse(
                ok=False, error=f"extension mode '{mode}' not registered"
            )
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
        return core_pb2.PromoteModeResponse(ok=True, mode=new_name)

    def _register_policy(
        self, desc: policy_pb2.PolicyDescriptor
    ) -> policy_pb2.RegisterPolicyResponse:
        if not desc.policy_id:
            return policy_pb2.RegisterPolicyResponse(ok=False, error="policy_id must not be empty")
        if desc.policy_id in self.policies:
            return policy_pb2.RegisterPolicyResponse(
                ok=False, error=f"policy '{desc.policy_id}' is already registered"
            )
        stored = policy_pb2.PolicyDescriptor()
        stored.CopyFrom(desc)
        if not stored.registered_at_unix_ms:
            stored.registered_at_unix_ms = now_ms()
        self.policies[desc.policy_id] = stored
        return policy_pb2.RegisterPolicyResponse(ok=True)

    def _unregister_policy(self, policy_id: str) -> policy_pb2.UnregisterPolicyResponse:
        if self.policies.pop(policy_id, None) is None:
            return policy_pb2.UnregisterPolicyResponse(
                ok=False, error=f"Policy '{policy_id}' not found"
            )
        return policy_pb2.UnregisterPolicyResponse(ok=True)

    # ── Send ───────────────────────────────────────────────────────────
    def _shape_error(self, env: envelope_pb2.Envelope) -> str | None:
        """The runtime's validate_envelope_shape: an error code or None."""
        if env.macp_version != PROTOCOL_VERSION:
            return UNSUPPORTED_PROTOCOL_VERSION
        mtype = env.message_type
        if not mtype or not env.message_id:
            return INVALID_ENVELOPE
        ambient = mtype in ("Signal", "Progress")
        if mtype == "Signal" and (env.session_id or env.mode.strip()):
            return INVALID_ENVELOPE
        if mtype == "Progress" and not env.session_id and env.mode.strip():
            return INVALID_ENVELOPE
        if not ambient and (not env.session_id or not env.mode.strip()):
            return INVALID_ENVELOPE
        if len(env.payload) > self.max_payload_bytes:
            return PAYLOAD_TOO_LARGE
        return None

    def _send(self, env: envelope_pb2.Envelope, token: str | None) -> envelope_pb2.Ack:
        """Send: shape, authenticate, sender, authorize, rate limit, apply (never raises)."""
        code = self._shape_error(env)
        if code is not None:
            return _ack(env, code=code)
        identity = self._identity(token)
        if identity is None or (env.sender and env.sender != identity.sender):
            return _ack(env, code=UNAUTHENTICATED)
        if env.sender != identity.sender:
            accepted = envelope_pb2.Envelope()
            accepted.CopyFrom(env)
            accepted.sender = identity.sender
            env = accepted
        code = self._authorize_and_limit(identity, env)
        if code is not None:
            return _ack(env, code=code)
        return self._apply(env, identity)

    def _apply(self, env: envelope_pb2.Envelope, identity: Identity) -> envelope_pb2.Ack:
        """The runtime's `process`: an authenticated, authorized envelope (never raises)."""
        mtype = env.message_type
        if mtype in ("Signal", "Progress"):
            # Session-scoped Progress too: published, never looked up (runtime process_signal).
            return self._ambient(env)
        if mtype == "SessionStart":
            return self._start(env, identity)
        return self._message(env, identity.sender)

    def _ambient(self, env: envelope_pb2.Envelope) -> envelope_pb2.Ack:
        try:
            if env.message_type == "Signal" and env.payload:
                sig = core_pb2.SignalPayload.FromString(env.payload)
                if not sig.signal_type.strip():
                    return _ack(env, code=INVALID_ENVELOPE, message="signal_type is required")
            elif env.message_type == "Progress" and env.payload:
                core_pb2.ProgressPayload.FromString(env.payload)
        except DecodeError:
            return _ack(env, code=INVALID_ENVELOPE, message="invalid payload")
        if self._signal_watchers:
            item = core_pb2.WatchSignalsResponse(envelope=env, sender_authenticated=True)
            for sub in self._signal_watchers:
                sub.push(item)
        return _ack(env, state=OPEN)

    def _start(self, env: envelope_pb2.Envelope, identity: Identity) -> envelope_pb2.Ack:
        sender = identity.sender
        if not valid_session_id(env.session_id):
            return _ack(env, code=INVALID_SESSION_ID)
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
        if identity.max_open_sessions is not None:
            open_now = sum(1 for r in self.sessions.values()
                           if r.metadata.initiator == sender and r.metadata.state == OPEN
                           and now <= r.metadata.expires_at_unix_ms)
            if open_now >= identity.max_open_sessions:
                return _ack(env, code=RATE_LIMITED)
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
    def _control(self, session_id: str, token: str | None, action: str) -> envelope_pb2.Ack:
        sender = self._authenticate(token).sender
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
        """Every in-memory session as CREATED (terminal ones too), as the runtime's sync."""
        out = []
        for rec in self.sessions.values():
            item = core_pb2.WatchSessionsResponse()
            item.event.event_type = EV_CREATED
            item.event.session.CopyFrom(rec.metadata)
            item.event.observed_at_unix_ms = rec.metadata.started_at_unix_ms
            out.append(item)
        return out

    def _list_sessions(self) -> core_pb2.ListSessionsResponse:
        """Every in-memory session in one reply; the runtime has no paging (page_* ignored)."""
        resp = core_pb2.ListSessionsResponse()
        for rec in self.sessions.values():
            self._maybe_expire(rec)
            resp.sessions.append(rec.metadata)
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
            },
            separators=(",", ":"),
        )
        sessions = ",".join(cache[sid] for sid in self.sessions)
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
            self._dirty_sids.add(meta.session_id)


def _b64(msg: Any) -> str:
    return base64.b64encode(msg.SerializeToString()).decode("ascii")


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


async def serve_pod(listen: str, name: str, state_file: str | None, **options: Any) -> None:
    """Run one simulated pod until cancelled or SIGTERM/SIGINT (the `macp-router pod` command).

    `options` are SimPod's keyword arguments (auth, rate limits, health, ...). Logs exactly one
    line containing `ready` and the bound address once serving.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    pod = SimPod(name, listen, state_file=state_file, **options)
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
