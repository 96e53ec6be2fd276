"""One StreamSession call of the simulated pod: the bound session and the outgoing mailbox.

Job: the runtime's `stream_session` / `process_stream_request` for the frames of one
bidirectional stream: subscribe frames (replay after a sequence, then live), envelope frames
(checked, admitted and handed to the session engine), half-close and broken request streams.

Invariants:
- The stream binds to the first frame's session id before that frame is processed, known or
  not; every later frame must carry the same id (INVALID_ARGUMENT otherwise).
- A status in `STREAM_TERMINAL_CODES` ends the stream; any other error is answered inline as a
  `MACPError` (code = message = the status message, session_id = the bound session) and the
  stream stays open.
- Accepted envelopes of the bound session reach the mailbox in sequence order, each once (the
  start too, when this stream started the session).
- The reader only pushes into the mailbox; the handler (`router.sim.servicer`) drains it and
  unbinds when the call ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from macp.v1 import core_pb2, envelope_pb2

from router.sim.auth import Identity
from router.sim.engine import SessionEngine
from router.sim.mailbox import END, Subscriber
from router.sim.protocol import (
    HALF_CLOSE_GRACE_S,
    OPEN,
    STREAM_TERMINAL_CODES,
    UNAUTHENTICATED,
    Abort,
    error_status,
)
from router.sim.record import SessionRecord

_ONE_SESSION = "StreamSession may only carry envelopes for one session_id"


class SessionStream:
    """The state of one StreamSession call (see the module docstring).

    Frames are handled as the runtime's `process_stream_request` does: a status in
    `STREAM_TERMINAL_CODES` ends the stream; any other error is sent inline as a `MACPError`
    (code and message = the status message, session_id = the bound session) and the stream
    stays open. The stream binds to the first envelope's session id before it is processed,
    known or not; accepted envelopes of the bound session are streamed back (the start too).
    """

    __slots__ = ("bound", "bound_sid", "engine", "identity", "out")

    def __init__(self, engine: SessionEngine, identity: Identity) -> None:
        self.engine = engine
        self.identity = identity
        self.out = Subscriber()
        self.bound: SessionRecord | None = None
        self.bound_sid: str | None = None

    def unbind(self) -> None:
        if self.bound is not None:
            self.bound.subs.discard(self.out)

    def _bind(self, sid: str) -> None:
        if self.bound_sid is None:
            self.bound_sid = sid
        if self.bound is None and sid == self.bound_sid:
            rec = self.engine.sessions.get(sid)
            if rec is not None:
                self.bound = rec
                rec.subs.add(self.out)

    async def read(self, frames: AsyncIterator[core_pb2.StreamSessionRequest]) -> None:
        try:
            async for frame in frames:
                try:
                    self._frame(frame)
                except Abort as exc:
                    if exc.code in STREAM_TERMINAL_CODES:
                        raise
                    self._inline(exc.details)
            # grpc.aio ends a cancelled call's request stream just like a half-close, and the
            # cancellation reaches the handler a moment later; the real runtime tells the two
            # apart, so wait that moment before treating the end as a half-close.
            await asyncio.sleep(HALF_CLOSE_GRACE_S)
            self.out.push(END)  # half-close: end OK after what is already queued
        except Abort as exc:
            self.out.push(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken request stream; end the call rather than hang
            self.out.push(Abort(grpc.StatusCode.INTERNAL, f"StreamSession read failed: {exc}"))

    def _inline(self, text: str) -> None:
        err = core_pb2.StreamSessionResponse()
        err.error.code = text
        err.error.message = text
        err.error.session_id = self.bound_sid or ""
        self.out.push(err)

    def _frame(self, frame: core_pb2.StreamSessionRequest) -> None:
        if frame.subscribe_session_id:
            if frame.HasField("envelope"):
                raise Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "StreamSessionRequest must not contain both envelope and subscribe_session_id",
                )
            self._subscribe(frame.subscribe_session_id, frame.after_sequence)
            return
        if not frame.HasField("envelope"):
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "StreamSessionRequest must contain an envelope or subscribe_session_id",
            )
        self._envelope(self._admitted(frame.envelope))

    def _subscribe(self, sid: str, after_sequence: int) -> None:
        """Bind to `sid` and replay its envelopes after `after_sequence`; live ones follow."""
        if self.bound_sid is not None and self.bound_sid != sid:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, _ONE_SESSION)
        rec = self.engine.access_as(sid, self.identity,
                                    forbidden="FORBIDDEN: caller is not a declared participant or "
                                              "observer for this session")
        self._bind(sid)
        for env in rec.log[after_sequence:]:
            self.out.push(core_pb2.StreamSessionResponse(envelope=env))

    def _admitted(self, env: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
        """Shape, session-id, mode and sender checks; the envelope as the caller's identity."""
        code = self.engine.admission.shape_error(env)
        if code is not None:
            raise error_status(code)
        if not env.session_id.strip():
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        "StreamSession requires a non-empty session_id")
        if not env.mode.strip():
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        "StreamSession requires a non-empty mode")
        if self.bound_sid is not None and self.bound_sid != env.session_id:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, _ONE_SESSION)
        identity = self.identity
        if env.sender and env.sender != identity.sender:
            raise error_status(UNAUTHENTICATED)
        if env.sender != identity.sender:
            accepted = envelope_pb2.Envelope()
            accepted.CopyFrom(env)
            accepted.sender = identity.sender
            env = accepted
        return env

    def _envelope(self, env: envelope_pb2.Envelope) -> None:
        """Check the bound session, authorize, apply; stream the start if this frame made it."""
        engine = self.engine
        identity = self.identity
        start = env.message_type == "SessionStart"
        if not start:
            rec = engine.sessions.get(env.session_id)
            if rec is not None:
                engine.maybe_expire(rec)
                if env.mode != rec.metadata.mode:
                    raise Abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "INVALID_ENVELOPE: envelope mode does not match the bound session mode",
                    )
                if rec.metadata.state != OPEN:
                    raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "SESSION_NOT_OPEN")
        code = engine.admission.authorize_and_limit(identity, env)
        if code is not None:
            raise error_status(code)
        self._bind(env.session_id)
        existed = self.bound is not None
        ack = engine.apply(env, identity)
        if not ack.ok:
            raise error_status(ack.error.code)
        if not existed:
            self._bind(env.session_id)
            if self.bound is not None and start and not ack.duplicate:
                # Started by this frame: the start envelope was broadcast before we subscribed.
                self.out.push(core_pb2.StreamSessionResponse(envelope=self.bound.log[0]))
