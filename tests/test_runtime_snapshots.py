"""Terminal sessions in every WatchSessions snapshot (macp-runtime v0.6.1): a reconnect costs no
store write for what the router already knows.

The runtime's snapshot is every in-memory session, terminal ones included, for its whole
retention (MACP_SESSION_RETENTION_SECS, 1 h after the start). Real simulated pods, a real
router, a real Redis whose executed commands are counted (INFO commandstats).
"""

from __future__ import annotations

import grpc

from tests import macp_calls
from tests.waiting import eventually

# Commands that write a location entry (plain or through the store's Lua scripts).
WRITES = ("set", "setex", "psetex", "mset", "hset", "sadd", "srem", "del", "unlink", "expire",
          "pexpire", "eval", "evalsha", "fcall")


def writes(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after.get(name, 0) - before.get(name, 0) for name in WRITES
            if after.get(name, 0) != before.get(name, 0)}


async def test_a_feed_reconnect_writes_nothing_for_unchanged_sessions(
    sim_pods, make_router, redis_server, redis_url
):
    pods = await sim_pods(1)
    pod = pods[0]
    router = await make_router(pods, redis_url=redis_url)
    async with grpc.aio.insecure_channel(router.address) as channel:
        sids = [await macp_calls.start(channel) for _ in range(30)]
        for sid in sids[:10]:  # a third of them end: terminal, yet in every snapshot
            envelope = macp_calls.proposal_envelope(sid)
            envelope.message_type = "Commitment"
            assert (await macp_calls.send(channel, envelope)).ok
    feed = router.feeds[pod.name]

    def settled() -> bool:
        return all(router.locator.near.entry(sid) is not None for sid in sids) and all(
            router.locator.near.entry(sid)[1] != "open" for sid in sids[:10])  # type: ignore[index]

    await eventually(settled, what="every session and its end seen by the feed")
    await router.locator.flush()
    counter = redis_server.command_counter()
    try:
        await eventually(lambda: _quiet(counter), timeout=10, what="Redis idle")
        before = counter.sample()
        reconciles, events = feed.reconciles, feed.applied_events
        for _ in range(3):
            pod.drop_watchers()  # the feed's stream ends; it reconnects, snapshot + reconcile
            await eventually(lambda r=reconciles: feed.reconciles > r, what="a reconnect")
            reconciles = feed.reconciles
        # Every snapshot repeats all 30 (the reader applies them beside the reconcile).
        await eventually(lambda: feed.applied_events - events >= 3 * 30,
                         what="three snapshots of 30 sessions applied")
        await router.locator.flush()
        after = counter.sample()
    finally:
        counter.close()
    written = writes(before, after)
    # Only what does not depend on the sessions: the per-reconnect reconcile script (3) and the
    # store's own periodic marker check; never a write per session (that was 3 x 90 = 273).
    assert sum(written.values()) <= 12, written
    assert written.get("evalsha", 0) + written.get("eval", 0) <= 6, written
    assert all(router.locator.near.entry(sid) is not None for sid in sids)


def _quiet(counter) -> bool:  # type: ignore[no-untyped-def]
    """True once two samples 300 ms apart show no write (the write-behind has drained)."""
    import time

    first = counter.sample()
    time.sleep(0.3)
    return not writes(first, counter.sample())
