"""Routing in front of pods that behave like macp-runtime v0.6.1 (the strict simulated pod).

Each test is one promise of the router that the real runtime makes necessary: a session is
never moved by a second pod's word, a pod takes new sessions only when ready, registry
broadcasts remember only what the pods hold, and a stream opened on a stale route reaches the
holder without the client noticing. Real gRPC on loopback, the real `macp_sdk` client for
streams, a deadline on every RPC, waits for states (never guessed sleeps).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal

import grpc
import pytest
from macp.v1 import core_pb2, core_pb2_grpc, policy_pb2
from macp_sdk import AsyncMacpClient, AuthConfig

from router.app import Router
from router.sim import SimPod
from router.sim.auth import agent_entry
from router.store import OPEN
from router.v1 import router_pb2, router_pb2_grpc
from tests.macp_calls import METADATA, MODE, TIMEOUT, proposal_envelope, send, start, start_envelope
from tests.pod_auth import TOKEN_ENTRIES, pod_options
from tests.waiting import eventually


def macp(channel: grpc.aio.Channel) -> core_pb2_grpc.MACPRuntimeServiceStub:
    return core_pb2_grpc.MACPRuntimeServiceStub(channel)


def sample(router: Router, name: str, **labels: str) -> float:
    return router.metrics.registry.get_sample_value(name, labels) or 0.0


def policy(policy_id: str) -> policy_pb2.RegisterPolicyRequest:
    return policy_pb2.RegisterPolicyRequest(policy_descriptor=policy_pb2.PolicyDescriptor(
        policy_id=policy_id, mode=MODE, rules=b"{}", schema_version=1))


async def restart(pod: SimPod, **options: object) -> SimPod:
    """Stop `pod` and start a new process in its place (same name and port)."""
    port = pod.port
    await pod.stop()
    fresh = SimPod(pod.name, f"127.0.0.1:{port}", **pod_options(**options))
    await fresh.start()
    return fresh


async def stale_route(router: Router, sid: str, wrong_pod: str) -> None:
    """Fault injection: the router believes `sid` is on `wrong_pod` (feeds closed first, so no
    feed corrects it: only the stream's own answer can)."""
    for feed in router.feeds.values():
        await feed.aclose()
    router.locator.near.set(sid, wrong_pod, OPEN)


def sdk(address: str) -> AsyncMacpClient:
    return AsyncMacpClient(target=address, allow_insecure=True,
                           auth=AuthConfig.for_dev_agent("coordinator"), default_timeout=TIMEOUT)


# -- 2. never move a live session ----------------------------------------------------------------
async def test_a_second_pod_reporting_a_live_session_never_moves_it_until_the_owner_lost_it(
    named_pods, make_router, tmp_path, caplog
):
    a, b = await named_pods("a", "b", persist=True)
    router = await make_router([a, b])
    async with grpc.aio.insecure_channel(a.address) as direct:
        sid = await start(direct)
    await a.flush()
    await eventually(lambda: router.locator.try_cached(sid) == "a", what="a's feed reports it")

    # b restarts on a copy of a's storage (two runtimes wrongly sharing one data directory):
    # it recovers a's session and its feed reports it as its own.
    caplog.set_level(logging.WARNING, logger="macp_router.locator")
    b_port, b_state = b.port, b.state_file
    await b.stop()
    shutil.copy(a.state_file, b_state)
    b2 = SimPod("b", f"127.0.0.1:{b_port}", state_file=b_state, **pod_options())
    await b2.start()
    try:
        await eventually(lambda: router.locator.duplicates(sid) == ["b"],
                         what="b's report recorded as a duplicate")
        assert router.locator.try_cached(sid) == "a"
        assert sample(router, "macp_router_duplicate_sessions_total", protocol="macp") >= 1
        assert any(sid in r.getMessage() and "a, b" in r.getMessage() for r in caplog.records)

        async with grpc.aio.insecure_channel(router.address) as channel:
            sends_a, sends_b = a.calls["Send"], b2.calls["Send"]
            assert (await send(channel, proposal_envelope(sid))).ok
            assert (a.calls["Send"] - sends_a, b2.calls["Send"] - sends_b) == (1, 0)
            status = await router_pb2_grpc.RouterAdminStub(channel).SessionStatus(
                router_pb2.SessionStatusRequest(session_id=sid), timeout=TIMEOUT)
            assert (status.status, status.pod, list(status.also_on)) == ("live", "a", ["b"])
            assert "b" in status.detail

            # Evidence that the owner lost it: a restarts empty, its reconcile no longer
            # lists the session, and only now does the entry move to b.
            a2 = await restart(a)
            try:
                await eventually(lambda: router.locator.try_cached(sid) == "b",
                                 what="the entry moves once a's reconcile drops it")
                assert router.locator.duplicates(sid) == []
                assert (await send(channel, proposal_envelope(sid))).ok
                assert b2.calls["Send"] - sends_b == 1
            finally:
                await a2.stop()
    finally:
        await b2.stop()


async def test_owner_answering_not_found_to_the_duplicate_probe_moves_the_session(
    sim_pods, make_router
):
    a, b = await sim_pods(2)
    router = await make_router([a, b])
    async with grpc.aio.insecure_channel(b.address) as direct:
        sid = await start(direct)
    await eventually(lambda: router.locator.try_cached(sid) == "b", what="b's feed reports it")
    # A stale entry names a (e.g. written by another replica), then b reports the session
    # again (its feed reconnects): the router asks a, which answers not_found.
    router.locator.near.set(sid, "a", OPEN)
    b.drop_watchers()
    await eventually(lambda: router.locator.try_cached(sid) == "b",
                     what="the duplicate check moves it back to b")
    assert router.locator.duplicates(sid) == []


# -- 3. new sessions only on ready pods ----------------------------------------------------------
async def test_a_pod_whose_feed_is_not_reconciled_takes_no_new_sessions_but_routes_its_own(
    sim_pods, make_router
):
    a, b = await sim_pods(2)
    router = await make_router([a, b])
    async with grpc.aio.insecure_channel(b.address) as direct:
        on_b = await start(direct)
    await eventually(lambda: router.locator.try_cached(on_b) == "b", what="b's feed reports it")
    await router.feeds["b"].aclose()  # b is healthy, but the router no longer follows it
    router.readiness.refresh()
    assert router.readiness.snapshot["pods"]["b"]["placeable"] is False
    assert "feed" in router.readiness.snapshot["pods"]["b"]["not_placeable"]
    assert router.pods.get("b").healthy

    async with grpc.aio.insecure_channel(router.address) as channel:
        table = await router_pb2_grpc.RouterAdminStub(channel).ListPods(
            router_pb2.ListPodsRequest(), timeout=TIMEOUT)
        shown = {pod.name: pod.not_placeable for pod in table.pods}
        assert shown["a"] == "" and "feed" in shown["b"]  # `macp-router pods` says why
        starts_b = b.calls["Send"]
        for _ in range(6):
            await start(channel)
        assert b.calls["Send"] == starts_b  # every new session went to a
        assert (await send(channel, proposal_envelope(on_b))).ok  # b's own session routes
        assert b.calls["Send"] == starts_b + 1

        router.feeds["b"].start()
        assert await router.feeds["b"].wait_for(lambda f: f.up, 10)
        assert router.pods.get("b").placeable
        placed = [await start(channel) for _ in range(12)]
        assert any(router.locator.try_cached(sid) == "b" for sid in placed)


# -- 4. broadcasts are honest --------------------------------------------------------------------
async def test_registration_refused_by_one_pod_is_not_remembered_and_the_answer_names_it(
    sim_pods, make_router, tmp_path
):
    a, b = await sim_pods(2)
    (c,) = await sim_pods(1, policies_dir=str(tmp_path))  # file-loaded policies: read-only
    router = await make_router([a, b, c])
    async with grpc.aio.insecure_channel(router.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await macp(channel).RegisterPolicy(policy("p.split"), metadata=METADATA,
                                               timeout=TIMEOUT)
    error = excinfo.value
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "c refused it" in error.details() and "FAILED_PRECONDITION" in error.details()
    assert "held by a" in error.details() and "not remembered" in error.details()
    assert await router.store.broadcasts() == []
    assert sample(router, "macp_router_broadcasts_total", method="RegisterPolicy",
                  result="refused") == 1

    fresh_a = await restart(a)
    try:
        assert await router.feeds["a"].wait_for(lambda f: f.up and f.reconciles > 1, 10)
        assert "p.split" not in fresh_a.policies  # never replayed
    finally:
        await fresh_a.stop()


async def test_already_registered_counts_as_held_and_is_replayed_after_a_restart(
    sim_pods, make_router
):
    a, b, c = await sim_pods(3)
    router = await make_router([a, b, c])
    async with grpc.aio.insecure_channel(a.address) as direct:
        assert (await macp(direct).RegisterPolicy(policy("p.held"), metadata=METADATA,
                                                  timeout=TIMEOUT)).ok
    async with grpc.aio.insecure_channel(router.address) as channel:
        reply = await macp(channel).RegisterPolicy(policy("p.held"), metadata=METADATA,
                                                   timeout=TIMEOUT)
    assert reply.ok, reply  # b and c accepted it; a already held it
    assert [r.key for r in await router.store.broadcasts()] == ["policy:p.held"]

    fresh_b = await restart(b)
    try:
        await eventually(lambda: "p.held" in fresh_b.policies, what="the replay to b")
        assert fresh_b.calls["RegisterPolicy"] == 1
    finally:
        await fresh_b.stop()


async def test_a_registration_every_pod_forbids_is_their_own_answer_and_not_remembered(
    sim_pods, make_router
):
    pods = await sim_pods(2)
    router = await make_router(pods)
    reviewer = (("authorization", "Bearer reviewer"),)  # no registry rights
    async with grpc.aio.insecure_channel(router.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await macp(channel).RegisterPolicy(policy("p.denied"), metadata=reviewer,
                                               timeout=TIMEOUT)
    assert excinfo.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert await router.store.broadcasts() == []


async def test_a_feed_reconnect_of_a_pod_that_kept_its_registry_replays_nothing(
    sim_pods, make_router
):
    a, b = await sim_pods(2)
    router = await make_router([a, b])
    async with grpc.aio.insecure_channel(router.address) as channel:
        assert (await macp(channel).RegisterPolicy(policy("p.kept"), metadata=METADATA,
                                                   timeout=TIMEOUT)).ok
    reconciles = router.feeds["a"].reconciles
    a.drop_watchers()  # the feed reconnects; the pod process (and its registry) stays
    assert await router.feeds["a"].wait_for(lambda f: f.reconciles > reconciles and f.up, 10)
    assert a.calls["RegisterPolicy"] == 1  # the client's call only: nothing replayed
    assert a.calls["ListPolicies"] >= 1  # compared against what the pod lists


# -- 5. streams survive a stale route ------------------------------------------------------------
async def test_stream_opened_on_a_stale_route_reaches_the_holder_transparently(
    sim_pods, make_router
):
    a, b = await sim_pods(2)
    router = await make_router([a, b])
    async with grpc.aio.insecure_channel(b.address) as direct:
        sid = await start(direct)
    await stale_route(router, sid, "a")

    client = sdk(router.address)
    inline_errors: list[object] = []
    async with client.open_stream() as stream:
        stream.on_inline_error(inline_errors.append)
        proposal = proposal_envelope(sid)
        await stream.send(proposal)
        echoed = await stream.read(timeout=TIMEOUT)
        assert echoed is not None and echoed.message_id == proposal.message_id
        second = proposal_envelope(sid)
        await stream.send(second)
        assert (await stream.read(timeout=TIMEOUT)).message_id == second.message_id
    await client.close()
    assert inline_errors == []  # the stale pod's "UnknownSession" never reached the client
    assert router.locator.try_cached(sid) == "b"
    assert [env.message_id for env in b.sessions[sid].log[1:]] == [
        proposal.message_id, second.message_id]
    assert a.calls["StreamSession"] == 1 and b.calls["StreamSession"] == 1


async def test_subscription_on_a_stale_route_is_answered_by_the_holder(sim_pods, make_router):
    a, b = await sim_pods(2)
    router = await make_router([a, b])
    async with grpc.aio.insecure_channel(b.address) as direct:
        sid = await start(direct)
    await stale_route(router, sid, "a")  # a answers the subscription NOT_FOUND (ends it)

    client = sdk(router.address)
    async with client.open_stream() as stream:
        await stream.send_subscribe(sid)
        replayed = await stream.read(timeout=TIMEOUT)
        assert replayed is not None and replayed.message_type == "SessionStart"
    await client.close()
    assert router.locator.try_cached(sid) == "b"


async def test_stream_start_reservation_is_released_by_the_streams_own_refusal(
    sim_pods, make_router
):
    pods = await sim_pods(2)
    router = await make_router(pods, negative_cache_ms=0)
    envelope = start_envelope(sid="not a session id!")  # INVALID_SESSION_ID: ends the stream
    async with grpc.aio.insecure_channel(router.address) as channel:
        call = macp(channel).StreamSession(metadata=METADATA, timeout=TIMEOUT)
        await call.write(core_pb2.StreamSessionRequest(envelope=envelope))
        assert await call.code() is grpc.StatusCode.INVALID_ARGUMENT
    # Released now, not after the 30 s reservation grace.
    await eventually(lambda: router.locator.near.entry(envelope.session_id) is None, timeout=10,
                     what="the reservation released")
    assert await router.store.get(envelope.session_id) is None


async def test_stream_start_refused_inline_releases_and_a_duplicate_start_keeps_the_owner(
    sim_pods, make_router
):
    (pod,) = await sim_pods(1, auth_tokens=[*TOKEN_ENTRIES,
                                            agent_entry("watcher", can_start_sessions=False)])
    router = await make_router([pod])
    refused = start_envelope()
    refused.sender = "watcher"
    async with grpc.aio.insecure_channel(router.address) as channel:
        call = macp(channel).StreamSession(metadata=(("authorization", "Bearer watcher"),),
                                           timeout=TIMEOUT)
        await call.write(core_pb2.StreamSessionRequest(envelope=refused))
        answer = await call.read()
        assert answer.HasField("error"), answer  # inline: the stream stays open
        await eventually(lambda: router.locator.near.entry(refused.session_id) is None,
                         timeout=2, what="the reservation released by the inline error")
        call.cancel()

        sid = await start(channel)
        again = start_envelope(sid=sid)  # same sid, another message_id: ALREADY_EXISTS
        call = macp(channel).StreamSession(metadata=METADATA, timeout=TIMEOUT)
        await call.write(core_pb2.StreamSessionRequest(envelope=again))
        assert await call.code() is grpc.StatusCode.ALREADY_EXISTS
    assert router.locator.near.entry(sid) == (pod.name, OPEN)


async def test_router_keeps_working_after_many_stale_stream_reroutes(sim_pods, make_router):
    """Every re-routed stream ends cleanly: no stream handler or upstream call is left over."""
    a, b = await sim_pods(2)
    router = await make_router([a, b])
    async with grpc.aio.insecure_channel(b.address) as direct:
        sids = [await start(direct) for _ in range(5)]
    for feed in router.feeds.values():
        await feed.aclose()
    client = sdk(router.address)

    async def one(sid: str) -> None:
        router.locator.near.set(sid, "a", OPEN)
        async with client.open_stream() as stream:
            proposal = proposal_envelope(sid)
            await stream.send(proposal)
            assert (await stream.read(timeout=TIMEOUT)).message_id == proposal.message_id

    await asyncio.gather(*(one(sid) for sid in sids))
    await client.close()
    await eventually(
        lambda: sample(router, "macp_router_active_streams", protocol="macp",
                       method="StreamSession") == 0, what="every relayed stream ended")


async def test_a_store_outage_does_not_stop_placement_and_the_replay_follows_its_recovery(
    sim_pods, make_router, redis_server_factory
):
    server = redis_server_factory()
    a, b = await sim_pods(2)
    router = await make_router([a, b], redis_url=server.url)
    async with grpc.aio.insecure_channel(router.address) as channel:
        assert (await macp(channel).RegisterPolicy(policy("p.outage"), metadata=METADATA,
                                                   timeout=TIMEOUT)).ok
    assert [r.key for r in await router.store.broadcasts()] == ["policy:p.outage"]

    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)  # Redis hangs: the store degrades, data kept
    try:
        fresh_b = await restart(b)
        try:
            await eventually(lambda: router.store.degraded, what="store degraded")
            assert await router.feeds["b"].wait_for(lambda f: f.up, 20)
            await eventually(lambda: router.pods.get("b").placeable,  # type: ignore[union-attr]
                             what="b placeable during the outage")
            assert "p.outage" not in fresh_b.policies
        except BaseException:
            await fresh_b.stop()
            raise
    finally:
        server.process.send_signal(signal.SIGCONT)
    try:
        await eventually(lambda: not router.store.degraded, timeout=20, what="store recovered")
        await eventually(lambda: "p.outage" in fresh_b.policies, timeout=10,
                         what="the deferred replay to b")
    finally:
        await fresh_b.stop()
