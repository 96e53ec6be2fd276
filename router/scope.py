"""Identity scoping of discovery (`--scope-discovery`): who may see which sessions.

The runtime (v0.6.1) does not scope ListSessions / WatchSessions: any authenticated caller sees
every session. The SDK documents them as showing a caller only the sessions it participates in
or may observe; with `--scope-discovery` the router keeps that promise by filtering the merged
results itself.

Callers are identified exactly as the runtime identifies them:
- A bearer token with a dot is a JWT (the runtime hands those to its JWT resolver): the
  identity is its `sub` claim, an observer when its `macp_scopes.is_observer` is true.
- Any other token is a static token: with the runtime's token entries loaded
  (`--auth-tokens-file`, the runtime's MACP_AUTH_TOKENS_JSON / MACP_AUTH_TOKENS_FILE format) it
  maps to its entry's `sender` (`is_observer` entries see everything); a token that is not in
  the entries has no identity and sees nothing (the pods refuse it anyway). Without entries the
  runtime is in dev mode (MACP_ALLOW_INSECURE, no tokens): the token itself is the sender.

Why a JWT's claims are read without verifying its signature here: the router shows a caller
nothing that a pod did not first return to that same caller for that same token. ListSessions
is merged only after every pod answered OK with the caller's credentials (UNAUTHENTICATED from
any pod is the caller's answer), and a WatchSessions event comes from a pod stream opened with
the caller's credentials, which the pod authenticated before sending anything. A forged or
expired JWT is therefore refused by the pods (which verify issuer, audience and signature with
their JWKS) before its claims could widen what the router shows; a valid one's `sub` is the
identity the pods verified.

Invariants:
- A caller sees a session when its identity is the initiator or a participant, or when it is
  an observer (a static observer entry, an observer JWT, or an `--observer-tokens` token).
- A caller without a bearer token sees nothing. Tokens are compared, never logged.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from macp.v1 import core_pb2

Visible = Callable[[core_pb2.SessionMetadata], bool]

_AUTH_HEADERS = ("authorization", "x-macp-token")


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key not in _AUTH_HEADERS:
            continue
        text = value.decode() if isinstance(value, bytes) else value
        if key == "authorization":
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif text.strip():
            return text.strip()
    return ""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a call comes from, as the runtime would authenticate it ("" sender: nobody)."""

    sender: str
    observer: bool = False


NOBODY = Caller("")


def jwt_claims(token: str) -> dict[str, object] | None:
    """The claims of a JWT-shaped token (header.payload.signature), unverified; None when the
    payload is not base64url JSON."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


class DiscoveryScope:
    def __init__(
        self,
        observer_tokens: Iterable[str],
        identities: Mapping[str, str],
        *,
        dev_mode: bool | None = None,
    ) -> None:
        """`identities`: static token -> sender (the runtime's token entries); observer tokens
        see everything. `dev_mode` (default: no entries given) makes an unknown static token
        its own sender, as a runtime without token entries does."""
        self._observers = frozenset(observer_tokens)
        self._identities = dict(identities)
        self._dev_mode = not self._identities if dev_mode is None else dev_mode

    def caller(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Caller:
        token = bearer_token(metadata)
        if not token:
            return NOBODY
        if token in self._observers:
            return Caller(self._identities.get(token, token), observer=True)
        if "." in token:
            claims = jwt_claims(token)
            if claims is None:
                return NOBODY
            sub = claims.get("sub")
            scopes = claims.get("macp_scopes")
            observer = isinstance(scopes, dict) and scopes.get("is_observer") is True
            return Caller(sub, observer) if isinstance(sub, str) and sub else NOBODY
        sender = self._identities.get(token)
        if sender is not None:
            return Caller(sender)
        return Caller(token) if self._dev_mode else NOBODY

    def visible_to(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Visible | None:
        """None when the caller sees everything, else a predicate over session metadata."""
        caller = self.caller(metadata)
        if caller.observer:
            return None
        if not caller.sender:
            return lambda session: False
        identity = caller.sender

        def visible(session: core_pb2.SessionMetadata) -> bool:
            return session.initiator == identity or identity in session.participants

        return visible
