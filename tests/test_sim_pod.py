"""The simulated runtime pod behaves like the MACP runtime on the paths the router relies on.

Real grpc.aio servers on 127.0.0.1, a deadline on every RPC, no guessed sleeps: tests wait on
states and stream items.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from tests.waiting import eventually

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


# ── strict by default: the runtime's (v0.6.1) behaviours ─────────────────


async def test_stream_frame_for_unknown_session_is_answered_inline_and_stream_stays_open(
    stub: core_pb2_grpc.MACPRuntimeServiceStub,
) -> None:
    sid = new_sid()
    call = stub.StreamSession(metadata=md("coordinator"), timeout=T)
    await call.write(core_pb2.StreamSessionRequest(envelope=msg_env(sid)))
    inline = await call.read()
    assert inline.WhichOneof("response") == "error"
    assert (inline.error.code, inline.error.message, inline.error.session_id) == (
        "UnknownSession", "UnknownSession", sid)
    # Still open: the same stream can start that very session and sees its start.
    await call.write(core_pb2.StreamSessionRequest(envelope=start_env(sid)))
    echoed = await call.read()
    assert echoed.envelope.message_type == "SessionStart" and echoed.envelope.session_id == sid
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_async_sdk_stream_sees_unknown_session_as_inline_error(pod: SimPod) -> None:
    client = AsyncMacpClient(target=pod.address, allow_insecure=True,
                             auth=AuthConfig.for_dev_agent("coordinator"), default_timeout=T)
    try:
        errors: list[tuple[str, str]] = []
        async with client.open_stream() as stream:
            stream.on_inline_error(lambda err: errors.append((err.code, err.session_id)))
            sid = new_sid()
            await stream.send(msg_env(sid))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + T
            while not errors:  # the SDK reports inline errors to the callback, not read()
                assert loop.time() < deadline
                await asyncio.sleep(0.01)
            assert errors == [("UnknownSession", sid)]
            await stream.send(start_env(sid))  # the stream is still open
            assert (await stream.read(timeout=T)).message_type == "SessionStart"
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ("duplicate start", grpc.StatusCode.ALREADY_EXISTS),
        ("weak session id", grpc.StatusCode.INVALID_ARGUMENT),
        ("mode mismatch", grpc.StatusCode.INVALID_ARGUMENT),
        ("spoofed sender", grpc.StatusCode.UNAUTHENTICATED),
        ("subscribe unknown", grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_stream_session_ending_codes(
    stub: core_pb2_grpc.MACPRuntimeServiceStub, frames: str, code: grpc.StatusCode
) -> None:
    sid = new_sid()
    assert (await send(stub, start_env(sid))).ok
    frame = {
        "duplicate start": core_pb2.StreamSessionRequest(envelope=start_env(sid)),
        "weak session id": core_pb2.StreamSessionRequest(envelope=start_env("s1")),
        "mode mismatch": core_pb2.StreamSessionRequest(envelope=envelope_pb2.Envelope(
            macp_version="1.0", mode="macp.mode.task.v1", message_type="TaskRequest",
            message_id=str(uuid.uuid4()), session_id=sid)),
        "spoofed sender": core_pb2.StreamSessionRequest(envelope=msg_env(sid, sender="alice")),
        "subscribe unknown": core_pb2.StreamSessionRequest(subscribe_session_id=new_sid()),
    }[frames]
    call = stub.StreamSession(metadata=md("coordinator"), timeout=T)
    await call.write(frame)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while True:
            item = await call.read()
            assert item is not grpc.aio.EOF and item.WhichOneof("response") != "error", item
    assert err.value.code() == code


async def test_stream_session_without_a_token_fails_before_any_frame(
    stub: core_pb2_grpc.MACPRuntimeServiceStub,
) -> None:
    call = stub.StreamSession(timeout=T)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_session_id_acceptance_rule() -> None:
    from router.sim import valid_session_id

    assert valid_session_id(str(uuid.uuid4()))
    v7 = uuid.UUID(int=(uuid.uuid4().int & ~(0xF << 76)) | (7 << 76))
    assert valid_session_id(str(v7))
    assert not valid_session_id(str(uuid.uuid4()).upper())  # canonical lowercase only
    assert not valid_session_id(str(uuid.uuid1()))  # v1 is a UUID, held to the UUID rule
    assert valid_session_id("A" * 21 + "_") and not valid_session_id("A" * 21)
    assert not valid_session_id("session-one-with-a-dot.x") and not valid_session_id("")


async def test_send_rejects_weak_session_ids_and_accepts_progress_without_lookup(
    pod: SimPod, stub: core_pb2_grpc.MACPRuntimeServiceStub
) -> None:
    for sid in ("s1", str(uuid.uuid4()).upper(), str(uuid.uuid1())):
        ack = await send(stub, start_env(sid))
        assert (ack.ok, ack.error.code, ack.error.message) == (
            False, "INVALID_SESSION_ID", "InvalidSessionId")
    assert (await send(stub, start_env("b64url_session_id_22chars"))).ok
    progress = msg_env(new_sid(), "Progress")  # a session this pod never held
    ack = await send(stub, progress)
    assert ack.ok and ack.session_state == envelope_pb2.SESSION_STATE_OPEN
    assert len(pod.sessions) == 1


async def test_registry_duplicates_are_answered_in_band_and_writes_need_registry_rights(
    pod: SimPod, stub: core_pb2_grpc.MACPRuntimeServiceStub
) -> None:
    policy = policy_pb2.PolicyDescriptor(policy_id="p.dup", mode=DECISION, rules="{}")
    request = policy_pb2.RegisterPolicyRequest(policy_descriptor=policy)
    first = await stub.RegisterPolicy(request, metadata=md("coordinator"), timeout=T)
    again = await stub.RegisterPolicy(request, metadata=md("coordinator"), timeout=T)
    assert first.ok and (again.ok, again.error) == (False, "policy 'p.dup' is already registered")
    mode = core_pb2.ModeDescriptor(mode="ext.dup.v1", mode_version="1.0.0",
                                   message_types=["Commitment"],
                                   terminal_message_types=["Commitment"])
    ext = core_pb2.RegisterExtModeRequest(mode_descriptor=mode)
    assert (await stub.RegisterExtMode(ext, metadata=md("coordinator"), timeout=T)).ok
    dup = await stub.RegisterExtMode(ext, metadata=md("coordinator"), timeout=T)
    assert (dup.ok, dup.error) == (False, "mode 'ext.dup.v1' is already registered")
    for token, code in (("alice", grpc.StatusCode.PERMISSION_DENIED),
                        ("observer", grpc.StatusCode.PERMISSION_DENIED),
                        (None, grpc.StatusCode.UNAUTHENTICATED)):
        for call in (stub.RegisterPolicy(request, metadata=md(token), timeout=T),
                     stub.RegisterExtMode(ext, metadata=md(token), timeout=T),
                     stub.PromoteMode(core_pb2.PromoteModeRequest(mode="ext.dup.v1"),
                                      metadata=md(token), timeout=T)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == code, token
    # In memory only: a restart (even with a state file) comes back with empty registries.
    await pod.stop()
    await pod.start()
    assert pod.policies == {} and pod.ext_modes == {}


async def test_register_policy_is_failed_precondition_with_a_policies_dir(tmp_path: Path) -> None:
    async with SimPod("pod-p", **pod_options(policies_dir=str(tmp_path))) as pod:
        async with grpc.aio.insecure_channel(pod.address) as channel:
            stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
            policy = policy_pb2.PolicyDescriptor(policy_id="p.1", mode=DECISION)
            for call in (
                stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=policy),
                                    timeout=T),  # checked before auth, as the runtime does
                stub.UnregisterPolicy(policy_pb2.UnregisterPolicyRequest(policy_id="p.1"),
                                      metadata=md("coordinator"), timeout=T),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            init = await stub.Initialize(
                core_pb2.InitializeRequest(supported_protocol_versions=["1.0"]), timeout=T)
            assert not init.capabilities.policy_registry.register_policy


async def test_rate_limits_are_on_by_default_per_sender(
    stub: core_pb2_grpc.MACPRuntimeServiceStub,
) -> None:
    acks = [await send(stub, start_env(new_sid())) for _ in range(61)]
    assert all(a.ok for a in acks[:60])
    assert (acks[60].ok, acks[60].error.code) == (False, "RATE_LIMITED")
    other = await send(stub, start_env(new_sid(), sender="alice"), token="alice")
    assert other.ok  # per sender
    sid = acks[0].session_id
    messages = [await send(stub, msg_env(sid)) for _ in range(601)]
    assert all(a.ok for a in messages[:600])
    assert messages[600].error.code == "RATE_LIMITED"


async def test_raised_rate_limits_are_honoured() -> None:
    async with SimPod("pod-r", **pod_options(start_limit_per_minute=100)) as pod:
        async with grpc.aio.insecure_channel(pod.address) as channel:
            stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
            acks = [await send(stub, start_env(new_sid())) for _ in range(101)]
            assert all(a.ok for a in acks[:100]) and acks[100].error.code == "RATE_LIMITED"


async def test_auth_configuration_as_the_runtime(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no authentication configured"):
        await SimPod("x").start()
    with pytest.raises(RuntimeError, match="TLS is required"):
        await SimPod("x", auth_tokens=[{"token": "t", "sender": "s"}]).start()
    with pytest.raises(ValueError, match="entry 0"):
        SimPod("x", auth_tokens='[{"token": "t"}]')
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"tokens": [{"token": "tok-a", "sender": "agent://a", '
                      '"can_start_sessions": false}, {"token": "tok-b", "sender": "agent://b", '
                      '"allowed_modes": ["macp.mode.task.v1"]}]}')
    async with SimPod("file", auth_tokens_file=str(tokens), allow_insecure=True) as pod:
        async with grpc.aio.insecure_channel(pod.address) as channel:
            stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
            no_start = await send(stub, start_env(new_sid(), sender=""), token="tok-a")
            assert no_start.error.code == "FORBIDDEN"
            wrong_mode = await send(stub, start_env(new_sid(), sender=""), token="tok-b")
            assert wrong_mode.error.code == "FORBIDDEN"
            x_token = await stub.Send(
                core_pb2.SendRequest(envelope=msg_env(new_sid(), sender="")),
                metadata=(("x-macp-token", "tok-a"),), timeout=T)
            assert x_token.ack.error.code == "SESSION_NOT_FOUND"  # authenticated as agent://a
            jwt_like = await send(stub, msg_env(new_sid(), sender=""), token="a.b.c")
            assert jwt_like.error.code == "UNAUTHENTICATED"
    # Dev mode: any bearer token is a full identity named by the token, never an observer.
    async with SimPod("dev", allow_insecure=True) as pod:
        async with grpc.aio.insecure_channel(pod.address) as channel:
            stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
            sid = new_sid()
            assert (await send(stub, start_env(sid, sender="anyone"), token="anyone")).ok
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetSession(core_pb2.GetSessionRequest(session_id=sid),
                                      metadata=md("router"), timeout=T)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            desc = policy_pb2.PolicyDescriptor(policy_id="p.dev", mode=DECISION)
            assert (await stub.RegisterPolicy(
                policy_pb2.RegisterPolicyRequest(policy_descriptor=desc),
                metadata=md("router"), timeout=T)).ok
            no_token = await send(stub, start_env(new_sid(), sender=""), token=None)
            assert no_token.error.code == "UNAUTHENTICATED"


async def test_pod_without_health_service_answers_unimplemented() -> None:
    async with SimPod("old", **pod_options(health=False)) as pod:
        async with grpc.aio.insecure_channel(pod.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=T)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_stays_serving_while_the_pod_stops(pod: SimPod) -> None:
    async with grpc.aio.insecure_channel(pod.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=T)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        await pod.stop(grace=0.5)
        # The runtime never reports NOT_SERVING: the watch just ends with the server.
        statuses = []
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (item := await watch.read()) is not grpc.aio.EOF:
                statuses.append(item.status)
        assert health_pb2.HealthCheckResponse.NOT_SERVING not in statuses


async def test_in_flight_requests_per_connection_queue_beyond_64(
    pod: SimPod, stub: core_pb2_grpc.MACPRuntimeServiceStub
) -> None:
    sid = new_sid()
    assert (await send(stub, start_env(sid))).ok
    pod.hang = True
    calls = [asyncio.ensure_future(stub.GetSession(
        core_pb2.GetSessionRequest(session_id=sid), metadata=md("router"), timeout=T))
        for _ in range(70)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + T
    while pod.queued_calls < 6:
        assert loop.time() < deadline, (pod.max_in_flight, pod.queued_calls)
        await asyncio.sleep(0.01)
    assert pod.max_in_flight == 64  # never more in flight on one connection
    pod.hang = False
    replies = await asyncio.gather(*calls)  # the queued ones are served, none rejected
    assert all(r.metadata.session_id == sid for r in replies)


async def test_concurrent_streams_per_connection_capped_at_128(
    pod: SimPod, stub: core_pb2_grpc.MACPRuntimeServiceStub
) -> None:
    calls = [stub.WatchSessions(core_pb2.WatchSessionsRequest(), metadata=md("router"),
                                timeout=30) for _ in range(130)]
    headers = [asyncio.ensure_future(call.initial_metadata()) for call in calls]
    try:
        await eventually(lambda: sum(h.done() for h in headers) == 128, timeout=20)
        # The two over the cap wait on the client for a free stream; the pod never sees them.
        await asyncio.sleep(0.3)
        assert (pod.watcher_count, pod.calls["WatchSessions"]) == (128, 128)
        assert sum(h.done() for h in headers) == 128
        waiting = [call for call, h in zip(calls, headers, strict=True) if not h.done()]
        assert not any(call.done() for call in waiting)  # queued, not refused
        started = [call for call, h in zip(calls, headers, strict=True) if h.done()]
        for call in started[:2]:
            call.cancel()
        # A freed stream lets a queued call through. (grpc-python's client starts one of the
        # two waiting calls here, not both; the cap itself is what this test is about.)
        await eventually(lambda: pod.calls["WatchSessions"] >= 129, timeout=20)
        assert pod.watcher_count <= 128
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*headers, return_exceptions=True)


async def test_terminal_sessions_are_evicted_silently_after_retention() -> None:
    async with SimPod("ev", **pod_options(session_retention_s=0.2,
                                          cleanup_interval_s=0.05)) as pod:
        async with grpc.aio.insecure_channel(pod.address) as channel:
            stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
            done, live = new_sid(), new_sid()
            assert (await send(stub, start_env(done))).ok
            assert (await send(stub, start_env(live))).ok
            watch = stub.WatchSessions(core_pb2.WatchSessionsRequest(), metadata=md("router"),
                                       timeout=T)
            assert {(await next_event(watch)).session.session_id for _ in range(2)} == {
                done, live}
            assert (await send(stub, msg_env(done, "Commitment"))).ok
            assert (await next_event(watch)).event_type == Ev.EVENT_TYPE_RESOLVED
            loop = asyncio.get_running_loop()
            deadline = loop.time() + T
            while done in pod.sessions:
                assert loop.time() < deadline
                await asyncio.sleep(0.02)
            listed = await stub.ListSessions(core_pb2.ListSessionsRequest(),
                                             metadata=md("router"), timeout=T)
            assert [s.session_id for s in listed.sessions] == [live]  # open ones stay
            with pytest.raises(asyncio.TimeoutError):  # no lifecycle event for an eviction
                await asyncio.wait_for(watch.read(), 0.3)
            watch.cancel()


async def test_max_open_sessions_and_payload_limit() -> None:
    tokens = [{"token": "capped", "sender": "capped", "max_open_sessions": 2}]
    async with SimPod("cap", auth_tokens=tokens, allow_insecure=True,
                      max_payload_bytes=1024) as pod:
        async with grpc.aio.insecure_channel(pod.address) as channel:
            stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
            first, second = new_sid(), new_sid()
            for sid in (first, second):
                assert (await send(stub, start_env(sid, sender=""), token="capped")).ok
            third = await send(stub, start_env(new_sid(), sender=""), token="capped")
            assert third.error.code == "RATE_LIMITED"  # two open sessions already
            assert (await send(stub, msg_env(first, "Commitment", sender=""), token="capped")).ok
            assert (await send(stub, start_env(new_sid(), sender=""), token="capped")).ok
            big = msg_env(second, sender="")
            big.payload = b"x" * 1025
            ack = await send(stub, big, token="capped")
            assert (ack.ok, ack.error.code) == (False, "PAYLOAD_TOO_LARGE")
