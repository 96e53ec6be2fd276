"""`--scope-discovery` identifies callers as the runtime does, never by the raw token string.

Pods are configured with static token entries whose tokens differ from their senders (as in a
real deployment) and with the runtime's JWT resolver; the router is built from the CLI with
`--auth-tokens-file` pointing at the same entries. Real gRPC on loopback, deadlines everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

import grpc
import pytest
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2

from router.app import Router
from router.cli import build_parser
from router.config import config_from_options
from router.scope import DiscoveryScope
from router.sim.auth import JwtHs256, router_entry

TIMEOUT = 10.0
JWT = JwtHs256(issuer="https://issuer.test", audience="macp-runtime", secret=b"s" * 32)
ENTRIES = [
    router_entry("router"),
    {"token": "tok-alice", "sender": "alice"},
    {"token": "tok-bob", "sender": "bob"},
    {"token": "tok-carol", "sender": "carol"},
    {"token": "tok-ops", "sender": "ops", "is_observer": True},
]


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def start_as(channel: grpc.aio.Channel, token: str, sender: str,
                   participants: list[str]) -> str:
    sid = str(uuid.uuid4())
    payload = core_pb2.SessionStartPayload(intent="scope", participants=participants,
                                           ttl_ms=600_000, mode_version="1.0.0",
                                           configuration_version="config.default")
    envelope = envelope_pb2.Envelope(
        macp_version="1.0", mode="macp.mode.decision.v1", message_type="SessionStart",
        message_id=str(uuid.uuid4()), session_id=sid, sender=sender,
        payload=payload.SerializeToString())
    reply = await core_pb2_grpc.MACPRuntimeServiceStub(channel).Send(
        core_pb2.SendRequest(envelope=envelope), metadata=bearer(token), timeout=TIMEOUT)
    assert reply.ack.ok, reply.ack
    return sid


async def listed(channel: grpc.aio.Channel, token: str) -> set[str]:
    reply = await core_pb2_grpc.MACPRuntimeServiceStub(channel).ListSessions(
        core_pb2.ListSessionsRequest(), metadata=bearer(token), timeout=TIMEOUT)
    return {session.session_id for session in reply.sessions}


async def watched(channel: grpc.aio.Channel, token: str, expect: int) -> set[str]:
    """Session ids of the first `expect` WatchSessions events (or all events within 2 s)."""
    call = core_pb2_grpc.MACPRuntimeServiceStub(channel).WatchSessions(
        core_pb2.WatchSessionsRequest(), metadata=bearer(token), timeout=2)
    seen: set[str] = set()
    try:
        async for reply in call:
            seen.add(reply.event.session.session_id)
            if len(seen) >= expect:
                break
    except grpc.aio.AioRpcError as exc:
        assert exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED, exc
    call.cancel()
    return seen


async def test_scoping_uses_the_runtimes_identities_for_static_tokens_and_jwts(
    sim_pods, tmp_path
):
    pods = await sim_pods(2, auth_tokens=ENTRIES, jwt=JWT, start_limit_per_minute=1000)
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps({"tokens": ENTRIES}))
    args = build_parser().parse_args([
        "serve", "--listen", "127.0.0.1:0", "--token", "router", "--scope-discovery",
        "--auth-tokens-file", str(tokens_file),
        "--pods", ",".join(f"{pod.name}={pod.address}" for pod in pods),
    ])
    router = Router(dataclasses.replace(config_from_options(vars(args)), health_interval_ms=200))
    await router.start()
    try:
        assert await router.wait_ready(10)
        async with grpc.aio.insecure_channel(router.address) as channel:
            with_bob = {await start_as(channel, "tok-alice", "alice", ["alice", "bob"])
                        for _ in range(3)}
            # A participant literally named like carol's token: scoping by the raw token
            # string would show it to carol.
            decoy = await start_as(channel, "tok-alice", "alice", ["alice", "tok-carol"])
            everything = with_bob | {decoy}

            assert await listed(channel, "tok-alice") == everything  # the initiator
            assert await listed(channel, "tok-bob") == with_bob  # a participant, by sender
            assert await listed(channel, "tok-carol") == set()  # carol is "carol", not her token
            assert await listed(channel, "tok-ops") == everything  # an observer entry
            assert await listed(channel, JWT.sign("bob")) == with_bob  # a JWT is its sub
            assert await listed(channel, JWT.sign("dave", is_observer=True)) == everything
            assert await watched(channel, "tok-bob", len(everything)) == with_bob
            assert await watched(channel, "tok-carol", 1) == set()

            # A forged JWT naming alice: the pods refuse it, so its claims never widen anything.
            header, payload, _ = JWT.sign("alice").split(".")
            with pytest.raises(grpc.aio.AioRpcError) as forged:
                await listed(channel, f"{header}.{payload}.{'A' * 43}")
            assert forged.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await listed(channel, "tok-nobody")
            assert unknown.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await router.stop(grace=0)


def test_identity_rules_of_the_scope():
    scope = DiscoveryScope({"tok-ops"}, {"tok-alice": "alice", "tok-ops": "ops"})
    assert scope.caller(bearer("tok-alice")).sender == "alice"
    assert scope.caller(bearer("tok-ops")).observer
    assert scope.caller(bearer("tok-stranger")).sender == ""  # entries configured: no identity
    assert scope.caller((("x-macp-token", "tok-alice"),)).sender == "alice"
    assert scope.caller(bearer(JWT.sign("erin"))).sender == "erin"
    assert scope.caller(bearer("not.a.jwt")).sender == ""
    assert scope.caller(()).sender == ""
    dev = DiscoveryScope(set(), {})  # no entries: the runtime's dev mode, token = sender
    assert dev.caller(bearer("anyone")).sender == "anyone"
