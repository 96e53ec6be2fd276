"""Pre-serialized MACP request bytes, so the load generator spends its CPU on calls, not protobuf.

Requests are built once as templates with placeholder ids and specialised with
`bytes.replace`: a session id and a message id are both 36-character lowercase uuid4 strings,
so swapping them keeps every length prefix valid. Building one SessionStart costs ~1 us this
way instead of ~10 us with protobuf message construction.

Identity: the simulated pods (`loadtest.podproc`) have a token entry per agent whose token is
its name, so every request carries `authorization: Bearer coordinator` and
`Envelope.sender="coordinator"`, and every SessionStart lists "coordinator" as a participant.
"""

from __future__ import annotations

import uuid

from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2

SERVICE = "macp.v1.MACPRuntimeService"
SENDER = "coordinator"
PARTICIPANTS = ("coordinator", "agent-b")
MODE_DECISION = "macp.mode.decision.v1"
METADATA: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {SENDER}"),)

_SID = "00000000-0000-4000-8000-00000000a5a5"
_MID = "11111111-1111-4111-8111-11111111b6b6"
_SID_B = _SID.encode()
_MID_B = _MID.encode()


def path(method: str) -> str:
    """Full gRPC method path of a MACPRuntimeService method."""
    return f"/{SERVICE}/{method}"


def new_id() -> str:
    """A lowercase uuid4 string (36 chars), as session and message ids must be."""
    return str(uuid.uuid4())


def _envelope(message_type: str, payload: bytes) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope(
        macp_version="1.0",
        mode=MODE_DECISION,
        message_type=message_type,
        message_id=_MID,
        session_id=_SID,
        sender=SENDER,
        timestamp_unix_ms=1_700_000_000_000,
        payload=payload,
    )


def _start_payload(ttl_ms: int) -> bytes:
    return core_pb2.SessionStartPayload(
        intent="loadtest",
        participants=list(PARTICIPANTS),
        mode_version="1.0.0",
        configuration_version="config.default",
        policy_version="policy.default",
        ttl_ms=ttl_ms,
    ).SerializeToString()


def _proposal_payload() -> bytes:
    return decision_pb2.ProposalPayload(
        proposal_id="p-load", option="option-a", rationale="loadtest"
    ).SerializeToString()


_START_ENV = _envelope("SessionStart", _start_payload(600_000))
_PROPOSAL_ENV = _envelope("Proposal", _proposal_payload())

SEND_START_TEMPLATE = core_pb2.SendRequest(envelope=_START_ENV).SerializeToString()
SEND_PROPOSAL_TEMPLATE = core_pb2.SendRequest(envelope=_PROPOSAL_ENV).SerializeToString()
STREAM_START_TEMPLATE = core_pb2.StreamSessionRequest(envelope=_START_ENV).SerializeToString()
STREAM_PROPOSAL_TEMPLATE = core_pb2.StreamSessionRequest(
    envelope=_PROPOSAL_ENV
).SerializeToString()
GET_SESSION_TEMPLATE = core_pb2.GetSessionRequest(session_id=_SID).SerializeToString()


def fill(template: bytes, sid: str, message_id: str | None = None) -> bytes:
    """`template` with the placeholder session id (and message id) replaced."""
    out = template.replace(_SID_B, sid.encode())
    if message_id is not None:
        out = out.replace(_MID_B, message_id.encode())
    return out


def send_start(sid: str) -> bytes:
    """SendRequest bytes: a decision-mode SessionStart for `sid` (fresh message id)."""
    return fill(SEND_START_TEMPLATE, sid, new_id())


def send_proposal(sid: str, message_id: str | None = None) -> bytes:
    """SendRequest bytes: a decision-mode Proposal in `sid`.

    With a fixed message id the runtime answers `ok, duplicate` from the second send on, which
    is still a full routed call; pass a fresh id to make the pod accept a new message.
    """
    return fill(SEND_PROPOSAL_TEMPLATE, sid, message_id or new_id())


def stream_proposal(sid: str, message_id: str | None = None) -> bytes:
    """StreamSessionRequest bytes carrying a Proposal envelope for `sid`."""
    return fill(STREAM_PROPOSAL_TEMPLATE, sid, message_id or new_id())


def stream_start(sid: str) -> bytes:
    """StreamSessionRequest bytes carrying a SessionStart envelope for `sid`."""
    return fill(STREAM_START_TEMPLATE, sid, new_id())


def get_session(sid: str) -> bytes:
    """GetSessionRequest bytes for `sid`."""
    return fill(GET_SESSION_TEMPLATE, sid)


def ack_error(response: bytes) -> str | None:
    """None if a SendResponse's Ack is ok (duplicates count as ok), else "ACK_<code>"."""
    ack = core_pb2.SendResponse.FromString(response).ack
    if ack.ok or ack.duplicate:
        return None
    return f"ACK_{ack.error.code or 'UNKNOWN'}"


def stream_error(response: bytes) -> str | None:
    """None if a StreamSessionResponse carries an envelope, else "STREAM_<error code>"."""
    msg = core_pb2.StreamSessionResponse.FromString(response)
    if msg.HasField("error") and msg.error.code:
        return f"STREAM_{msg.error.code}"
    return None


def send_commitment(sid: str) -> bytes:
    """SendRequest bytes: a Commitment in `sid` (ends a decision session: RESOLVED)."""
    payload = core_pb2.CommitmentPayload(
        commitment_id=new_id(), action="loadtest.resolved", authority_scope="loadtest",
        reason="loadtest", mode_version="1.0.0", policy_version="policy.default",
        configuration_version="config.default",
    ).SerializeToString()
    env = _envelope("Commitment", payload)
    env.session_id = sid
    env.message_id = new_id()
    return core_pb2.SendRequest(envelope=env).SerializeToString()
