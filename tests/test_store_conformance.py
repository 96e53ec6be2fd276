"""One conformance suite for every `LocationStore` (Orleans `GrainDirectoryTests<T>` style).

Each test runs against `MemoryStore` and against `RedisStore` on each Redis topology, real servers
started by tests/redis_fixture.py (valkey-server or redis-server): a standalone Redis, a Redis
Cluster (3 masters + 3 replicas, ``redis+cluster://``) and a Sentinel group (1 master, 1 replica,
3 sentinels, ``redis+sentinel://``). The invariants are the ones in `router.store`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from router.redis_store import RedisStore
from router.store import (
    CANCELLED,
    EXPIRED,
    OPEN,
    RESERVED,
    RESOLVED,
    SUSPENDED,
    BroadcastRecord,
    Location,
    LocationStore,
    MemoryStore,
)
from tests.waiting import eventually

MakeStore = Callable[..., Awaitable[LocationStore]]

WAIT_S = 5.0


URL_FIXTURES = {
    "memory": None,
    "redis": "redis_url",
    "cluster": "redis_cluster_url",
    "sentinel": "redis_sentinel_url",
}


@pytest.fixture(params=list(URL_FIXTURES))
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    fixture = URL_FIXTURES[request.param]
    url = request.getfixturevalue(fixture) if fixture else None
    stores: list[LocationStore] = []

    async def make(*, retention_s: float = 600.0, reservation_ttl_s: float = 300.0):
        store: LocationStore
        if url is None:
            store = MemoryStore(retention_s=retention_s, reservation_ttl_s=reservation_ttl_s)
        else:
            store = RedisStore(
                url, retention_s=retention_s, reservation_ttl_s=reservation_ttl_s, timeout_s=2.0
            )
        await store.start()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.aclose()


@pytest.fixture
async def store(make_store: MakeStore) -> LocationStore:
    return await make_store()


async def test_store_satisfies_protocol(store: LocationStore) -> None:
    assert isinstance(store, LocationStore)
    assert not store.degraded


async def test_get_of_unknown_session_is_none(store: LocationStore) -> None:
    assert await store.get("nobody") is None


async def test_put_then_get_returns_the_location(store: LocationStore) -> None:
    location = Location("pod-a", OPEN, "inc-1", 1234)
    await store.put("s1", location)
    assert await store.get("s1") == location


async def test_put_overwrites(store: LocationStore) -> None:
    await store.put("s1", Location("pod-a", OPEN, "inc-1", 1))
    await store.put("s1", Location("pod-a", SUSPENDED, "inc-2", 2))
    assert await store.get("s1") == Location("pod-a", SUSPENDED, "inc-2", 2)


async def test_every_state_roundtrips(store: LocationStore) -> None:
    for state in (RESERVED, OPEN, SUSPENDED, RESOLVED, EXPIRED, CANCELLED):
        await store.put(f"s-{state}", Location("pod-a", state, "", 7))
        assert await store.get(f"s-{state}") == Location("pod-a", state, "", 7)


async def test_reserve_wins_when_absent(store: LocationStore) -> None:
    assert await store.reserve("s1", "pod-a") == "pod-a"
    location = await store.get("s1")
    assert location is not None
    assert (location.pod, location.state) == ("pod-a", RESERVED)
    assert location.updated_at_ms > 0


async def test_reserve_loses_and_returns_the_owner(store: LocationStore) -> None:
    assert await store.reserve("s1", "pod-a") == "pod-a"
    assert await store.reserve("s1", "pod-b") == "pod-a"
    await store.put("s2", Location("pod-c", OPEN))
    assert await store.reserve("s2", "pod-b") == "pod-c"
    assert (await store.get("s2")) == Location("pod-c", OPEN)
    assert "s2" not in await store.pod_sessions("pod-b")


async def test_concurrent_reserves_have_exactly_one_winner(store: LocationStore) -> None:
    pods = [f"pod-{i}" for i in range(200)]
    owners = await asyncio.wait_for(
        asyncio.gather(*(store.reserve("contested", pod) for pod in pods)), WAIT_S
    )
    assert len(set(owners)) == 1
    winner = owners[0]
    assert sum(1 for pod, owner in zip(pods, owners, strict=True) if pod == owner) == 1
    location = await store.get("contested")
    assert location is not None and location.pod == winner
    for pod in pods:
        expected = {"contested"} if pod == winner else set()
        assert await store.pod_sessions(pod) == expected


async def test_delete_only_when_owner_matches(store: LocationStore) -> None:
    await store.put("s1", Location("pod-a", OPEN))
    assert await store.delete("s1", "pod-b") is False
    assert (await store.get("s1")) == Location("pod-a", OPEN)
    assert await store.delete("s1", "pod-a") is True
    assert await store.get("s1") is None
    assert await store.pod_sessions("pod-a") == set()
    assert await store.delete("s1", "pod-a") is False


async def test_release_removes_only_the_reservation_it_made(store: LocationStore) -> None:
    assert await store.reserve("s1", "pod-a", "router-1") == "pod-a"
    assert await store.release("s1", "pod-a", "router-2") is False  # another router's token
    assert await store.release("s1", "pod-b", "router-1") is False  # another pod
    location = await store.get("s1")
    assert location is not None and (location.pod, location.state) == ("pod-a", RESERVED)
    assert await store.pod_sessions("pod-a") == {"s1"}
    assert await store.release("s1", "pod-a", "router-1") is True
    assert await store.get("s1") is None
    assert await store.pod_sessions("pod-a") == set()
    assert await store.release("s1", "pod-a", "router-1") is False


async def test_release_spares_an_entry_written_open_after_the_reservation(
    store: LocationStore,
) -> None:
    assert await store.reserve("s1", "pod-a", "router-1") == "pod-a"
    await store.put("s1", Location("pod-a", OPEN, "inc-1", 3))  # the pod's feed confirmed it
    assert await store.release("s1", "pod-a", "router-1") is False
    assert await store.get("s1") == Location("pod-a", OPEN, "inc-1", 3)
    assert await store.pod_sessions("pod-a") == {"s1"}
    await store.put("s2", Location("pod-a", RESERVED, "router-1", 4))
    await store.put("s2", Location("pod-b", OPEN))  # moved: pod-a's release must not touch it
    assert await store.release("s2", "pod-a", "router-1") is False
    assert await store.get("s2") == Location("pod-b", OPEN)
    assert await store.pod_sessions("pod-a") == {"s1"}


async def test_concurrent_release_and_open_write_never_lose_the_open_entry(
    store: LocationStore,
) -> None:
    sids = [f"race-{i}" for i in range(50)]
    for sid in sids:
        assert await store.reserve(sid, "pod-a", "router-1") == "pod-a"
    await asyncio.wait_for(asyncio.gather(
        *(store.release(sid, "pod-a", "router-1") for sid in sids),
        *(store.put(sid, Location("pod-a", OPEN, "feed", 1)) for sid in sids),
    ), WAIT_S)
    for sid in sids:
        assert await store.get(sid) == Location("pod-a", OPEN, "feed", 1)
    assert await store.pod_sessions("pod-a") == set(sids)


async def test_pod_sessions_lists_each_pods_entries(store: LocationStore) -> None:
    await store.put("a1", Location("pod-a", OPEN))
    await store.put("a2", Location("pod-a", SUSPENDED))
    assert await store.reserve("a3", "pod-a") == "pod-a"
    await store.put("b1", Location("pod-b", OPEN))
    assert await store.pod_sessions("pod-a") == {"a1", "a2", "a3"}
    assert await store.pod_sessions("pod-b") == {"b1"}
    assert await store.pod_sessions("pod-z") == set()


async def test_drop_pod_sessions_keeps_the_keep_set(store: LocationStore) -> None:
    for sid in ("a1", "a2", "a3", "a4"):
        await store.put(sid, Location("pod-a", OPEN))
    await store.put("b1", Location("pod-b", OPEN))
    assert await store.drop_pod_sessions("pod-a", {"a2", "a4", "not-there"}) == 2
    assert await store.pod_sessions("pod-a") == {"a2", "a4"}
    assert await store.get("a1") is None and await store.get("a3") is None
    assert await store.get("a2") == Location("pod-a", OPEN)
    assert await store.get("b1") == Location("pod-b", OPEN)
    assert await store.drop_pod_sessions("pod-a", set()) == 2
    assert await store.pod_sessions("pod-a") == set()
    assert await store.drop_pod_sessions("pod-a", set()) == 0


async def test_drop_pod_sessions_spares_sessions_that_moved(store: LocationStore) -> None:
    await store.put("s1", Location("pod-a", OPEN))
    await store.put("s1", Location("pod-b", OPEN))
    assert await store.drop_pod_sessions("pod-a", set()) == 0
    assert await store.get("s1") == Location("pod-b", OPEN)


async def test_drop_pod_sessions_is_compare_and_delete_after_expiry(
    make_store: MakeStore,
) -> None:
    store = await make_store(reservation_ttl_s=0.2)
    assert await store.reserve("s1", "pod-a") == "pod-a"
    await eventually(lambda: _is_absent(store, "s1"))
    # The expired reservation may linger in pod-a's index; pod-b now owns the session.
    assert await store.reserve("s1", "pod-b") == "pod-b"
    await store.put("s1", Location("pod-b", OPEN))
    assert await store.drop_pod_sessions("pod-a", set()) == 0
    assert await store.delete("s1", "pod-a") is False
    assert await store.get("s1") == Location("pod-b", OPEN)
    assert await store.pod_sessions("pod-a") == set()
    assert await store.pod_sessions("pod-b") == {"s1"}


async def _is_absent(store: LocationStore, sid: str) -> bool:
    return await store.get(sid) is None


async def test_terminal_entries_expire_after_retention(make_store: MakeStore) -> None:
    store = await make_store(retention_s=0.2)
    await store.put("done", Location("pod-a", RESOLVED))
    await store.put("live", Location("pod-a", OPEN))
    assert await store.get("done") == Location("pod-a", RESOLVED)
    await eventually(lambda: _is_absent(store, "done"))
    assert await store.get("live") == Location("pod-a", OPEN)
    assert await store.pod_sessions("pod-a") == {"live"}


async def test_reopened_terminal_entry_loses_its_ttl(make_store: MakeStore) -> None:
    store = await make_store(retention_s=0.2)
    await store.put("s1", Location("pod-a", CANCELLED))
    await store.put("s1", Location("pod-a", OPEN))
    await store.put("marker", Location("pod-a", EXPIRED))
    await eventually(lambda: _is_absent(store, "marker"))
    assert await store.get("s1") == Location("pod-a", OPEN)


async def test_reservation_expires_unless_confirmed(make_store: MakeStore) -> None:
    store = await make_store(reservation_ttl_s=0.2)
    assert await store.reserve("unconfirmed", "pod-a") == "pod-a"
    assert await store.reserve("confirmed", "pod-a") == "pod-a"
    await store.put("confirmed", Location("pod-a", OPEN, "inc", 5))
    await eventually(lambda: _is_absent(store, "unconfirmed"))
    assert await store.get("confirmed") == Location("pod-a", OPEN, "inc", 5)
    assert await store.pod_sessions("pod-a") == {"confirmed"}
    # Once expired, the session is free again.
    assert await store.reserve("unconfirmed", "pod-b") == "pod-b"


async def test_put_moving_a_session_updates_both_indexes(store: LocationStore) -> None:
    await store.put("s1", Location("pod-a", OPEN))
    await store.put("s2", Location("pod-a", OPEN))
    await store.put("s1", Location("pod-b", OPEN, "inc-b", 9))
    assert await store.pod_sessions("pod-a") == {"s2"}
    assert await store.pod_sessions("pod-b") == {"s1"}
    assert await store.get("s1") == Location("pod-b", OPEN, "inc-b", 9)
    assert await store.delete("s1", "pod-a") is False
    assert await store.delete("s1", "pod-b") is True


async def test_broadcast_registry_replays_in_registration_order(store: LocationStore) -> None:
    first = BroadcastRecord("policy:a", "/macp.v1.Runtime/RegisterPolicy", b"\x00a\n\xff")
    second = BroadcastRecord("mode:x", "/macp.v1.Runtime/RegisterExtMode", b"x")
    third = BroadcastRecord("policy:b", "/macp.v1.Runtime/RegisterPolicy", b"")
    for record in (first, second, third):
        await store.record_broadcast(record)
    assert await store.broadcasts() == [first, second, third]


async def test_broadcast_reregistration_replaces_and_moves_last(store: LocationStore) -> None:
    a = BroadcastRecord("a", "/m/A", b"1")
    b = BroadcastRecord("b", "/m/B", b"2")
    await store.record_broadcast(a)
    await store.record_broadcast(b)
    a2 = BroadcastRecord("a", "/m/A", b"updated")
    await store.record_broadcast(a2)
    assert await store.broadcasts() == [b, a2]


async def test_forget_broadcast(store: LocationStore) -> None:
    a = BroadcastRecord("a", "/m/A", b"1")
    b = BroadcastRecord("b", "/m/B", b"2")
    await store.record_broadcast(a)
    await store.record_broadcast(b)
    await store.forget_broadcast("a")
    await store.forget_broadcast("never-registered")
    assert await store.broadcasts() == [b]
    await store.forget_broadcast("b")
    assert await store.broadcasts() == []


async def test_put_many_stores_a_pods_startup_snapshot(store: LocationStore) -> None:
    await store.put("moved", Location("pod-old", OPEN))
    items = [(f"s{i:05d}", Location("pod-a", OPEN, "inc-1", i)) for i in range(5000)]
    items.append(("moved", Location("pod-a", SUSPENDED)))
    await asyncio.wait_for(store.put_many(items), 30)
    sessions = await store.pod_sessions("pod-a")
    assert len(sessions) == 5001
    assert sessions == {sid for sid, _ in items}
    assert await store.pod_sessions("pod-old") == set()
    for i in (0, 1, 2499, 4999):
        assert await store.get(f"s{i:05d}") == Location("pod-a", OPEN, "inc-1", i)
    assert await store.drop_pod_sessions("pod-a", {"s00000"}) == 5000
    assert await store.pod_sessions("pod-a") == {"s00000"}


async def test_put_many_of_nothing_is_a_no_op(store: LocationStore) -> None:
    await store.put_many([])
    assert await store.pod_sessions("pod-a") == set()


async def test_drop_pod_sessions_counts_only_live_entries(make_store: MakeStore) -> None:
    store = await make_store(retention_s=0.2)
    await store.put("done", Location("pod-a", RESOLVED))
    await store.put("live", Location("pod-a", OPEN))
    await store.put("probe", Location("pod-b", RESOLVED))
    # Wait on another pod's entry so "done" is never read (no lazy clean-up) before the drop.
    await eventually(lambda: _is_absent(store, "probe"))
    assert await store.drop_pod_sessions("pod-a", set()) == 1
    assert await store.pod_sessions("pod-a") == set()


async def test_drain_flags_are_shared(store: LocationStore) -> None:
    assert await store.draining_pods() == set()
    await store.set_draining("pod-a", True)
    await store.set_draining("pod-b", True)
    await store.set_draining("pod-b", False)
    assert await store.draining_pods() == {"pod-a"}
