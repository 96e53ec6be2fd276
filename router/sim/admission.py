"""Admission of a request by the simulated pod: who is calling, may they, and is it well formed.

Job: the runtime's SecurityLayer and envelope checks, in its order: resolve the bearer token to
an identity (JWT resolver first, then static token entries, else dev mode), require registry
rights for registry writes, `authorize_mode` then the per-sender rate limit for envelopes, and
`validate_envelope_shape` (protocol version, ids, ambient message rules, payload size).

Invariants:
- Stateless apart from the rate limiter's windows: the same token always maps to the same
  identity; nothing here looks at sessions.
- Dev mode (any token is a full identity named by it) only with `allow_insecure` and no token
  entries; a JWT-shaped token (with a dot) never matches a static entry.
- Errors are registry codes (`shape_error`, `authorize_and_limit`) or `Abort` statuses
  (`authenticate`, `authorize_registry`); the caller decides in-band versus status.
"""

from __future__ import annotations

import grpc
from macp.v1 import envelope_pb2

from router.sim.auth import Identity, JwtHs256, RateLimiter, dev_identity
from router.sim.protocol import (
    FORBIDDEN,
    INVALID_ENVELOPE,
    PAYLOAD_TOO_LARGE,
    PROTOCOL_VERSION,
    RATE_LIMITED,
    UNAUTHENTICATED,
    UNSUPPORTED_PROTOCOL_VERSION,
    status_error,
)


class Admission:
    """Authentication, authorization, rate limits and envelope shape of one pod."""

    def __init__(
        self,
        identities: dict[str, Identity],
        *,
        jwt: JwtHs256 | None,
        allow_insecure: bool,
        rate_limits: RateLimiter,
        max_payload_bytes: int,
    ) -> None:
        self.identities = identities
        self.jwt = jwt
        self.allow_insecure = allow_insecure
        self.rate_limits = rate_limits
        self.max_payload_bytes = max_payload_bytes

    def identity(self, token: str | None) -> Identity | None:
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

    def authenticate(self, token: str | None) -> Identity:
        identity = self.identity(token)
        if identity is None:
            raise status_error(grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated", UNAUTHENTICATED)
        return identity

    def authorize_registry(self, token: str | None) -> Identity:
        identity = self.authenticate(token)
        if not identity.can_manage_mode_registry:
            raise status_error(grpc.StatusCode.PERMISSION_DENIED, "Forbidden", FORBIDDEN)
        return identity

    def authorize_and_limit(self, identity: Identity, env: envelope_pb2.Envelope) -> str | None:
        """The runtime's authorize_mode then enforce_rate_limit: an error code or None."""
        start = env.message_type == "SessionStart"
        if start and not identity.can_start_sessions:
            return FORBIDDEN
        if identity.allowed_modes is not None and env.mode not in identity.allowed_modes:
            return FORBIDDEN
        if not self.rate_limits.allow(identity.sender, is_session_start=start):
            return RATE_LIMITED
        return None

    def shape_error(self, env: envelope_pb2.Envelope) -> str | None:
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
