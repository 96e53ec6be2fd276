"""A pod's WatchSessions stream cut under traffic: the router never trusts the stream alone.

The pod ends the router's feed: either closing it (`SimPod.drop_watchers()`, a clean end) or
dropping it as a slow consumer (RESOURCE_EXHAUSTED / STREAM_LAGGED, what the runtime does when a
subscriber's queue overflows). While the feed is down, sessions on that pod are resolved and
cancelled directly on the pod; the old stream can no longer carry those events and the new
stream's snapshot leaves terminal sessions out, so only the ListSessions reconcile can tell the
router. Afterwards the router must not report any of them live (admin SessionStatus `state`),
its near-cache must match the pod's records exactly, and traffic must not have noticed.
"""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from macp.v1 import core_pb2, envelope_pb2

from router.sim import SimPod
from router.store import TERMINAL_STATES
from router.watch import SESSION_STATES
from tests import macp_calls
from tests.faults.conftest import (
    LOAD_LIMITS,
    FaultRow,
    Traffic,
    client_misroutes,
    eventually,
    final_sweep,
    holders,
    report,
    session_status,
    sessions_by_pod,
    start_sessions,
)

BACKOFF_BASE_S = 0.5  # first reconnect after a cut waits 0.5-1.0 s: a window to change things


def commitment(sid: str) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope(
        macp_version="1.0", mode=macp_calls.MODE, message_type="Commitment",
        message_id=str(uuid.uuid4()), session_id=sid, sender=macp_calls.AGENT,
    )


def lag_watchers(pod: SimPod) -> None:
    """Drop every WatchSessions subscriber as the runtime drops a slow consumer (its queue
    overflowed): the stream ends RESOURCE_EXHAUSTED / STREAM_LAGGED, later events are lost.
    The 10k-event backlog that causes it for real is skipped."""
    for sub in list(pod._session_watchers):
        sub.lagged = True
        sub.event.set()


CUTS = {
    "closed": ("WatchSessions closed by the pod (drop_watchers)", SimPod.drop_watchers),
    "lagged": ("WatchSessions dropped as a slow consumer (RESOURCE_EXHAUSTED)", lag_watchers),
}


@pytest.mark.parametrize("cut", sorted(CUTS))
async def test_watch_stream_cut_reconnects_reconciles_and_leaves_no_stale_entry(
    sim_pods, make_router, cut
):
    pods = await sim_pods(3, **LOAD_LIMITS)
    router = await make_router(pods)
    for feed in router.feeds.values():
        feed.backoff_base_s = BACKOFF_BASE_S
    b = pods[1]
    traffic_sids = await start_sessions(router.address, 15)
    # Sessions on b that will end while b's feed is down (kept out of the random traffic).
    doomed = []
    async with grpc.aio.insecure_channel(b.address) as direct:
        for _ in range(4):
            doomed.append(await macp_calls.start(direct))
    feed = router.feeds["b"]
    await eventually(lambda: all(router.locator.near.entry(sid) == ("b", "open")
                                 for sid in doomed), what="b's feed reported the sessions")
    resolved, cancelled = doomed[:2], doomed[2:]
    label, do_cut = CUTS[cut]

    async with Traffic([router.address], traffic_sids, workers=6, starts=0.1) as traffic:
        await traffic.hold(0.5)
        reconciles, reconnects = feed.reconciles, feed.reconnects
        subscribes = b.calls["WatchSessions"]
        do_cut(b)
        cut_at = time.monotonic()
        await eventually(lambda: feed.reconnects > reconnects, what="the feed saw the cut")
        async with grpc.aio.insecure_channel(b.address) as direct:
            for sid in resolved:
                ack = await macp_calls.send(direct, commitment(sid))
                assert ack.ok and ack.session_state == envelope_pb2.SESSION_STATE_RESOLVED
            stub = macp_calls.stub(direct)
            for sid in cancelled:
                reply = await stub.CancelSession(
                    core_pb2.CancelSessionRequest(session_id=sid, reason="fault test"),
                    metadata=macp_calls.METADATA, timeout=5)
                assert reply.ack.ok
        # All of it happened while the feed was down (before it subscribed again).
        assert b.calls["WatchSessions"] == subscribes and not feed.up
        await eventually(lambda: feed.reconciles > reconciles and feed.up, timeout=10,
                         what="the feed resubscribed and reconciled")
        back_at = time.monotonic()
        await traffic.hold(0.5)

    # Reconnected with backoff: not at once, and within the cap.
    assert BACKOFF_BASE_S - 0.05 <= back_at - cut_at <= 2 * feed.backoff_max_s + 1.0
    # No stale entry: nothing b ended is reported live, and the cache matches b exactly.
    for sid, state in [*((s, "resolved") for s in resolved),
                       *((s, "cancelled") for s in cancelled)]:
        status = await session_status(router.address, sid)
        assert status.status != "live" and status.state == state, (sid, status)
    for sid, record in b.sessions.items():
        expected = SESSION_STATES[record.metadata.state]
        assert router.locator.near.entry(sid) == ("b", expected), sid
    assert all(router.locator.near.entry(sid)[1] in TERMINAL_STATES for sid in doomed)

    by_pod = await sessions_by_pod(pods)
    held = holders(by_pod)
    duplicates = [sid for sid, where in held.items() if len(where) > 1]
    lost = (set(traffic_sids) | traffic.acked_starts) - set(held)
    assert traffic.errors() == {}, traffic.errors()
    assert not duplicates and not lost and not client_misroutes(traffic, held)
    live = set(traffic_sids) | traffic.acked_starts
    assert not await final_sweep(router.address, live)
    stale = router.metrics.registry.get_sample_value(
        "macp_router_locate_total", {"protocol": "macp", "result": "stale"}) or 0
    report(FaultRow(
        fault=f"{label}; 2 sessions resolved + 2 cancelled on b while its feed was down",
        traffic=traffic.describe(),
        errors=traffic.errors(),
        misroutes=f"0 (router stale relocations {int(stale)}); "
                  "stale entries after reconcile: 0",
        duplicates=len(duplicates),
        lost=len(lost),
        recovery=f"feed back and reconciled {back_at - cut_at:.2f} s after the cut "
                 f"(backoff {BACKOFF_BASE_S:.1f}-{2 * BACKOFF_BASE_S:.1f} s)",
    ))
