"""The simulated runtime pod behaves like the MACP runtime on the paths the router relies on.

Real grpc.aio servers on 127.0.0.1, a deadline on every RPC, no guessed sleeps: tests wait on
states and stream items.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2, policy_pb2
from macp_sdk import AsyncDecisionSession, AsyncMacpClient, AuthConfig, DecisionSession, MacpClient
from macp_sdk.watchers import SessionLifecycleWatcher

from router.sim import SimPod, serve_pod
from tests.pod_auth import pod_options

DECISION = "macp.mode.decision.v1"
T = 5.0  # deadline (s) for every RPC

Ev = core_pb2.SessionLifecycleEvent


def md(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def start_env(
    sid: str,
    sender: str = "coordinator",
    *,
    participants: tuple[str, ...] = ("alice", "bob"),
    ttl_ms: int = 60_000,
    message_id: str | None = None,
) -> envelope_pb2.Envelope:
    payload = core_pb2.SessionStartPayload(
        intent="pick",
        participants=participants,
        ttl_ms=ttl_ms,
        mode_version="1.0.0",
        configuration_version="config.default",
        context_id="ctx-1",
    )
    return envelope_pb2.Envelope(
        macp_version="1.0",
        mode=DECISION,
        message_type="SessionStart",
        message_id=message_id or str(uuid.uuid4()),
        session_id=sid,
        sender=sender,
        payload=payload.SerializeToString(),
    )


def msg_env(
    sid: str, mtype: str = "Proposal", sender: str = "coordinator", message_id: str | None = None
) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope(
        macp_version="1.0",
        mode=DECISION,
        message_type=mtype,
        message_id=message_id or str(uuid.uuid4()),
        session_id=sid,
        sender=sender,
        payload=b"",
    )


@pytest.fixture
async def pod() -> AsyncIterator[SimPod]:
    async with SimPod("pod-0", **pod_options()) as p:
        yield p


@pytest.fixture
async def stub(pod: SimPod) -> AsyncIterator[core_pb2_grpc.MACPRuntimeServiceStub]:
    async with grpc.aio.insecure_channel(pod.address) as channel:
        yield core_pb2_grpc.MACPRuntimeServiceStub(channel)


async def send(
    stub: core_pb2_grpc.MACPRuntimeServiceStub,
    env: envelope_pb2.Envelope,
    token: str | None = "coordinator",
) -> envelope_pb2.Ack:
    resp = await stub.Send(core_pb2.SendRequest(envelope=env), metadata=md(token), timeout=T)
    return resp.ack


def new_sid() -> str:
    return str(uuid.uuid4())


# ── the real SDK against the pod ─────────────────────────────────────────


async def test_sdk_decision_flow(pod: SimPod) -> None:
    def flow() -> tuple[object, ...]:
        client = MacpClient(
            target=pod.address,
            allow_insecure=True,
            auth=AuthConfig.for_dev_agent("coordinator"),
            default_timeout=T,
        )
        try:
            init = client.initialize()
            session = DecisionSession(client)
            start = session.start(
                intent="choose a vendor", participants=["alice", "bob"], ttl_ms=60_000
            )
            proposal = session.propose("p1", "vendor-a", rationale="cheapest")
            meta = client.get_session(session.session_id).metadata
            listed = client.list_sessions()
            commit = session.commit(
                action="vendor.select", authority_scope="procurement", reason="agreed"
            )
            after = client.get_session(session.session_id).metadata
            return init, session.session_id, start, proposal, meta, listed, commit, after
        finally:
            client.close()

    init, sid, start, proposal, meta, listed, commit, after = await asyncio.to_thread(flow)
    assert init.selected_protocol_version == "1.0"
    assert init.runtime_info.name == "pod-0"
    assert DECISION in init.supported_modes
    assert init.capabilities.sessions.list_sessions and init.capabilities.sessions.watch_sessions
    assert start.ok and start.session_state == envelope_pb2.SESSION_STATE_OPEN
    assert start.session_id == sid and start.accepted_at_unix_ms > 0
    assert proposal.ok and not proposal.duplicate
    assert meta.session_id == sid and meta.state == envelope_pb2.SESSION_STATE_OPEN
    assert meta.initiator == "coordinator" and list(meta.participants) == ["alice", "bob"]
    assert meta.mode == DECISION and meta.expires_at_unix_ms - meta.started_at_unix_ms == 60_000
    assert [s.session_id for s in listed] == [sid]
    assert commit.ok and commit.session_state == envelope_pb2.SESSION_STATE_RESOLVED
    assert after.state == envelope_pb2.SESSION_STATE_RESOLVED
    assert pod.calls["Send"] == 3 and pod.calls["GetSession"] == 2
    assert pod.calls["Initialize"] == 1 and pod.calls["ListSessions"] == 1
    assert pod.sessions[sid].metadata.state == envelope_pb2.SESSION_STATE_RESOLVED


async def test_sdk_lifecycle_watcher_sees_snapshot_and_live_events(pod: SimPod) -> None:
    client = MacpClient(
        target=pod.address,
        allow_insecure=True,
        auth=AuthConfig.for_dev_agent("coordinator"),
        default_timeout=T,
    )
    try:
        first = DecisionSession(client)
        await asyncio.to_thread(first.start, intent="i", participants=["alice"], ttl_ms=60_000)
        changes = SessionLifecycleWatcher(client).changes()
        snap = await asyncio.to_thread(next, changes)
        assert snap.is_created and snap.session.session_id == first.session_id
        second = DecisionSession(client)
        await asyncio.to_thread(second.start, intent="i", participants=["alice"], ttl_ms=60_000)
        live = await asyncio.to_thread(next, changes)
        assert live.is_created and live.session.session_id == second.session_id
        await asyncio.to_thread(first.cancel, reason="done")
        cancelled = await asyncio.to_thread(next, changes)
        assert cancelled.is_cancelled and cancelled.session.session_id == first.session_id
        assert cancelled.session.state == envelope_pb2.SESSION_STATE_CANCELLED
        changes.close()
    finally:
        client.close()


# ── Send semantics ───────────────────────────────────────────────────────


async def test_duplicate_start_rules(stub: core_pb2_grpc.MACPRuntimeServiceStub) -> None:
    sid = new_sid()
    env = start_env(sid)
    assert (await send(stub, env)).ok
    again = await send(stub, env)  # same message_id: idempotent
    assert again.ok and again.duplicate
    other = await send(stub, start_env(sid))  # new message_id: a second start
    assert not other.ok
    assert other.error.code == "SESSION_ALREADY_EXISTS"
    assert other.session_id == sid and other.message_id


async def test_unknown_session_and_invalid_envelopes(
    stub: core_pb2_grpc.MACPRuntimeServiceStub,
) -> None:
    ack = await send(stub, msg_env(new_sid()))
    assert not ack.ok and ack.error.code == "SESSION_NOT_FOUND"
    no_sid = msg_env("")
    ack = await send(stub, no_sid)
    assert not ack.ok and ack.error.code == "INVALID_ENVELOPE"
    spoofed = start_env(new_sid(), sender="mallory")
    ack = await send(stub, spoofed)
    assert not ack.ok and ack.error.code == "UNAUTHENTICATED"
    ack = await send(stub, start_env(new_sid(), sender=""), token=None)
    assert not ack.ok and ack.error.code == "UNAUTHENTICATED"


async def test_duplicate_message_terminal_session_and_commit(
    pod: SimPod, stub: core_pb2_grpc.MACPRuntimeServiceStub
) -> None:
    sid = new_sid()
    assert (await send(stub, start_env(sid))).ok
    prop = msg_env(sid)
    assert (await send(stub, prop)).ok
    dup = await send(stub, prop)
    assert dup.ok and dup.duplicate
    outsider = await send(stub, msg_env(sid, sender="outsider"), token="outsider")
    assert not outsider.ok and outsider.error.code == "FORBIDDEN"
    by_participant = await send(stub, msg_env(sid, sender="alice"), token="alice")
    assert by_participant.ok
    commit = await send(stub, msg_env(sid, "Commitment"))
    assert commit.ok and commit.session_state == envelope_pb2.SESSION_STATE_RESOLVED
    late = await send(stub, msg_env(sid))
    assert not late.ok and late.error.code == "SESSION_NOT_OPEN"
    assert [e.message_type for e in pod.sessions[sid].log] == [
        "SessionStart",
        "Proposal",
        "Proposal",
        "Commitment",
    ]


async def test_ambient_signals_reach_watch_signals(
    pod: SimPod, stub: core_pb2_grpc.MACPRuntimeServiceStub
) -> None:
    call = stub.WatchSignals(core_pb2.WatchSignalsRequest(), metadata=md("observer"), timeout=T)
    await call.wait_for_connection()  # headers are sent once the subscription exists
    assert pod.signal_watcher_count == 1
    signal = envelope_pb2.Envelope(
        macp_version="1.0",
        message_type="Signal",
        message_id=str(uuid.uuid4()),
        sender="coordinator",
        payload=core_pb2.SignalPayload(signal_type="heartbeat").SerializeToString(),
    )
    assert (await send(stub, signal)).ok
    got = await call.read()
    assert got.envelope.message_type == "Signal" and got.sender_authenticated
    assert got.envelope.message_id == signal.message_id
    in_session = msg_env("", "Signal")
    in_session.mode = ""
    in_session.session_id = new_sid()
    bad = await send(stub, in_session)  # a Signal must not carry a session id
    assert not bad.ok and bad.error.code == "INVALID_ENVELOPE"
    call.cancel()


# ── GetSession ───────────────────────────────────────────────────────────


async def test_get_session_not_found_and_permissions(
    stub: core_pb2_grpc.MACPRuntimeServiceStub,
) -> None:
    missing = new_sid()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetSession(
            core_pb2.GetSessionRequest(session_id=missing), metadata=md("coordinator"), timeout=T
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == f"Session '{missing}' not found"
    trailers = dict(err.value.trailing_metadata() or ())
    assert trailers.get("macp-error-code") == "SESSION_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetSession(core_pb2.GetSessionRequest(session_id=missing), timeout=T)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # auth before lookup

    sid = new_sid()
    assert (await send(stub, start_env(sid))).ok
    for token in ("coordinator", "alice", "router", "observer"):
        resp = await stub.GetSession(
            core_pb2.GetSessionRequest(session_id=sid), metadata=md(token), timeout=T
        )
        assert resp.metadata.session_id == sid
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetSession(
            core_pb2.GetSessionRequest(session_id=sid), metadata=md("outsider"), timeout=T
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for token in ("eve", None):  # not configured / absent: authentication fails first
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetSession(
                core_pb2.GetSessionRequest(session_id=sid), metadata=md(token), timeout=T
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ── ListSessions ─────────────────────────────────────────────────────────


async def test_list_sessions_is_one_unpaged_reply_of_every_session(
    pod: SimPod, stub: core_pb2_grpc.MACPRuntimeServiceStub
) -> None:
    sids = [new_sid() for _ in range(7)]
    for sid in sids:
        assert (await send(stub, start_env(sid))).ok
    assert (await send(stub, msg_env(sids[0], "Commitment"))).ok
    for request in (
        core_pb2.ListSessionsRequest(),
        core_pb2.ListSessionsRequest(page_size=3),
        core_pb2.ListSessionsRequest(page_size=3, page_token="garbage!"),
    ):
        reply = await stub.ListSessions(request, metadata=md("router"), timeout=T)
        assert [s.session_id for s in reply.sessions] == sids and not reply.next_page_token
        assert reply.sessions[0].state == envelope_pb2.SESSION_STATE_RESOLVED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListSessions(core_pb2.ListSessionsRequest(), timeout=T)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Any authenticated identity may list, observer or not (the runtime does not scope it).
    reply = await stub.ListSessions(core_pb2.ListSessionsRequest(), metadata=md("outsider"),
                                    timeout=T)
    assert len(reply.sessions) == 7


# ── WatchSessions ────────────────────────────────────────────────────────


async def next_event(call: grpc.aio.UnaryStreamCall) -> core_pb2.SessionLifecycleEvent:
    resp = await asyncio.wait_for(call.read(), T)
    assert resp is not grpc.aio.EOF
    return resp.event


async def test_watch_sessions_snapshot_then_live(
    pod: SimPod, stub: core_pb2_grpc.MACPRuntimeServiceStub
) -> None:
    open_sid, done_sid = new_sid(), new_sid()
    assert (await send(stub, start_env(open_sid))).ok
    assert (await send(stub, start_env(done_sid))).ok
    assert (await send(stub, msg_env(done_sid, "Commitment"))).ok

    call = stub.WatchSessions(core_pb2.WatchSessionsRequest(), metadata=md("router"), timeout=30)
    snap = await next_event(call)  # one CREATED per in-memory session, terminal ones too
    assert snap.event_type == Ev.EVENT_TYPE_CREATED and snap.session.session_id == open_sid
    assert snap.session.state == envelope_pb2.SESSION_STATE_OPEN
    snap = await next_event(call)
    assert snap.event_type == Ev.EVENT_TYPE_CREATED and snap.session.session_id == done_sid
    assert snap.session.state == envelope_pb2.SESSION_STATE_RESOLVED

    live = new_sid()
    assert (await send(stub, start_env(live))).ok
    ev = await next_event(call)
    assert (ev.event_type, ev.session.session_id) == (Ev.EVENT_TYPE_CREATED, live)
    assert ev.session.initiator == "coordinator" and ev.observed_at_unix_ms > 0

    ack = (
        await stub.SuspendSession(
            core_pb2.SuspendSessionRequest(session_id=live), metadata=md("coordinator"), timeout=T
        )
    ).ack
    assert ack.ok and ack.session_state == envelope_pb2.SESSION_STATE_SUSPENDED
    ev = await next_event(call)
    assert ev.event_type == Ev.EVENT_TYPE_SUSPENDED
    assert ev.session.state == envelope_pb2.SESSION_STATE_SUSPENDED
    suspended = await send(stub, msg_env(live))
    assert not suspended.ok and suspended.error.code == "SESSION_NOT_OPEN"

    ack = (
        await stub.ResumeSession(
            core_pb2.ResumeSessionRequest(session_id=live), metadata=md("coordinator"), timeout=T
        )
    ).ack
    assert ack.ok and ack.session_state == envelope_pb2.SESSION_STATE_OPEN
    assert (await next_event(call)).event_type == Ev.EVENT_TYPE_RESUMED

    assert (await send(stub, msg_env(live, "Commitment"))).ok
    ev = await next_event(call)
    assert ev.event_type == Ev.EVENT_TYPE_RESOLVED
    assert ev.session.state == envelope_pb2.SESSION_STATE_RESOLVED

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CancelSession(
            core_pb2.CancelSessionRequest(session_id=open_sid), metadata=md("alice"), timeout=T
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    ack = (
        await stub.CancelSession(
            core_pb2.CancelSessionRequest(session_id=open_sid),
            metadata=md("coordinator"),
            timeout=T,
        )
    ).ack
    assert ack.ok and ack.session_state == envelope_pb2.SESSION_STATE_CANCELLED
    ev = await next_event(call)
    assert (ev.event_type, ev.session.session_id) == (Ev.EVENT_TYPE_CANCELLED, open_sid)

    short = new_sid()
    assert (await send(stub, start_env(short, ttl_ms=30))).ok
    assert (await next_event(call)).event_type == Ev.EVENT_TYPE_CREATED
    ev = await next_event(call)  # the TTL timer fires
    assert (ev.event_type, ev.session.session_id) == (Ev.EVENT_TYPE_EXPIRED, short)
    assert ev.session.state == envelope_pb2.SESSION_STATE_EXPIRED
    call.cancel()


async def test_drop_watchers_ends_streams_ok(
    pod: SimPod, stub: core_pb2_grpc.MACPRuntimeServiceStub
) -> None:
    sid = new_sid()
    assert (await send(stub, start_env(sid))).ok
    call = stub.WatchSessions(core_pb2.WatchSessionsRequest(), metadata=md("router"), timeout=30)
    assert (await next_event(call)).session.session_id == sid
    assert pod.watcher_count == 1
    pod.drop_watchers()
    assert await asyncio.wait_for(call.read(), T) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


# ── StreamSession ────────────────────────────────────────────────────────


async def test_stream_session_start_echo_errors_and_half_close(
    stub: core_pb2_grpc.MACPRuntimeServiceStub,
) -> None:
    sid = new_sid()
    call = stub.StreamSession(metadata=md("coordinator"), timeout=T)
    await call.write(core_pb2.StreamSessionRequest(envelope=start_env(sid)))
    first = await call.read()
    assert first.envelope.message_type == "SessionStart" and first.envelope.session_id == sid

    # A participant subscribes on its own stream and replays from the start.
    sub = stub.StreamSession(metadata=md("alice"), timeout=T)
    await sub.write(core_pb2.StreamSessionRequest(subscribe_session_id=sid))
    assert (await sub.read()).envelope.message_type == "SessionStart"

    await call.write(core_pb2.StreamSessionRequest(envelope=msg_env(sid)))
    assert (await call.read()).envelope.message_type == "Proposal"
    assert (await sub.read()).envelope.message_type == "Proposal"

    # Application errors come back inline (code = the runtime's status message); the stream
    # stays open.
    wrong_version = msg_env(sid)
    wrong_version.macp_version = "2.0"
    await call.write(core_pb2.StreamSessionRequest(envelope=wrong_version))
    err = await call.read()
    assert err.WhichOneof("response") == "error"
    assert (err.error.code, err.error.session_id) == ("InvalidMacpVersion", sid)

    await call.write(core_pb2.StreamSessionRequest(envelope=msg_env(sid, "Commitment")))
    await call.done_writing()
    assert (await call.read()).envelope.message_type == "Commitment"
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK

    assert (await sub.read()).envelope.message_type == "Commitment"
    await sub.done_writing()
    assert await sub.read() is grpc.aio.EOF
    assert await sub.code() == grpc.StatusCode.OK


async def test_stream_session_subscribe_rules(
    stub: core_pb2_grpc.MACPRuntimeServiceStub,
) -> None:
    sid = new_sid()
    assert (await send(stub, start_env(sid))).ok
    assert (await send(stub, msg_env(sid))).ok
    resume = stub.StreamSession(metadata=md("router"), timeout=T)
    await resume.write(core_pb2.StreamSessionRequest(subscribe_session_id=sid, after_sequence=1))
    await resume.done_writing()
    assert (await resume.read()).envelope.message_type == "Proposal"
    assert await resume.read() is grpc.aio.EOF

    # Not a participant: PERMISSION_DENIED is not a stream-ending code, so it comes inline.
    call = stub.StreamSession(metadata=md("outsider"), timeout=T)
    await call.write(core_pb2.StreamSessionRequest(subscribe_session_id=sid))
    inline = await call.read()
    assert inline.WhichOneof("response") == "error"
    assert inline.error.code.startswith("FORBIDDEN: caller is not a declared participant")
    call.cancel()
    for token, sub_sid, code in (
        ("eve", sid, grpc.StatusCode.UNAUTHENTICATED),  # unknown token: the call fails at once
        ("coordinator", new_sid(), grpc.StatusCode.NOT_FOUND),
    ):
        call = stub.StreamSession(metadata=md(token), timeout=T)
        await call.write(core_pb2.StreamSessionRequest(subscribe_session_id=sub_sid))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == code


async def test_sdk_stream_round_trip(pod: SimPod) -> None:
    def flow() -> list[str]:
        client = MacpClient(
            target=pod.address,
            allow_insecure=True,
            auth=AuthConfig.for_dev_agent("coordinator"),
            default_timeout=T,
        )
        try:
            session = DecisionSession(client)
            session.start(intent="i", participants=["alice"], ttl_ms=60_000)
            stream = session.open_stream()
            stream.send_subscribe(session.session_id)
            stream.send(
                session._propose_envelope(
                    "p1", "o", rationale="", supporting_data=b"", sender=None, auth=None
                )
            )
            got = [stream.read(timeout=T), stream.read(timeout=T)]
            stream.close()
            assert stream.read(timeout=T) is None
            return [e.message_type for e in got if e is not None]
        finally:
            client.close()

    assert await asyncio.to_thread(flow) == ["SessionStart", "Proposal"]


# ── registries, health, unimplemented ────────────────────────────────────


async def test_registries_and_health(
    pod: SimPod, stub: core_pb2_grpc.MACPRuntimeServiceStub
) -> None:
    policy = policy_pb2.PolicyDescriptor(
        policy_id="p.1", mode=DECISION, rules=b"{}", schema_version=1
    )
    assert (
        await stub.RegisterPolicy(
            policy_pb2.RegisterPolicyRequest(policy_descriptor=policy),
            metadata=md("coordinator"),
            timeout=T,
        )
    ).ok
    got = await stub.GetPolicy(policy_pb2.GetPolicyRequest(policy_id="p.1"),
                               metadata=md("alice"), timeout=T)
    assert got.policy_descriptor.mode == DECISION
    listed = await stub.ListPolicies(policy_pb2.ListPoliciesRequest(mode=DECISION),
                                     metadata=md("alice"), timeout=T)
    assert [d.policy_id for d in listed.descriptors] == ["p.1"]
    assert (
        await stub.UnregisterPolicy(
            policy_pb2.UnregisterPolicyRequest(policy_id="p.1"), metadata=md("coordinator"),
            timeout=T,
        )
    ).ok
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetPolicy(policy_pb2.GetPolicyRequest(policy_id="p.1"), metadata=md("alice"),
                             timeout=T)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    mode = core_pb2.ModeDescriptor(
        mode="ext.vote.v1",
        mode_version="1.0.0",
        message_types=["Ballot", "Commitment"],
        terminal_message_types=["Commitment"],
    )
    assert (
        await stub.RegisterExtMode(
            core_pb2.RegisterExtModeRequest(mode_descriptor=mode), metadata=md("coordinator"),
            timeout=T,
        )
    ).ok
    ext = await stub.ListExtModes(core_pb2.ListExtModesRequest(), timeout=T)
    assert [m.mode for m in ext.modes] == ["ext.vote.v1"]
    promoted = await stub.PromoteMode(
        core_pb2.PromoteModeRequest(mode="ext.vote.v1"), metadata=md("coordinator"), timeout=T
    )
    assert promoted.ok and promoted.mode == "ext.vote.v1"
    modes = await stub.ListModes(core_pb2.ListModesRequest(), timeout=T)
    assert {DECISION, "ext.vote.v1"} <= {m.mode for m in modes.modes}
    manifest = await stub.GetManifest(core_pb2.GetManifestRequest(), timeout=T)
    assert manifest.manifest.agent_id == "pod-0"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.WhatIfReplay(policy_pb2.WhatIfReplayRequest(session_id="x"), timeout=T)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    async with grpc.aio.insecure_channel(pod.address) as channel:
        hstub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "macp.v1.MACPRuntimeService"):
            resp = await hstub.Check(health_pb2.HealthCheckRequest(service=service), timeout=T)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        await pod.set_serving(False)
        resp = await hstub.Check(health_pb2.HealthCheckRequest(service=""), timeout=T)
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING


# ── faults: hang, cancellation ───────────────────────────────────────────


async def test_hang_mode_deadline_and_cancel_observed(
    pod: SimPod, stub: core_pb2_grpc.MACPRuntimeServiceStub
) -> None:
    sid = new_sid()
    assert (await send(stub, start_env(sid))).ok
    pod.hang = True
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetSession(
            core_pb2.GetSessionRequest(session_id=sid), metadata=md("router"), timeout=0.2
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert pod.calls["GetSession"] == 1

    # Health keeps answering while the MACP service hangs.
    async with grpc.aio.insecure_channel(pod.address) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=T
        )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

    # A client cancel of a hung stream is observed too.
    watch = stub.WatchSessions(core_pb2.WatchSessionsRequest(), metadata=md("router"), timeout=T)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + T
    while pod.calls["WatchSessions"] < 1:
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    watch.cancel()

    while pod.cancelled_calls["GetSession"] < 1 or pod.cancelled_calls["WatchSessions"] < 1:
        assert loop.time() < deadline, pod.cancelled_calls
        await asyncio.sleep(0.01)
    pod.hang = False
    resp = await stub.GetSession(
        core_pb2.GetSessionRequest(session_id=sid), metadata=md("router"), timeout=T
    )
    assert resp.metadata.session_id == sid


# ── persistence ──────────────────────────────────────────────────────────


async def test_state_file_replay_after_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "pod-0.json")
    open_sid, done_sid = new_sid(), new_sid()
    pod = SimPod("pod-0", state_file=path, **pod_options())
    await pod.start()
    address = pod.address
    async with grpc.aio.insecure_channel(address) as channel:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        start = start_env(open_sid)
        assert (await send(stub, start)).ok
        assert (await send(stub, start_env(done_sid))).ok
        assert (await send(stub, msg_env(done_sid, "Commitment"))).ok
    await pod.stop()

    await pod.start()  # same object: reloads from the file, same address
    assert pod.address == address
    restarted = SimPod("pod-0", state_file=path, **pod_options())
    await restarted.start()
    try:
        for p in (pod, restarted):
            async with grpc.aio.insecure_channel(p.address) as channel:
                stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
                call = stub.WatchSessions(
                    core_pb2.WatchSessionsRequest(), metadata=md("router"), timeout=T
                )
                snapshot = [await next_event(call), await next_event(call)]
                assert [(e.event_type, e.session.session_id) for e in snapshot] == [
                    (Ev.EVENT_TYPE_CREATED, open_sid), (Ev.EVENT_TYPE_CREATED, done_sid)]
                call.cancel()
                dup = await send(stub, start)  # dedup state survives the restart
                assert dup.ok and dup.duplicate
                listed = await stub.ListSessions(
                    core_pb2.ListSessionsRequest(), metadata=md("router"), timeout=T
                )
                states = {s.session_id: s.state for s in listed.sessions}
                assert states == {
                    open_sid: envelope_pb2.SESSION_STATE_OPEN,
                    done_sid: envelope_pb2.SESSION_STATE_RESOLVED,
                }
    finally:
        await restarted.stop()
        await pod.stop()


async def test_without_state_file_restart_forgets(pod: SimPod) -> None:
    async with grpc.aio.insecure_channel(pod.address) as channel:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        assert (await send(stub, start_env(new_sid()))).ok
    assert len(pod.sessions) == 1
    await pod.stop()
    await pod.start()
    assert pod.sessions == {}


async def test_state_file_written_behind_without_stop(tmp_path: Path) -> None:
    path = tmp_path / "pod-1.json"
    async with SimPod("pod-1", state_file=str(path), **pod_options()) as pod:
        async with grpc.aio.insecure_channel(pod.address) as channel:
            stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
            sid = new_sid()
            assert (await send(stub, start_env(sid))).ok
            loop = asyncio.get_running_loop()
            deadline = loop.time() + T
            while not (path.exists() and sid in path.read_text()):
                assert loop.time() < deadline
                await asyncio.sleep(0.01)
            await pod.flush()
            assert sid in path.read_text()


# ── serve_pod ────────────────────────────────────────────────────────────


async def test_serve_pod_logs_ready_and_stops_on_cancel(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router.sim")
    task = asyncio.ensure_future(serve_pod("127.0.0.1:0", "pod-7", None, allow_insecure=True))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + T
    while not [r for r in caplog.records if "ready" in r.getMessage()]:
        assert loop.time() < deadline and not task.done()
        await asyncio.sleep(0.01)
    (line,) = [r.getMessage() for r in caplog.records if "ready" in r.getMessage()]
    address = line.rsplit(" ", 1)[-1]
    assert address.startswith("127.0.0.1:")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        init = await stub.Initialize(
            core_pb2.InitializeRequest(supported_protocol_versions=["1.0"]), timeout=T
        )
        assert init.runtime_info.name == "pod-7"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_serve_pod_process_exits_cleanly_on_sigterm() -> None:
    code = (
        "import asyncio, logging; from router.sim import serve_pod; "
        "logging.basicConfig(level=logging.INFO); "
        "asyncio.run(serve_pod('127.0.0.1:0', 'pod-9', None, allow_insecure=True))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        assert "ready" in line and "127.0.0.1:" in line
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_expired_session_rejects_messages(
    pod: SimPod, stub: core_pb2_grpc.MACPRuntimeServiceStub
) -> None:
    sid = new_sid()
    assert (await send(stub, start_env(sid, ttl_ms=1))).ok
    loop = asyncio.get_running_loop()
    deadline = loop.time() + T
    while pod.session_state(sid) != envelope_pb2.SESSION_STATE_EXPIRED:
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    ack = await send(stub, msg_env(sid))
    assert not ack.ok and ack.error.code == "SESSION_NOT_OPEN"
    resp = await stub.GetSession(
        core_pb2.GetSessionRequest(session_id=sid), metadata=md("alice"), timeout=T
    )
    assert resp.metadata.state == envelope_pb2.SESSION_STATE_EXPIRED


async def test_async_sdk_stream_in_the_same_loop(pod: SimPod) -> None:
    client = AsyncMacpClient(
        target=pod.address,
        allow_insecure=True,
        auth=AuthConfig.for_dev_agent("coordinator"),
        default_timeout=T,
    )
    try:
        await client.initialize()
        session = AsyncDecisionSession(client)
        await session.start(intent="i", participants=["alice"], ttl_ms=60_000)
        errors: list[str] = []
        async with client.open_stream() as stream:
            stream.on_inline_error(lambda err: errors.append(err.code))
            await stream.send_subscribe(session.session_id)
            assert (await stream.read(timeout=T)).message_type == "SessionStart"
            await session.propose("p1", "o")  # unary Send, echoed to the stream
            assert (await stream.read(timeout=T)).message_type == "Proposal"
        assert errors == []
    finally:
        await client.close()
