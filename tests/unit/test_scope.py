"""Discovery scoping (`--scope-discovery`): who a caller is, and which sessions it may see.

Callers are identified the way the runtime identifies them: a JWT by its `sub` claim (observer
by `macp_scopes.is_observer`), a static token by its entry's sender, any token by itself in dev
mode; a caller without a usable token sees nothing.
"""

from __future__ import annotations

import base64
import json

from macp.v1 import core_pb2

from router.scope import NOBODY, Caller, DiscoveryScope, bearer_token, jwt_claims


def jwt(**claims: object) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.signature"


def auth(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


SESSION = core_pb2.SessionMetadata(initiator="alice", participants=["bob"])


def test_the_bearer_token_comes_from_authorization_or_x_macp_token() -> None:
    assert bearer_token(auth("t1")) == "t1"
    assert bearer_token([("authorization", b"bearer  t2 ")]) == "t2"
    assert bearer_token([("x-macp-token", "t3")]) == "t3"
    assert bearer_token([("authorization", "Basic abc")]) == ""
    assert bearer_token(None) == ""


def test_a_static_token_is_its_entrys_sender_and_an_unknown_one_is_nobody() -> None:
    scope = DiscoveryScope([], {"t-alice": "alice"})
    assert scope.caller(auth("t-alice")) == Caller("alice")
    assert scope.caller(auth("t-stranger")) is NOBODY
    assert scope.caller([]) is NOBODY


def test_in_dev_mode_a_token_is_its_own_sender() -> None:
    assert DiscoveryScope([], {}).caller(auth("bob")) == Caller("bob")


def test_a_jwt_is_its_sub_claim_and_an_observer_by_its_scopes() -> None:
    scope = DiscoveryScope([], {"t": "x"})
    assert scope.caller(auth(jwt(sub="bob"))) == Caller("bob")
    watcher = jwt(sub="ops", macp_scopes={"is_observer": True})
    assert scope.caller(auth(watcher)) == Caller("ops", observer=True)
    assert scope.caller(auth(jwt(iss="no-sub"))) is NOBODY
    assert scope.caller(auth("a.not-base64!.c")) is NOBODY
    assert jwt_claims("only.two") is None


def test_observer_tokens_see_everything_and_participants_see_their_sessions() -> None:
    scope = DiscoveryScope(["t-ops"], {"t-alice": "alice", "t-bob": "bob", "t-eve": "eve"})
    assert scope.visible_to(auth("t-ops")) is None  # no filter at all
    for token in ("t-alice", "t-bob"):
        visible = scope.visible_to(auth(token))
        assert visible is not None and visible(SESSION), token
    eve = scope.visible_to(auth("t-eve"))
    assert eve is not None and not eve(SESSION)


def test_a_caller_without_identity_sees_nothing() -> None:
    nobody = DiscoveryScope([], {"t": "x"}).visible_to([])
    assert nobody is not None and not nobody(SESSION)
