"""Raw MACP calls for tests: envelopes built once, sent as bytes through grpc.aio."""

from __future__ import annotations

import uuid

import grpc
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2

AGENT = "coordinator"
METADATA = (("authorization", f"Bearer {AGENT}"),)
MODE = "macp.mode.decision.v1"
TIMEOUT = 10.0


def start_envelope(sid: str | None = None, message_id: str | None = None) -> envelope_pb2.Envelope:
    payload = core_pb2.SessionStartPayload(
        intent="test", participants=[AGENT, "reviewer"], ttl_ms=600_000,
        mode_version="1.0.0", configuration_version="config.default", policy_version="",
    )
    return envelope_pb2.Envelope(
        macp_version="1.0", mode=MODE, message_type="SessionStart",
        message_id=message_id or str(uuid.uuid4()), session_id=sid or str(uuid.uuid4()),
        sender=AGENT, payload=payload.SerializeToString(),
    )


def proposal_envelope(sid: str) -> envelope_pb2.Envelope:
    from macp.modes.decision.v1 import decision_pb2

    payload = decision_pb2.ProposalPayload(proposal_id=str(uuid.uuid4()), option="a")
    return envelope_pb2.Envelope(
        macp_version="1.0", mode=MODE, message_type="Proposal", message_id=str(uuid.uuid4()),
        session_id=sid, sender=AGENT, payload=payload.SerializeToString(),
    )


def stub(channel: grpc.aio.Channel) -> core_pb2_grpc.MACPRuntimeServiceStub:
    return core_pb2_grpc.MACPRuntimeServiceStub(channel)


async def send(channel: grpc.aio.Channel, envelope: envelope_pb2.Envelope) -> envelope_pb2.Ack:
    reply = await stub(channel).Send(
        core_pb2.SendRequest(envelope=envelope), metadata=METADATA, timeout=TIMEOUT
    )
    return reply.ack


async def start(channel: grpc.aio.Channel, sid: str | None = None) -> str:
    envelope = start_envelope(sid)
    ack = await send(channel, envelope)
    assert ack.ok, ack
    return envelope.session_id


async def get_session(channel: grpc.aio.Channel, sid: str) -> core_pb2.GetSessionResponse:
    return await stub(channel).GetSession(
        core_pb2.GetSessionRequest(session_id=sid), metadata=METADATA, timeout=TIMEOUT
    )
