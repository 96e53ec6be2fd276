"""Identities and rate limits of the simulated pod, as macp-runtime v0.6.1 configures them.

Job: parse the runtime's `MACP_AUTH_TOKENS_JSON` / `MACP_AUTH_TOKENS_FILE` shape (a JSON list
of token entries, or `{"tokens": [...]}`), resolve a call's bearer token to an `Identity`, and
keep the runtime's per-sender sliding-window rate limits (`MACP_SESSION_START_LIMIT_PER_MINUTE`,
default 60; `MACP_MESSAGE_LIMIT_PER_MINUTE`, default 600).

Invariants (the runtime's `crates/macp-auth/src/security.rs` and `auth/`):
- A token entry has `token` and `sender` (required strings), `allowed_modes` (list, empty =
  any), `can_start_sessions` (default true), `max_open_sessions` (default none),
  `can_manage_mode_registry` (default false), `is_observer` (default false). Unknown keys are
  ignored, as serde does.
- With token entries configured, only those tokens authenticate; a token containing a dot is
  JWT-shaped and never matches a static entry: it authenticates only through the JWT resolver
  (`JwtHs256`, when the pod is given one), as `sub` with the rights of its `macp_scopes`.
- Without entries the pod runs in the runtime's dev mode (allowed only with allow_insecure):
  any bearer token is a fully privileged identity whose sender is the token itself, never an
  observer.
- The token is read from `authorization: Bearer <t>` (exact, case-sensitive prefix) or, failing
  that, `x-macp-token: <t>`.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_START_LIMIT_PER_MINUTE = 60
DEFAULT_MESSAGE_LIMIT_PER_MINUTE = 600
RATE_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Identity:
    """What the runtime's `AuthIdentity` carries for one authenticated caller."""

    sender: str
    allowed_modes: frozenset[str] | None = None
    can_start_sessions: bool = True
    max_open_sessions: int | None = None
    can_manage_mode_registry: bool = False
    is_observer: bool = False


@dataclass(frozen=True, slots=True)
class JwtHs256:
    """The runtime's JWT resolver with a shared-secret key (MACP_AUTH_ISSUER, MACP_AUTH_AUDIENCE,
    an `oct` key in MACP_AUTH_JWKS_JSON, MACP_AUTH_JWT_ALGS=HS256): signature, `iss`, `aud` and
    `exp` are checked; the identity is `sub`, its rights come from the `macp_scopes` claim
    (crates/macp-auth/src/auth/resolvers/jwt_bearer.rs)."""

    issuer: str
    audience: str
    secret: bytes

    def identify(self, token: str) -> Identity | None:
        import base64
        import hashlib
        import hmac

        def b64(text: str) -> bytes:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

        parts = token.split(".")
        if len(parts) != 3:
            return None
        try:
            header, claims = json.loads(b64(parts[0])), json.loads(b64(parts[1]))
            signature = b64(parts[2])
        except ValueError:
            return None
        if not isinstance(header, dict) or header.get("alg") != "HS256":
            return None
        expected = hmac.new(self.secret, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256)
        if not hmac.compare_digest(expected.digest(), signature) or not isinstance(claims, dict):
            return None
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        exp = claims.get("exp")
        if (claims.get("iss") != self.issuer or self.audience not in audiences
                or not isinstance(exp, (int, float)) or exp <= time.time()
                or not isinstance(claims.get("sub"), str)):
            return None
        scopes = claims.get("macp_scopes") or {}
        if not isinstance(scopes, dict):
            return None
        modes = scopes.get("allowed_modes")
        return Identity(
            sender=claims["sub"],
            allowed_modes=frozenset(modes) if modes else None,
            can_start_sessions=bool(scopes.get("can_start_sessions", True)),
            max_open_sessions=scopes.get("max_open_sessions"),
            can_manage_mode_registry=bool(scopes.get("can_manage_mode_registry", False)),
            is_observer=bool(scopes.get("is_observer", False)),
        )

    def sign(self, sub: str, *, ttl_s: float = 3600, **scopes: Any) -> str:
        """A token this resolver accepts (for tests and the demo)."""
        import base64
        import hashlib
        import hmac

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).decode().rstrip("=")

        header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = {"sub": sub, "iss": self.issuer, "aud": self.audience,
                  "exp": int(time.time() + ttl_s)}
        if scopes:
            claims["macp_scopes"] = scopes
        payload = b64(json.dumps(claims).encode())
        signature = hmac.new(self.secret, f"{header}.{payload}".encode(), hashlib.sha256)
        return f"{header}.{payload}.{b64(signature.digest())}"


def dev_identity(token: str) -> Identity:
    """The runtime's dev-mode identity: sender = token, every right except observer."""
    return Identity(sender=token, can_manage_mode_registry=True)


def parse_token_entries(raw: str | bytes | Sequence[Mapping[str, Any]] | Mapping[str, Any]
                        ) -> dict[str, Identity]:
    """Token -> identity from the runtime's token JSON (text or already-parsed).

    Raises ValueError naming the entry when the shape is wrong (the runtime refuses to start).
    """
    doc: Any = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    if isinstance(doc, Mapping):
        if "tokens" not in doc:
            raise ValueError('auth tokens: expected a JSON list or {"tokens": [...]}')
        doc = doc["tokens"]
    if not isinstance(doc, Sequence) or isinstance(doc, (str, bytes)):
        raise ValueError('auth tokens: expected a JSON list or {"tokens": [...]}')
    out: dict[str, Identity] = {}
    for index, item in enumerate(doc):
        if not isinstance(item, Mapping):
            raise ValueError(f"auth tokens: entry {index} is not an object")
        token, sender = item.get("token"), item.get("sender")
        if not isinstance(token, str) or not isinstance(sender, str):
            raise ValueError(f"auth tokens: entry {index} needs string 'token' and 'sender'")
        modes = item.get("allowed_modes") or []
        max_open = item.get("max_open_sessions")
        out[token] = Identity(
            sender=sender,
            allowed_modes=frozenset(modes) if modes else None,
            can_start_sessions=bool(item.get("can_start_sessions", True)),
            max_open_sessions=int(max_open) if max_open is not None else None,
            can_manage_mode_registry=bool(item.get("can_manage_mode_registry", False)),
            is_observer=bool(item.get("is_observer", False)),
        )
    return out


def load_token_file(path: str) -> dict[str, Identity]:
    with open(path, encoding="utf-8") as fh:
        return parse_token_entries(fh.read())


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The call's token as the runtime reads it (None when absent)."""
    alt: str | None = None
    for key, value in metadata or ():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if key == "authorization":
            return value[7:] if value.startswith("Bearer ") else _fallback(metadata)
        if key == "x-macp-token" and alt is None:
            alt = value
    return alt


def _fallback(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "x-macp-token":
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def router_entry(token: str = "router", sender: str = "macp-router") -> dict[str, Any]:
    """The token entry a runtime needs for a macp-router: observer, registry rights."""
    return {"token": token, "sender": sender, "is_observer": True,
            "can_manage_mode_registry": True}


def agent_entry(name: str, **caps: Any) -> dict[str, Any]:
    """An agent whose token is its own name (so `AuthConfig.for_dev_agent(name)` works)."""
    return {"token": name, "sender": name, **caps}


class RateLimiter:
    """Per-sender sliding windows of 60 s, one for starts and one for other messages."""

    __slots__ = ("_message", "_message_limit", "_start", "_start_limit")

    def __init__(self, start_limit: int = DEFAULT_START_LIMIT_PER_MINUTE,
                 message_limit: int = DEFAULT_MESSAGE_LIMIT_PER_MINUTE) -> None:
        if start_limit <= 0 or message_limit <= 0:
            raise ValueError("rate limits must be positive integers (as the runtime requires)")
        self._start_limit = start_limit
        self._message_limit = message_limit
        self._start: dict[str, collections.deque[float]] = {}
        self._message: dict[str, collections.deque[float]] = {}

    def allow(self, sender: str, *, is_session_start: bool) -> bool:
        """Record one event for sender; False when it is over its limit (nothing recorded)."""
        buckets = self._start if is_session_start else self._message
        limit = self._start_limit if is_session_start else self._message_limit
        now = time.monotonic()
        window = buckets.get(sender)
        if window is None:
            if len(buckets) > 4096:  # bounded: drop senders idle for a whole window
                for key in [k for k, w in buckets.items() if not w or now - w[-1] > RATE_WINDOW_S]:
                    del buckets[key]
            window = buckets[sender] = collections.deque()
        while window and now - window[0] > RATE_WINDOW_S:
            window.popleft()
        if len(window) >= limit:
            return False
        window.append(now)
        return True
