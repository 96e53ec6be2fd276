"""The near-cache: sid -> pod in process memory, with exact per-(pod, state) counts.

Placement reads `open_counts` and metrics read `counts` on every call, so they must stay exact
through every set, move, discard and expiry. Expiry is driven through `sweep(now=...)`, so no
test waits for a clock.
"""

from __future__ import annotations

import time

from router.near_cache import NearCache
from router.store import CANCELLED, OPEN, RESERVED, RESOLVED, SUSPENDED


def test_an_open_session_maps_to_its_pod_and_counts_as_open() -> None:
    near = NearCache()
    near.set("s1", "a", OPEN)
    assert near.get("s1") == "a"
    assert near.entry("s1") == ("a", OPEN)
    assert dict(near.counts()) == {("a", OPEN): 1}
    assert dict(near.open_counts()) == {"a": 1}
    assert near.get("other") is None and near.entry("other") is None


def test_reservations_count_as_open_and_ended_sessions_do_not() -> None:
    near = NearCache()
    near.set("r", "a", RESERVED)
    near.set("s", "a", SUSPENDED)
    near.set("e", "a", RESOLVED, ttl_s=600)
    assert dict(near.open_counts()) == {"a": 1}
    assert dict(near.counts()) == {("a", RESERVED): 1, ("a", SUSPENDED): 1, ("a", RESOLVED): 1}


def test_setting_a_session_again_moves_its_counts() -> None:
    near = NearCache()
    near.set("s1", "a", RESERVED)
    near.set("s1", "a", OPEN)
    near.set("s1", "b", OPEN)
    assert len(near) == 1
    assert dict(near.counts()) == {("b", OPEN): 1}
    assert dict(near.open_counts()) == {"b": 1}


def test_discard_removes_the_entry_only_while_it_names_that_pod() -> None:
    near = NearCache()
    near.set("s1", "a", OPEN)
    assert near.discard("s1", "b") is False
    assert near.get("s1") == "a"
    assert near.discard("s1", "a") is True
    assert near.get("s1") is None and len(near) == 0
    assert dict(near.counts()) == {} and dict(near.open_counts()) == {}
    assert near.discard("s1", "a") is False


def test_sweep_drops_expired_entries_oldest_first_up_to_the_limit() -> None:
    near = NearCache()
    for i in range(5):
        near.set(f"e{i}", "a", RESOLVED, ttl_s=10 + i)
    near.set("forever", "a", CANCELLED)  # no ttl: never swept
    near.set("open", "a", OPEN)
    later = time.monotonic() + 100
    assert near.sweep(now=later, limit=2) == 2
    assert near.get("e0") is None and near.get("e1") is None and near.get("e2") == "a"
    assert near.sweep(now=later) == 3
    assert sorted(sid for sid, _, _ in near.items()) == ["forever", "open"]
    assert dict(near.counts()) == {("a", CANCELLED): 1, ("a", OPEN): 1}


def test_sweep_keeps_an_entry_that_was_renewed_after_its_first_expiry_was_queued() -> None:
    near = NearCache()
    near.set("s1", "a", RESOLVED, ttl_s=1)
    near.set("s1", "a", RESOLVED, ttl_s=1000)  # renewed: the first queue entry is stale
    assert near.sweep(now=time.monotonic() + 10) == 0
    assert near.get("s1") == "a"


def test_an_entry_past_its_expiry_is_gone_on_read() -> None:
    near = NearCache()
    near.set("s1", "a", RESOLVED, ttl_s=1e-9)
    deadline = time.monotonic() + 1
    while near.get("s1") is not None:  # the clock moves on within microseconds
        assert time.monotonic() < deadline, "an expired entry was still returned"
    assert dict(near.counts()) == {}


def test_sessions_of_lists_one_pods_entries_with_their_states() -> None:
    near = NearCache()
    near.set("s1", "a", OPEN)
    near.set("s2", "a", RESOLVED, ttl_s=60)
    near.set("s3", "b", OPEN)
    assert sorted(near.sessions_of("a")) == [("s1", OPEN), ("s2", RESOLVED)]
    assert near.sessions_of("c") == []


def test_a_long_ttl_queued_first_does_not_hold_back_shorter_ones() -> None:
    """A reservation's long TTL queued before many short terminal TTLs: the sweep still drops
    each ended session when its own retention runs out (the soak saw ended sessions kept for
    the reservation's 300 s instead of --retention-s 30)."""
    near = NearCache()
    now = time.monotonic()
    near.set("reserved", "a", RESERVED, ttl_s=300)
    for i in range(5):
        near.set(f"ended{i}", "a", RESOLVED, ttl_s=30)
    assert near.sweep(now=now + 31) == 5
    assert near.entry("reserved") == ("a", RESERVED)
    assert all(near.get(f"ended{i}") is None for i in range(5))
    assert near.sweep(now=now + 301) == 1
    assert len(near) == 0


# -- the bound: --cache-max-sessions ---------------------------------------------------------
def test_a_full_cache_evicts_an_ended_session_before_any_live_one() -> None:
    near = NearCache(max_entries=4)
    near.set("live1", "a", OPEN)
    near.set("ended1", "a", RESOLVED, ttl_s=600)
    near.set("live2", "b", OPEN)
    near.set("ended2", "b", CANCELLED, ttl_s=600)
    near.set("new1", "a", OPEN)
    near.set("new2", "b", RESERVED, ttl_s=300)
    assert len(near) == 4
    assert near.get("ended1") is None and near.get("ended2") is None
    assert {sid for sid, _, _ in near.items()} == {"live1", "live2", "new1", "new2"}
    assert near.evictions == {"expired": 0, "terminal": 2, "live": 0}
    assert dict(near.counts()) == {("a", OPEN): 2, ("b", OPEN): 1, ("b", RESERVED): 1}
    assert dict(near.open_counts()) == {"a": 2, "b": 2}


def test_with_no_ended_session_a_full_cache_evicts_the_oldest_live_one() -> None:
    near = NearCache(max_entries=3)
    for sid in ("s1", "s2", "s3"):
        near.set(sid, "a", OPEN)
    near.set("s1", "a", SUSPENDED)  # updating an entry does not make room or evict
    assert len(near) == 3 and near.evictions["live"] == 0
    near.set("s4", "a", OPEN)
    near.set("s5", "a", OPEN)
    assert [sid for sid, _, _ in near.items()] == ["s3", "s4", "s5"]
    assert near.evictions == {"expired": 0, "terminal": 0, "live": 2}
    assert dict(near.open_counts()) == {"a": 3}


def test_an_entry_removed_before_the_cache_filled_is_not_evicted_again() -> None:
    """Queues keep stale references (lazy deletion): evicting skips them, so every eviction
    removes one entry that is really there and the cache stays exactly at its bound."""
    near = NearCache(max_entries=3)
    near.set("gone", "a", RESOLVED, ttl_s=600)
    near.discard("gone", "a")
    near.set("s1", "a", OPEN)
    near.set("s2", "a", OPEN)
    near.set("s3", "a", OPEN)
    near.set("s4", "a", OPEN)
    assert len(near) == 3 and near.get("s1") is None and near.get("s4") == "a"
    assert near.evictions == {"expired": 0, "terminal": 0, "live": 1}


def test_under_endless_churn_the_cache_and_its_queues_stay_within_the_bound() -> None:
    """1M-scale behaviour at a small bound: 20 000 sessions through a 1 000-entry cache, each
    reserved, opened, ended (the life a session has in the router). The dict never exceeds
    the bound, and the age, terminal and expiry queues stay within 2x + 1024 of it."""
    bound = 1000
    near = NearCache(max_entries=bound)
    peak_queue = 0
    for i in range(20_000):
        sid = f"s{i}"
        near.set(sid, "a", RESERVED, ttl_s=300)
        near.set(sid, "a", OPEN)
        near.set(sid, "a", RESOLVED, ttl_s=600)
        assert len(near) <= bound
        peak_queue = max(peak_queue, len(near._order), len(near._terminal_order),
                         len(near._expiry_queue))
    assert len(near) == bound
    assert peak_queue <= 2 * bound + 1024 + 1, peak_queue
    assert near.evictions["terminal"] == 20_000 - bound and near.evictions["live"] == 0
    assert sum(near.counts().values()) == bound


def test_eviction_cost_does_not_grow_with_the_number_of_stale_references() -> None:
    """O(1) amortized: filling a full 20 000-entry cache with 20 000 more costs about what the
    first 20 000 inserts cost. A scan of the cache per insert would take 20 000 x 20 000 steps
    (seconds); the bar (20x, best of three) leaves room for a loaded machine."""
    bound = 20_000
    fills, evictions = [], []
    for round_ in range(3):
        near = NearCache(max_entries=bound)
        started = time.perf_counter()
        for i in range(bound):
            near.set(f"a{round_}-{i}", "a", OPEN)
        fills.append(time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(bound):
            near.set(f"b{round_}-{i}", "a", OPEN)
        evictions.append(time.perf_counter() - started)
        assert len(near) == bound and near.evictions["live"] == bound
    assert min(evictions) < 20 * min(fills) + 0.1, (fills, evictions)


def test_sweep_counts_expiries_and_trims_the_ended_queue() -> None:
    near = NearCache(max_entries=100)
    now = time.monotonic()
    for i in range(10):
        near.set(f"e{i}", "a", RESOLVED, ttl_s=30)
    assert near.sweep(now=now + 31) == 10
    assert near.evictions["expired"] == 10
    assert len(near._terminal_order) == 0 and len(near._order) == 0 and len(near) == 0
