"""Routing through an in-process router in front of simulated pods.

Real grpc.aio servers on loopback: raw `MACPRuntimeService` stubs with a deadline on every RPC.
Pod counters (`SimPod.calls`) tell which pod saw what; a router probe is a `GetSession` with the
router's own token, a forwarded call is the client's. Tests wait for states with bounded polling
(`eventually`, `WatchFeed.wait_for`), never for a guessed time.
"""

from __future__ import annotations

import asyncio
import gc
import re
import uuid
from typing import Any

import grpc
import pytest
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2, policy_pb2

from router.app import Router
from router.sim import SimPod
from router.v1 import router_pb2, router_pb2_grpc
from tests.macp_calls import (
    AGENT,
    METADATA,
    MODE,
    TIMEOUT,
    get_session,
    proposal_envelope,
    send,
    start,
    start_envelope,
)
from tests.pod_auth import pod_options
from tests.waiting import eventually


# -- helpers -----------------------------------------------------------------------------------
def macp(channel: grpc.aio.Channel) -> core_pb2_grpc.MACPRuntimeServiceStub:
    return core_pb2_grpc.MACPRuntimeServiceStub(channel)


def admin(channel: grpc.aio.Channel) -> router_pb2_grpc.RouterAdminStub:
    return router_pb2_grpc.RouterAdminStub(channel)


def holders(pods: list[SimPod], sid: str) -> list[str]:
    return [pod.name for pod in pods if sid in pod.sessions]


def counts(pods: list[SimPod], method: str) -> dict[str, int]:
    return {pod.name: pod.calls[method] for pod in pods}


def names_pod(details: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", details) is not None


async def close_feeds(router: Router) -> None:
    """Stop learning from the pods: sessions created from now on are unknown to the router."""
    for feed in router.feeds.values():
        await feed.aclose()


async def learned(router: Router, sid: str, pod: str, timeout: float = 5.0) -> None:
    """Wait until the pod's watch feed has put `sid -> pod` into the near-cache."""
    ok = await router.feeds[pod].wait_for(
        lambda _feed: router.locator.try_cached(sid) == pod, timeout
    )
    assert ok, f"the feed of pod {pod} did not report {sid}"


async def expect_error(call: Any, code: grpc.StatusCode) -> str:
    """Await `call`, expect an RPC error with `code`; return its details."""
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await call
    assert excinfo.value.code() is code, (excinfo.value.code(), excinfo.value.details())
    return excinfo.value.details() or ""


def signal_envelope() -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope(
        macp_version="1.0", message_type="Signal", message_id=str(uuid.uuid4()),
        session_id="", sender=AGENT,
        payload=core_pb2.SignalPayload(signal_type="heartbeat").SerializeToString(),
    )


# -- locate: single flight, cache hits, stale entries, not found -------------------------------
async def test_concurrent_misses_for_one_session_probe_each_pod_once(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods)
    await close_feeds(router)
    a, b, c = pods
    async with grpc.aio.insecure_channel(b.address) as direct:
        sid = await start(direct)
    assert router.locator.try_cached(sid) is None

    async with grpc.aio.insecure_channel(router.address) as channel:
        replies = await asyncio.gather(*(get_session(channel, sid) for _ in range(50)))
    assert {reply.metadata.session_id for reply in replies} == {sid}
    # One probe fan-out: one probe on each pod, the holder's the reply of the caller that sent
    # it (its own GetSession); the holder also got the 49 other callers' forwarded calls.
    await eventually(lambda: a.calls["GetSession"] == 1 and c.calls["GetSession"] == 1,
                     what="the probes of the non-holders")
    assert counts(pods, "GetSession") == {"a": 1, "b": 50, "c": 1}
    assert router.locator.try_cached(sid) == "b"


async def test_cache_hit_sends_no_probe(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods)
    c = pods[2]
    async with grpc.aio.insecure_channel(c.address) as direct:
        sid = await start(direct)
    await learned(router, sid, "c")

    async with grpc.aio.insecure_channel(router.address) as channel:
        for _ in range(20):
            assert (await get_session(channel, sid)).metadata.session_id == sid
        ack = await send(channel, proposal_envelope(sid))
    assert ack.ok, ack
    assert counts(pods, "GetSession") == {"a": 0, "b": 0, "c": 20}
    assert counts(pods, "Send") == {"a": 0, "b": 0, "c": 2}  # the direct start + the proposal


async def test_stale_cache_entry_for_get_session_is_relocated_once(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods)
    await close_feeds(router)
    b, c = pods[1], pods[2]
    async with grpc.aio.insecure_channel(b.address) as direct:
        sid = await start(direct)
    router.locator.near.set(sid, "a", "open")  # wrong: the session is on b

    async with grpc.aio.insecure_channel(router.address) as channel:
        reply = await get_session(channel, sid)
    assert reply.metadata.session_id == sid
    assert router.locator.try_cached(sid) == "b"
    # a: the forwarded call that said NOT_FOUND + one probe of the re-locate fan-out;
    # b: its probe, the client's own GetSession, whose answer was the reply (no retried
    # call); c: its probe. Nothing else.
    await eventually(lambda: c.calls["GetSession"] == 1 and pods[0].calls["GetSession"] == 2,
                     what="the re-locate probes of a and c")
    assert counts(pods, "GetSession") == {"a": 2, "b": 1, "c": 1}


async def test_stale_cache_entry_for_send_is_relocated_once(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods)
    await close_feeds(router)
    b = pods[1]
    async with grpc.aio.insecure_channel(b.address) as direct:
        sid = await start(direct)
    router.locator.near.set(sid, "a", "open")

    async with grpc.aio.insecure_channel(router.address) as channel:
        ack = await send(channel, proposal_envelope(sid))
    assert ack.ok, ack  # pod a answered Ack SESSION_NOT_FOUND; the router retried on b
    assert counts(pods, "Send") == {"a": 1, "b": 2, "c": 0}  # b: the direct start + the retry
    assert router.locator.try_cached(sid) == "b"
    assert len(b.sessions[sid].log) == 2  # the proposal was accepted once, on b


async def test_session_on_no_pod_gets_the_runtimes_not_found_and_is_negatively_cached(
    sim_pods, make_router
):
    pods = await sim_pods(3)
    router = await make_router(pods, negative_cache_ms=60_000)
    sid = str(uuid.uuid4())

    async with grpc.aio.insecure_channel(router.address) as channel:
        details = await expect_error(get_session(channel, sid), grpc.StatusCode.NOT_FOUND)
        assert sid in details  # the runtime's own answer
        # The client's GetSession was the probe: 3 calls, a pod's NOT_FOUND is the answer.
        await eventually(lambda: sum(counts(pods, "GetSession").values()) == 3,
                         what="3 probes, no forwarded call")
        details = await expect_error(get_session(channel, sid), grpc.StatusCode.NOT_FOUND)
        assert sid in details
        assert sum(counts(pods, "GetSession").values()) == 4  # forwarded only, no fan-out

        other = str(uuid.uuid4())
        ack = await send(channel, proposal_envelope(other))
        assert not ack.ok and ack.error.code == "SESSION_NOT_FOUND", ack
        assert ack.error.session_id == other  # the runtime's own answer
        await eventually(lambda: sum(counts(pods, "GetSession").values()) == 7,
                         what="one fan-out for the Send")
        ack = await send(channel, proposal_envelope(other))
        assert not ack.ok and ack.error.code == "SESSION_NOT_FOUND", ack
        assert sum(counts(pods, "GetSession").values()) == 7  # negative cache: no fan-out
        assert sum(counts(pods, "Send").values()) == 2
    assert router.locator.try_cached(sid) is None and router.locator.try_cached(other) is None
    assert not any(sid in pod.sessions or other in pod.sessions for pod in pods)


async def test_created_event_clears_the_negative_cache(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods, negative_cache_ms=60_000)
    sid = str(uuid.uuid4())
    async with grpc.aio.insecure_channel(router.address) as channel:
        await expect_error(get_session(channel, sid), grpc.StatusCode.NOT_FOUND)
        async with grpc.aio.insecure_channel(pods[2].address) as direct:
            await start(direct, sid)
        await learned(router, sid, "c")
        assert (await get_session(channel, sid)).metadata.session_id == sid


# -- silent and stopped pods -------------------------------------------------------------------
async def test_silent_pod_makes_an_unlocatable_session_unavailable_without_blocking_others(
    sim_pods, make_router
):
    pods = await sim_pods(3)
    router = await make_router(pods, probe_timeout_ms=1000)
    a, b, c = pods
    async with grpc.aio.insecure_channel(b.address) as direct:
        known = await start(direct)
    await learned(router, known, "b")
    c.hang = True
    missing = str(uuid.uuid4())

    async with grpc.aio.insecure_channel(router.address) as channel:
        lookup = asyncio.ensure_future(get_session(channel, missing))
        await eventually(lambda: c.calls["GetSession"] == 1, what="the probe reached c")
        # While the fan-out waits for c, a known session keeps working.
        for _ in range(10):
            assert (await get_session(channel, known)).metadata.session_id == known
            assert (await send(channel, proposal_envelope(known))).ok
        assert not lookup.done(), "a cache hit waited behind a pending probe fan-out"
        details = await expect_error(lookup, grpc.StatusCode.UNAVAILABLE)
        assert missing in details and names_pod(details, "c"), details
        assert "retry" in details

        # A Send for it is refused the same way: never forwarded, never placed.
        details = await expect_error(
            macp(channel).Send(core_pb2.SendRequest(envelope=proposal_envelope(missing)),
                               metadata=METADATA, timeout=TIMEOUT),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert names_pod(details, "c"), details
    assert router.locator.try_cached(missing) is None
    assert holders(pods, missing) == []
    assert a.calls["Send"] == 0 and c.calls["Send"] == 0


async def test_stopped_pod_sessions_are_unavailable_and_route_again_after_restart(
    named_pods, make_router
):
    pods = await named_pods("a", "b", "c", persist=True)
    router = await make_router(pods)
    b = pods[1]
    sids = {}
    for pod in pods:
        async with grpc.aio.insecure_channel(pod.address) as direct:
            sids[pod.name] = await start(direct)
        await learned(router, sids[pod.name], pod.name)
    address = b.address
    await b.stop()

    async with grpc.aio.insecure_channel(router.address) as channel:
        details = await expect_error(get_session(channel, sids["b"]), grpc.StatusCode.UNAVAILABLE)
        assert names_pod(details, "b") and "retry" in details, details
        details = await expect_error(
            macp(channel).Send(core_pb2.SendRequest(envelope=proposal_envelope(sids["b"])),
                               metadata=METADATA, timeout=TIMEOUT),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert names_pod(details, "b"), details
        # The other pods' sessions are unaffected.
        assert (await get_session(channel, sids["a"])).metadata.session_id == sids["a"]
        assert (await send(channel, proposal_envelope(sids["c"]))).ok

        await eventually(lambda: not router.pods.get("b").healthy, what="b marked unhealthy")
        started = [await start(channel) for _ in range(12)]
        where = {sid: holders(pods, sid) for sid in started}
        assert all(pods_of in (["a"], ["c"]) for pods_of in where.values()), where

        await b.start()
        assert b.address == address  # same name, same port
        assert sids["b"] in b.sessions  # replayed from its state file

        async def routed_again() -> bool:
            try:
                await get_session(channel, sids["b"])
            except grpc.aio.AioRpcError as exc:
                # While the router reconnects: a retryable UNAVAILABLE, never NOT_FOUND.
                assert exc.code() is grpc.StatusCode.UNAVAILABLE, (exc.code(), exc.details())
                return False
            return True

        await eventually(routed_again, timeout=10, what="b's session routes again")
        assert (await send(channel, proposal_envelope(sids["b"]))).ok
    assert not any(sid in b.sessions for sid in started)


# -- placement ---------------------------------------------------------------------------------
async def test_session_starts_are_placed_once_and_spread(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        sids = [await start(channel) for _ in range(30)]
        placed = {sid: holders(pods, sid) for sid in sids}
        assert all(len(where) == 1 for where in placed.values()), placed
        assert len({where[0] for where in placed.values()}) >= 2, placed

        # A duplicate start of the same sid goes to the same pod; the runtime answers it.
        sid = sids[0]
        owner = placed[sid][0]
        sends = counts(pods, "Send")
        ack = await send(channel, start_envelope(sid))
        assert not ack.ok and ack.error.code == "SESSION_ALREADY_EXISTS", ack
        # Even when this router's near-cache forgot it, the store's reservation decides.
        await router.locator.flush()
        router.locator.near.discard(sid, owner)
        ack = await send(channel, start_envelope(sid))
        assert not ack.ok and ack.error.code == "SESSION_ALREADY_EXISTS", ack
        # A retry of the very same start envelope is the runtime's duplicate.
        first = pods[[p.name for p in pods].index(owner)].sessions[sid].log[0]
        ack = await send(channel, first)
        assert ack.ok and ack.duplicate, ack
        after = counts(pods, "Send")
        assert {name: after[name] - sends[name] for name in after} == {
            name: (3 if name == owner else 0) for name in after
        }
        assert holders(pods, sid) == [owner]


async def test_drained_pod_gets_no_new_sessions_but_keeps_routing_its_own(
    sim_pods, make_router
):
    pods = await sim_pods(3)
    router = await make_router(pods)
    a = pods[0]
    async with grpc.aio.insecure_channel(a.address) as direct:
        on_a = await start(direct)
    await learned(router, on_a, "a")

    async with grpc.aio.insecure_channel(router.address) as channel:
        reply = await admin(channel).DrainPod(router_pb2.DrainPodRequest(name="a"),
                                              timeout=TIMEOUT)
        assert reply.pod.name == "a" and reply.pod.draining
        sids = [await start(channel) for _ in range(15)]
        assert not any(sid in a.sessions for sid in sids)
        assert (await get_session(channel, on_a)).metadata.session_id == on_a
        assert (await send(channel, proposal_envelope(on_a))).ok

        details = await expect_error(
            admin(channel).DrainPod(router_pb2.DrainPodRequest(name="zz"), timeout=TIMEOUT),
            grpc.StatusCode.NOT_FOUND,
        )
        assert "zz" in details

        reply = await admin(channel).UndrainPod(router_pb2.DrainPodRequest(name="a"),
                                                timeout=TIMEOUT)
        assert not reply.pod.draining
        # a is now the emptiest pod: new sessions land there again.
        for _ in range(30):
            if (sid := await start(channel)) in a.sessions:
                break
        else:
            pytest.fail("no session was placed on pod a after UndrainPod")
        assert holders(pods, sid) == ["a"]


# -- streams -----------------------------------------------------------------------------------
async def test_stream_session_relays_both_ways_to_the_holder_and_ends_on_half_close(
    sim_pods, make_router
):
    pods = await sim_pods(3)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await start(channel)
        (holder,) = holders(pods, sid)
        call = macp(channel).StreamSession(metadata=METADATA, timeout=TIMEOUT)
        proposal = proposal_envelope(sid)
        await call.write(core_pb2.StreamSessionRequest(envelope=proposal))
        reply = await call.read()
        assert reply.envelope.message_id == proposal.message_id
        second = proposal_envelope(sid)
        await call.write(core_pb2.StreamSessionRequest(envelope=second))
        assert (await call.read()).envelope.message_id == second.message_id
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() is grpc.StatusCode.OK
    assert counts(pods, "StreamSession") == {p.name: int(p.name == holder) for p in pods}
    by_name = {p.name: p for p in pods}
    assert [env.message_id for env in by_name[holder].sessions[sid].log[1:]] == [
        proposal.message_id, second.message_id,
    ]


async def test_stream_session_cancel_reaches_the_pod(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        sid = await start(channel)
        (holder,) = holders(pods, sid)
        pod = next(p for p in pods if p.name == holder)
        call = macp(channel).StreamSession(metadata=METADATA, timeout=TIMEOUT)
        await call.write(core_pb2.StreamSessionRequest(envelope=proposal_envelope(sid)))
        await call.read()  # the pod's handler is running
        call.cancel()
        await eventually(lambda: pod.cancelled_calls["StreamSession"] >= 1,
                         what="the pod saw the cancellation")
        assert await call.code() is grpc.StatusCode.CANCELLED


async def test_stream_session_subscription_goes_to_the_holder(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods)
    b = pods[1]
    async with grpc.aio.insecure_channel(b.address) as direct:
        sid = await start(direct)
        ack = await send(direct, proposal_envelope(sid))
        assert ack.ok
    await learned(router, sid, "b")
    async with grpc.aio.insecure_channel(router.address) as channel:
        call = macp(channel).StreamSession(metadata=METADATA, timeout=TIMEOUT)
        await call.write(core_pb2.StreamSessionRequest(subscribe_session_id=sid))
        replayed = [await call.read(), await call.read()]
        assert [r.envelope.message_type for r in replayed] == ["SessionStart", "Proposal"]
        # A message sent by someone else reaches the subscriber through the router.
        later = proposal_envelope(sid)
        assert (await send(channel, later)).ok
        assert (await call.read()).envelope.message_id == later.message_id
        await call.done_writing()
        assert await call.code() is grpc.StatusCode.OK
    assert counts(pods, "StreamSession") == {"a": 0, "b": 1, "c": 0}


async def test_stream_session_start_frame_places_the_session(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        call = macp(channel).StreamSession(metadata=METADATA, timeout=TIMEOUT)
        envelope = start_envelope()
        await call.write(core_pb2.StreamSessionRequest(envelope=envelope))
        assert (await call.read()).envelope.message_type == "SessionStart"
        (holder,) = holders(pods, envelope.session_id)
        await call.done_writing()
        assert await call.code() is grpc.StatusCode.OK
        assert router.locator.try_cached(envelope.session_id) == holder
        assert (await get_session(channel, envelope.session_id)).metadata.mode == MODE


# -- fan-out -----------------------------------------------------------------------------------
async def test_list_sessions_merges_dedupes_and_pages_with_router_tokens(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods)
    a, b, _c = pods
    async with grpc.aio.insecure_channel(router.address) as channel:
        sids = {await start(channel) for _ in range(11)}
        # One sid held by two pods (created behind the router's back) is listed once.
        twice = str(uuid.uuid4())
        for pod in (a, b):
            async with grpc.aio.insecure_channel(pod.address) as direct:
                await start(direct, twice)
        sids.add(twice)
        assert len({h for sid in sids for h in holders(pods, sid)}) >= 2

        stub = macp(channel)
        seen: list[str] = []
        tokens: list[str] = []
        token = ""
        for _ in range(10):
            page = await stub.ListSessions(
                core_pb2.ListSessionsRequest(page_size=5, page_token=token),
                metadata=METADATA, timeout=TIMEOUT,
            )
            seen.extend(s.session_id for s in page.sessions)
            token = page.next_page_token
            if not token:
                break
            tokens.append(token)
        assert len(tokens) == 2 and all(t.startswith("r2.") for t in tokens), tokens
        assert len(seen) == 12 and set(seen) == sids, seen  # no duplicates, no gaps

        whole = await stub.ListSessions(core_pb2.ListSessionsRequest(), metadata=METADATA,
                                        timeout=TIMEOUT)
        assert [s.session_id for s in whole.sessions] == seen and not whole.next_page_token

        details = await expect_error(
            stub.ListSessions(core_pb2.ListSessionsRequest(page_size=5, page_token="pod-token"),
                              metadata=METADATA, timeout=TIMEOUT),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "page_token" in details


async def test_watch_sessions_merges_every_pods_events(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods)
    a, b, c = pods
    async with grpc.aio.insecure_channel(c.address) as direct:
        before = await start(direct)  # in c's snapshot
    async with grpc.aio.insecure_channel(router.address) as channel:
        call = macp(channel).WatchSessions(core_pb2.WatchSessionsRequest(), metadata=METADATA,
                                           timeout=TIMEOUT)
        # The router's feed is one watcher per pod; the merged call adds one more on each.
        await eventually(lambda: all(p.watcher_count >= 2 for p in pods),
                         what="the merged watch subscribed to every pod")
        created = {}
        for pod in (a, b):
            async with grpc.aio.insecure_channel(pod.address) as direct:
                created[await start(direct)] = pod.name
        wanted = {before, *created}
        got: set[str] = set()
        while not wanted <= got:
            reply = await asyncio.wait_for(call.read(), TIMEOUT)
            assert reply is not grpc.aio.EOF, f"stream ended; saw {got}"
            if reply.event.event_type == core_pb2.SessionLifecycleEvent.EVENT_TYPE_CREATED:
                got.add(reply.event.session.session_id)
        call.cancel()


async def test_merged_watch_headers_come_once_every_pod_has_subscribed(sim_pods, make_router):
    """As from the runtime: headers mean subscribed, so an event after them is never missed,
    even on pods with no session to send."""
    pods = await sim_pods(3)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        call = macp(channel).WatchSessions(core_pb2.WatchSessionsRequest(), metadata=METADATA,
                                           timeout=TIMEOUT)
        await asyncio.wait_for(call.initial_metadata(), TIMEOUT)  # no event has been sent
        assert all(p.watcher_count >= 2 for p in pods), "headers before every pod subscribed"
        async with grpc.aio.insecure_channel(pods[2].address) as direct:
            sid = await start(direct)
        reply = await asyncio.wait_for(call.read(), TIMEOUT)
        assert reply.event.session.session_id == sid
        call.cancel()


async def test_register_policy_reaches_every_pod_and_is_replayed_to_a_fresh_pod(
    sim_pods, make_router
):
    pods = await sim_pods(3)
    router = await make_router(pods)
    c = pods[2]
    policy = policy_pb2.PolicyDescriptor(policy_id="p.routing", mode=MODE, rules=b"{}",
                                         schema_version=1)
    async with grpc.aio.insecure_channel(router.address) as channel:
        reply = await macp(channel).RegisterPolicy(
            policy_pb2.RegisterPolicyRequest(policy_descriptor=policy),
            metadata=METADATA, timeout=TIMEOUT,
        )
    assert reply.ok, reply
    assert all("p.routing" in pod.policies for pod in pods)

    # c restarts as a fresh process: same name and port, no state file, empty registry.
    port = c.port
    reconciles = router.feeds["c"].reconciles
    await c.stop()
    fresh = SimPod("c", f"127.0.0.1:{port}", **pod_options())
    await fresh.start()
    try:
        assert not fresh.policies
        assert await router.feeds["c"].wait_for(lambda f: f.reconciles > reconciles, 10)
        await eventually(lambda: "p.routing" in fresh.policies, what="the replay to c")
        assert fresh.policies["p.routing"].mode == MODE
    finally:
        await fresh.stop()


# -- admin -------------------------------------------------------------------------------------
async def test_admin_session_status_and_pod_table(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods)
    b, c = pods[1], pods[2]
    async with grpc.aio.insecure_channel(b.address) as direct:
        sid = await start(direct)
    await learned(router, sid, "b")

    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = admin(channel)
        status = await stub.SessionStatus(router_pb2.SessionStatusRequest(session_id=sid),
                                          timeout=TIMEOUT)
        assert (status.status, status.pod, status.source, status.state) == (
            "live", "b", "cache", "open")

        missing = await stub.SessionStatus(
            router_pb2.SessionStatusRequest(session_id=str(uuid.uuid4())), timeout=TIMEOUT)
        assert (missing.status, missing.pod, list(missing.unknown_pods)) == ("not_found", "", [])

        table = await stub.ListPods(router_pb2.ListPodsRequest(), timeout=TIMEOUT)
        assert [(p.name, p.address, p.healthy, p.feed_up) for p in table.pods] == [
            (p.name, p.address, True, True) for p in pods
        ]
        assert {p.name: p.open_sessions for p in table.pods}["b"] == 1
        assert table.store == "memory" and not table.store_degraded

        c.hang = True
        unknown = await stub.SessionStatus(
            router_pb2.SessionStatusRequest(session_id=str(uuid.uuid4())), timeout=TIMEOUT)
        assert unknown.status == "unknown" and list(unknown.unknown_pods) == ["c"], unknown
        assert names_pod(unknown.detail, "c"), unknown.detail
        # The known session is still answered (from the cache, and by a fresh probe: b is live).
        probed = await stub.SessionStatus(
            router_pb2.SessionStatusRequest(session_id=sid, probe=True), timeout=TIMEOUT)
        assert (probed.status, probed.pod, probed.source) == ("live", "b", "probe")

        details = await expect_error(
            stub.SessionStatus(router_pb2.SessionStatusRequest(session_id=""), timeout=TIMEOUT),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "session_id" in details


async def test_ambient_signal_goes_to_one_pod(sim_pods, make_router):
    pods = await sim_pods(3)
    router = await make_router(pods)
    async with grpc.aio.insecure_channel(router.address) as channel:
        ack = await send(channel, signal_envelope())
    assert ack.ok, ack
    assert sum(counts(pods, "Send").values()) == 1


async def test_feed_of_a_stopped_pod_fails_without_unretrieved_task_errors(
    sim_pods, make_router, caplog
):
    pods = await sim_pods(2)
    router = await make_router(pods)
    feed = router.feeds["b"]
    reconnects = feed.reconnects
    await pods[1].stop()
    # The stream ends, then resubscribing fails while the pod is down (twice or more).
    assert await feed.wait_for(lambda f: f.reconnects >= reconnects + 2, 10), feed.last_error
    assert not feed.up
    gc.collect()
    assert "exception was never retrieved" not in caplog.text
