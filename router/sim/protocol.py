"""The wire-level vocabulary of the simulated runtime: constants, error codes, Acks, statuses.

Job: one place for what every other `router.sim` module speaks: protocol and runtime versions,
the standard modes, session states and lifecycle event types, the registry error codes with the
display string and gRPC status the runtime gives each (`src/server.rs` `status_from_error`),
Ack construction and the session-id acceptance rule.

Invariants:
- Pure: no state, no I/O, no event loop; everything here is a constant or a function of its
  arguments (`now_ms` reads the wall clock).
- `Abort` is the only way a helper ends the current RPC with a status; the gRPC glue
  (`router.sim.servicer`) sends it, with the registry code in a `macp-error-code` trailer.
- An Ack's `error.message` is the runtime's display string for a known code.
"""

from __future__ import annotations

import time
import uuid

import grpc
from macp.v1 import core_pb2, envelope_pb2

SERVICE_NAME = "macp.v1.MACPRuntimeService"
PROTOCOL_VERSION = "1.0"
RUNTIME_VERSION = "0.6.1-sim"
HALF_CLOSE_GRACE_S = 0.01
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


class Abort(Exception):
    """A gRPC status to end the current RPC with (raised inside helpers, sent by handlers)."""

    def __init__(self, code: grpc.StatusCode, details: str, macp_code: str | None = None):
        super().__init__(details)
        self.code = code
        self.details = details
        self.macp_code = macp_code


def make_ack(
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
        known = RUNTIME_ERRORS.get(code)
        ack.error.message = known[0] if known is not None else (message or code)
        ack.error.session_id = env.session_id
        ack.error.message_id = env.message_id
    return ack


def control_ack(
    session_id: str, *, state: int = 0, code: str | None = None, message: str = ""
) -> envelope_pb2.Ack:
    return make_ack(
        envelope_pb2.Envelope(session_id=session_id), state=state, code=code, message=message
    )


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


def status_error(code: grpc.StatusCode, details: str, macp_code: str | None = None) -> Abort:
    return Abort(code, details, macp_code)


# Registry code -> the runtime's MacpError display string and the status `status_from_error`
# gives it (src/server.rs); Ack.error.message carries the display string, as the runtime's does.
PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
RUNTIME_ERRORS: dict[str, tuple[str, grpc.StatusCode]] = {
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


def error_status(code: str) -> Abort:
    """The status the runtime raises for a registry error code outside Send."""
    display, status = RUNTIME_ERRORS.get(code, (code, grpc.StatusCode.FAILED_PRECONDITION))
    return Abort(status, display, code)


def not_found(session_id: str) -> Abort:
    return Abort(grpc.StatusCode.NOT_FOUND, f"Session '{session_id}' not found", SESSION_NOT_FOUND)


