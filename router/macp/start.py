"""Start-class MACP calls: a SessionStart is placed, forwarded, and its reservation settled.

Unary (`Send` of a SessionStart envelope): `SessionRouter.start` reserves the sid on a pod
(`Locator.place`), forwards the bytes there, and settles the reservation from the Ack
(`MacpBackend.start_outcome`). A StreamSession whose first frame is a SessionStart is placed
the same way (`place_for_stream`) and settled from the stream's first answer
(`settle_from_answer`, `settle_from_status`).

Invariants:
- A start without a session id is INVALID_ARGUMENT, never placed.
- The reservation is confirmed when the pod accepted the start (or already had the session),
  released only when the pod provably did not accept it and only by the call that made it,
  and otherwise left to its TTL (an answer nobody can read).
"""

from __future__ import annotations

import grpc
from macp.v1 import core_pb2

from router.core.call import Call
from router.core.session_router import SessionRouter, StartOutcome
from router.macp.backend import is_connect_failure


async def start_unary(core: SessionRouter, call: Call, sid: str, request: bytes) -> bytes:
    """A unary SessionStart: place, forward, settle (see the module docstring)."""
    return await core.start(call, sid, request)


async def place_for_stream(core: SessionRouter, call: Call, sid: str) -> tuple[str, bool]:
    """Reserve `sid` for a stream whose first frame starts it: (owner, won)."""
    call.sid = sid
    return await core.place(call, sid)


def outcome_of_answer(answer: core_pb2.StreamSessionResponse, sid: str) -> StartOutcome:
    """A start stream's first answer: the echoed start accepts, an inline error refuses."""
    if answer.HasField("envelope"):
        return StartOutcome.ACCEPTED if answer.envelope.session_id == sid else StartOutcome.UNKNOWN
    return StartOutcome.REFUSED


def outcome_of_status(exc: grpc.aio.AioRpcError) -> StartOutcome:
    """A start stream that ended before any answer: ALREADY_EXISTS accepts; INVALID_ARGUMENT
    or a connect failure (never sent) refuses; anything else is unknown."""
    code = exc.code()
    if code is grpc.StatusCode.ALREADY_EXISTS:
        return StartOutcome.ACCEPTED
    if code is grpc.StatusCode.INVALID_ARGUMENT or is_connect_failure(exc):
        return StartOutcome.REFUSED
    return StartOutcome.UNKNOWN
