"""The session engine of the simulated pod: start, message, control, expiry and eviction.

Job: the runtime's `Runtime::process` for admitted envelopes (SessionStart, session messages,
Signal / Progress), CancelSession / SuspendSession / ResumeSession, session reads with their
membership rule, TTL and suspension-cap expiry, and the retention sweep of terminal sessions.

Invariants:
- The event loop is the only lock: every state change, its lifecycle event (`LifecycleBus`)
  and its persistence mark (`StateFile`) happen in one synchronous step; nothing here awaits.
- Send's protocol errors are Acks (`ok=false`, registry code), never raised; control and read
  errors are `Abort` statuses.
- An OPEN session past its TTL is never served: it is expired lazily on access and by its
  timer; a SUSPENDED session expires when its suspension cap runs out. Every session in a
  non-terminal state has exactly one timer; terminal sessions have none.
- `sessions` is in creation order and per-call work is O(1) in the number of sessions
  (except `max_open_sessions`, ListSessions and the eviction sweep, as in the runtime).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf.message import DecodeError
from macp.v1 import core_pb2, envelope_pb2

from router.sim.admission import Admission
from router.sim.auth import Identity
from router.sim.bus import LifecycleBus
from router.sim.persistence import StateFile
from router.sim.protocol import (
    CANCELLED,
    DEFAULT_MAX_SUSPEND_MS,
    EV_CANCELLED,
    EV_CREATED,
    EV_EXPIRED,
    EV_RESOLVED,
    EV_RESUMED,
    EV_SUSPENDED,
    EXPIRED,
    FORBIDDEN,
    INVALID_ENVELOPE,
    INVALID_SESSION_ID,
    MAX_TTL_MS,
    MODE_NOT_SUPPORTED,
    OPEN,
    RATE_LIMITED,
    RESOLVED,
    SESSION_ALREADY_EXISTS,
    SESSION_NOT_FOUND,
    SESSION_NOT_OPEN,
    STANDARD_MODES,
    SUSPENDED,
    TERMINAL,
    UNAUTHENTICATED,
    control_ack,
    make_ack,
    not_found,
    now_ms,
    status_error,
    valid_session_id,
)
from router.sim.record import SessionRecord
from router.sim.registries import Registries

log = logging.getLogger("router.sim")


class SessionEngine:
    """The sessions of one pod and every rule that changes them."""

    def __init__(
        self,
        name: str,
        *,
        admission: Admission,
        registries: Registries,
        bus: LifecycleBus,
        state: StateFile,
        sessions: dict[str, SessionRecord],
        session_retention_s: float,
    ) -> None:
        self.name = name
        self.admission = admission
        self.registries = registries
        self.bus = bus
        self.state = state
        self.sessions = sessions  # in creation order
        self.session_retention_s = session_retention_s

    def access(self, session_id: str, token: str | None) -> SessionRecord:
        """The session, if the caller may read it (GetSession / subscribe rules)."""
        return self.access_as(session_id, self.admission.authenticate(token))

    def access_as(self, session_id: str, identity: Identity,
                   forbidden: str = "FORBIDDEN: session access denied") -> SessionRecord:
        rec = self.sessions.get(session_id)
        if rec is None:
            raise not_found(session_id)
        self.maybe_expire(rec)
        if not (identity.is_observer or identity.sender in rec.members):
            raise status_error(grpc.StatusCode.PERMISSION_DENIED, forbidden, FORBIDDEN)
        return rec

    def send(self, env: envelope_pb2.Envelope, token: str | None) -> envelope_pb2.Ack:
        """Send: shape, authenticate, sender, authorize, rate limit, apply (never raises)."""
        code = self.admission.shape_error(env)
        if code is not None:
            return make_ack(env, code=code)
        identity = self.admission.identity(token)
        if identity is None or (env.sender and env.sender != identity.sender):
            return make_ack(env, code=UNAUTHENTICATED)
        if env.sender != identity.sender:
            accepted = envelope_pb2.Envelope()
            accepted.CopyFrom(env)
            accepted.sender = identity.sender
            env = accepted
        code = self.admission.authorize_and_limit(identity, env)
        if code is not None:
            return make_ack(env, code=code)
        return self.apply(env, identity)

    def apply(self, env: envelope_pb2.Envelope, identity: Identity) -> envelope_pb2.Ack:
        """The runtime's `process`: an authenticated, authorized envelope (never raises)."""
        mtype = env.message_type
        if mtype in ("Signal", "Progress"):
            # Session-scoped Progress too: published, never looked up (runtime process_signal).
            return self.ambient(env)
        if mtype == "SessionStart":
            return self.start(env, identity)
        return self.message(env, identity.sender)

    def ambient(self, env: envelope_pb2.Envelope) -> envelope_pb2.Ack:
        try:
            if env.message_type == "Signal" and env.payload:
                sig = core_pb2.SignalPayload.FromString(env.payload)
                if not sig.signal_type.strip():
                    return make_ack(env, code=INVALID_ENVELOPE, message="signal_type is required")
            elif env.message_type == "Progress" and env.payload:
                core_pb2.ProgressPayload.FromString(env.payload)
        except DecodeError:
            return make_ack(env, code=INVALID_ENVELOPE, message="invalid payload")
        self.bus.publish_signal(env)
        return make_ack(env, state=OPEN)

    def start(self, env: envelope_pb2.Envelope, identity: Identity) -> envelope_pb2.Ack:
        """SessionStart, checked in the runtime's order (process_session_start)."""
        refused = self._start_refusal(env)
        if refused is not None:
            return refused
        start = self._start_payload(env)
        if isinstance(start, envelope_pb2.Ack):
            return start
        now = now_ms()
        if self._at_open_session_limit(identity, now):
            return make_ack(env, code=RATE_LIMITED)
        rec = self._new_record(env, identity.sender, start, now)
        self.sessions[env.session_id] = rec
        self.record_activity(rec, identity.sender, now)
        self.arm_ttl(rec)
        self.accept(rec, env)
        self.bus.emit(EV_CREATED, rec, now)
        self.state.mark_dirty(rec)
        return make_ack(env, state=OPEN)

    def _start_refusal(self, env: envelope_pb2.Envelope) -> envelope_pb2.Ack | None:
        """The Ack for a bad session id, an existing session or an unknown mode; else None."""
        if not valid_session_id(env.session_id):
            return make_ack(env, code=INVALID_SESSION_ID)
        existing = self.sessions.get(env.session_id)
        if existing is not None:
            if env.message_id in existing.seen:
                return make_ack(env, state=existing.metadata.state, duplicate=True)
            return make_ack(
                env,
                code=SESSION_ALREADY_EXISTS,
                message=f"Session '{env.session_id}' already exists",
            )
        mode = env.mode
        if (
            mode not in STANDARD_MODES
            and mode not in self.registries.ext_modes
            and mode not in self.registries.promoted_modes
        ):
            return make_ack(env, code=MODE_NOT_SUPPORTED, message=f"unknown mode '{mode}'")
        return None

    @staticmethod
    def _start_payload(
        env: envelope_pb2.Envelope,
    ) -> core_pb2.SessionStartPayload | envelope_pb2.Ack:
        """The decoded, valid SessionStartPayload, or the INVALID_ENVELOPE Ack."""
        if not env.payload:
            return make_ack(env, code=INVALID_ENVELOPE, message="SessionStart payload is required")
        try:
            start = core_pb2.SessionStartPayload.FromString(env.payload)
        except DecodeError:
            return make_ack(env, code=INVALID_ENVELOPE, message="invalid SessionStartPayload")
        if not 1 <= start.ttl_ms <= MAX_TTL_MS:
            return make_ack(env, code=INVALID_ENVELOPE, message="ttl_ms out of range")
        if start.max_suspend_ms < 0 or len(set(start.participants)) != len(start.participants):
            return make_ack(env, code=INVALID_ENVELOPE, message="invalid SessionStartPayload")
        return start

    def _at_open_session_limit(self, identity: Identity, now: int) -> bool:
        """`max_open_sessions`: open, unexpired sessions initiated by this sender."""
        if identity.max_open_sessions is None:
            return False
        sender = identity.sender
        open_now = sum(1 for r in self.sessions.values()
                       if r.metadata.initiator == sender and r.metadata.state == OPEN
                       and now <= r.metadata.expires_at_unix_ms)
        return open_now >= identity.max_open_sessions

    @staticmethod
    def _new_record(
        env: envelope_pb2.Envelope, sender: str, start: core_pb2.SessionStartPayload, now: int
    ) -> SessionRecord:
        meta = core_pb2.SessionMetadata(
            session_id=env.session_id,
            mode=env.mode,
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
        return rec

    def message(self, env: envelope_pb2.Envelope, sender: str) -> envelope_pb2.Ack:
        rec = self.sessions.get(env.session_id)
        if rec is None:
            return make_ack(
                env, code=SESSION_NOT_FOUND, message=f"Session '{env.session_id}' not found"
            )
        meta = rec.metadata
        if env.message_id in rec.seen:
            return make_ack(env, state=meta.state, duplicate=True)
        if env.mode != meta.mode:
            return make_ack(
                env, code=INVALID_ENVELOPE, message="envelope mode does not match the session mode"
            )
        self.maybe_expire(rec)
        if meta.state != OPEN:
            return make_ack(
                env, code=SESSION_NOT_OPEN, message=f"Session '{env.session_id}' is not open"
            )
        if sender not in rec.members:
            return make_ack(
                env, code=FORBIDDEN, message="sender is not a declared participant of this session"
            )
        now = now_ms()
        rec.seen.add(env.message_id)
        self.record_activity(rec, sender, now)
        self.accept(rec, env)
        if env.message_type == "Commitment":
            meta.state = RESOLVED
            self.disarm(rec)
            self.bus.emit(EV_RESOLVED, rec, now)
        self.state.mark_dirty(rec)
        return make_ack(env, state=meta.state)

    def record_activity(self, rec: SessionRecord, sender: str, now: int) -> None:
        act = rec.activity.get(sender)
        if act is None:
            act = rec.metadata.participant_activity.add(participant_id=sender)
            rec.activity[sender] = act
        act.last_message_at_unix_ms = now
        act.message_count += 1

    def accept(self, rec: SessionRecord, env: envelope_pb2.Envelope) -> None:
        rec.log.append(env)
        if rec.subs:
            item = core_pb2.StreamSessionResponse(envelope=env)
            for sub in rec.subs:
                sub.push(item)

    # ── control plane ──────────────────────────────────────────────────
    def control(self, session_id: str, token: str | None, action: str) -> envelope_pb2.Ack:
        sender = self.admission.authenticate(token).sender
        rec = self.sessions.get(session_id)
        if rec is None:
            raise not_found(session_id)
        if sender != rec.metadata.initiator:
            raise status_error(
                grpc.StatusCode.PERMISSION_DENIED,
                f"FORBIDDEN: only the session initiator can {action}",
                FORBIDDEN,
            )
        self.maybe_expire(rec)
        meta = rec.metadata
        now = now_ms()
        if action == "cancel":
            if meta.state in TERMINAL:
                return control_ack(session_id, state=meta.state)
            meta.state = CANCELLED
            self.disarm(rec)
            self.bus.emit(EV_CANCELLED, rec, now)
        elif action == "suspend":
            if meta.state != OPEN:
                return control_ack(
                    session_id, code=SESSION_NOT_OPEN, message=f"Session '{session_id}' is not open"
                )
            meta.state = SUSPENDED
            rec.banked_ms = max(0, meta.expires_at_unix_ms - now)
            self.arm(rec, now + rec.max_suspend_ms)
            self.bus.emit(EV_SUSPENDED, rec, now)
        else:
            if meta.state != SUSPENDED:
                return control_ack(
                    session_id,
                    code=SESSION_NOT_OPEN,
                    message=f"Session '{session_id}' is not suspended",
                )
            meta.state = OPEN
            meta.expires_at_unix_ms = now + rec.banked_ms
            rec.banked_ms = 0
            self.arm_ttl(rec)
            self.bus.emit(EV_RESUMED, rec, now)
        self.state.mark_dirty(rec)
        return control_ack(session_id, state=meta.state)

    # ── expiry timers ──────────────────────────────────────────────────
    def arm_ttl(self, rec: SessionRecord) -> None:
        self.arm(rec, rec.metadata.expires_at_unix_ms)

    def arm(self, rec: SessionRecord, at_unix_ms: int) -> None:
        if rec.timer is not None:
            rec.timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, (at_unix_ms - now_ms()) / 1000.0)
        rec.timer = loop.call_later(delay, self.on_timer, rec, at_unix_ms)

    def disarm(self, rec: SessionRecord) -> None:
        if rec.timer is not None:
            rec.timer.cancel()
            rec.timer = None

    def arm_all_timers(self) -> None:
        for rec in self.sessions.values():
            state = rec.metadata.state
            if state == OPEN:
                self.arm_ttl(rec)
            elif state == SUSPENDED:  # suspension start is not persisted: restart the cap
                self.arm(rec, now_ms() + rec.max_suspend_ms)

    def on_timer(self, rec: SessionRecord, at_unix_ms: int) -> None:
        rec.timer = None
        if rec.metadata.state in (OPEN, SUSPENDED):
            if now_ms() < at_unix_ms:  # fired a little early: re-arm for the remainder
                self.arm(rec, at_unix_ms)
                return
            self.expire(rec)

    def maybe_expire(self, rec: SessionRecord) -> None:
        """Lazy expiry, as the runtime's get_session_checked: never serve a stale OPEN."""
        meta = rec.metadata
        if meta.state == OPEN and now_ms() > meta.expires_at_unix_ms:
            self.expire(rec)

    def expire(self, rec: SessionRecord) -> None:
        self.disarm(rec)
        rec.metadata.state = EXPIRED
        self.bus.emit(EV_EXPIRED, rec, now_ms())
        self.state.mark_dirty(rec)

    # ── reads ──────────────────────────────────────────────────────────
    def list_sessions(self) -> core_pb2.ListSessionsResponse:
        """Every in-memory session in one reply; the runtime has no paging (page_* ignored)."""
        resp = core_pb2.ListSessionsResponse()
        for rec in self.sessions.values():
            self.maybe_expire(rec)
            resp.sessions.append(rec.metadata)
        return resp

    # ── eviction ───────────────────────────────────────────────────────
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
            self.disarm(rec)
            self.state.forget(sid)
        if stale:
            self.state.mark_dirty()
            log.info("sim pod %s evicted %d stale sessions from memory", self.name, len(stale))
        return len(stale)
