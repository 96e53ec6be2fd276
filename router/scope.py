"""Identity scoping of discovery (`--scope-discovery`): who may see which sessions.

The runtime's discovery RPCs (ListSessions, WatchSessions) are documented as showing a caller
only the sessions it participates in or may observe, but pods may not scope them. With scoping
on, the router filters the merged results itself.

Invariants:
- A caller sees a session when its identity is the initiator or a participant, or when its token
  is an observer token. A caller without a bearer token sees nothing.
- Identity is the sender the runtime would derive from the token: from the runtime's static
  token file when given, else the token itself (dev mode). Tokens are compared, never logged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

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


class DiscoveryScope:
    def __init__(self, observer_tokens: Iterable[str], identities: Mapping[str, str]) -> None:
        self._observers = frozenset(observer_tokens)
        self._identities = dict(identities)

    def visible_to(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Visible | None:
        """None when the caller sees everything, else a predicate over session metadata."""
        token = bearer_token(metadata)
        if token and token in self._observers:
            return None
        if not token:
            return lambda session: False
        identity = self._identities.get(token, token)

        def visible(session: core_pb2.SessionMetadata) -> bool:
            return session.initiator == identity or identity in session.participants

        return visible
