"""The near-cache: sid -> pod in process memory, with exact per-(pod, state) counts.

Placement reads `open_counts` and metrics read `counts` on every call, so they must stay exact
through every set, move, discard and expiry. Expiry is driven through `sweep(now=...)`, so no
test waits for a clock.
"""

from __future__ import annotations

import time

from router.locator import NearCache
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
