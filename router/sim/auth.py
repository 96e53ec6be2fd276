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
  JWT-shaped and never matches a static entry (the sim has no JWT resolver: UNAUTHENTICATED).
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
