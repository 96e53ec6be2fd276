"""RedisStore on the distributed topologies beyond the conformance suite: a slot caught
mid-migration (ASK, TRYAGAIN), and the per-shard markers that notice one flushed master.

Real servers from tests/redis_fixture.py: the session-wide Redis Cluster (3 masters + 3 replicas)
and Sentinel group; the standalone server for comparison.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis

from router.redis_store import DEFAULT_INDEX_SHARDS, RedisStore, shard_of, shard_tags
from router.store import OPEN, Location, StoreUnavailable
from tests.redis_fixture import RedisClusterServers, RedisServer, free_port
from tests.waiting import eventually

WAIT_S = 10.0


@pytest.fixture
async def stores() -> AsyncIterator[list[RedisStore]]:
    created: list[RedisStore] = []
    yield created
    for store in created:
        await store.aclose()


@pytest.fixture
def make(stores: list[RedisStore]) -> Callable[..., RedisStore]:
    def make(url: str, **kwargs: object) -> RedisStore:
        kwargs.setdefault("health_interval_s", 0.05)
        store = RedisStore(url, **kwargs)  # type: ignore[arg-type]
        stores.append(store)
        return store

    return make


def sids_in_shard(shard: int, count: int) -> list[str]:
    found = (f"sid-{i}" for i in itertools.count() if shard_of(f"sid-{i}", DEFAULT_INDEX_SHARDS)
             == shard)
    return list(itertools.islice(found, count))


def errorstat(nodes: list[RedisServer], error: str) -> int:
    total = 0
    for node in nodes:
        with node.client() as client:
            stats = client.info("errorstats").get(f"errorstat_{error}")
            total += int(stats["count"]) if stats else 0
    return total


def owner_of_slot(cluster: RedisClusterServers, slot: int) -> RedisServer:
    (owner,) = [node for node in cluster.masters() if slot in cluster.slots_of(node)]
    return owner


async def test_a_slot_mid_migration_is_followed_and_retried_not_failed(
    redis_cluster: RedisClusterServers, redis_cluster_url: str, make: Callable[..., RedisStore]
) -> None:
    """ASK for a key already moved, TRYAGAIN for a script whose keys are split between the two
    nodes (retried inside the store until the migration ends), never an error or a degraded
    store; the reservation stays atomic once the slot has moved."""
    store = make(redis_cluster_url, timeout_s=3.0)
    await store.start()
    shard = 0
    slot = redis.crc.key_slot(shard_tags(DEFAULT_INDEX_SHARDS)[shard].encode())
    source = owner_of_slot(redis_cluster, slot)
    target = next(node for node in redis_cluster.masters() if node is not source)
    source_id, target_id = redis_cluster.node_id(source), redis_cluster.node_id(target)
    group = sids_in_shard(shard, 7)
    moved, kept, fresh = group[:3], group[3:6], group[6]
    for sid in moved + kept:
        await store.put(sid, Location("pod-a", OPEN, "inc", 1))
    nodes = redis_cluster.live_nodes()
    asks, tryagains = errorstat(nodes, "ASK"), errorstat(nodes, "TRYAGAIN")

    with target.client() as to, source.client() as src:
        to.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS",
                            *(store.entry_key(sid) for sid in moved))

    # ASK: the entry is on the target already; the index and the other entries are not.
    assert await store.get(moved[0]) == Location("pod-a", OPEN, "inc", 1)
    assert await store.get(kept[0]) == Location("pod-a", OPEN, "inc", 1)

    def finish_migration() -> None:
        time.sleep(0.4)  # the reservation below meets the split slot first
        with target.client() as to, source.client() as src:
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS",
                                    *keys)
            for node in (target, source):
                with node.client() as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            assert to.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) >= 1 + 6

    finisher = asyncio.create_task(asyncio.to_thread(finish_migration))
    started = time.monotonic()
    # TRYAGAIN: the new entry is absent on both nodes, the pod's index still on the source.
    owners = await asyncio.gather(store.reserve(fresh, "pod-b"), store.reserve(fresh, "pod-c"))
    took = time.monotonic() - started
    await asyncio.wait_for(finisher, WAIT_S)
    assert len(set(owners)) == 1 and owners[0] in {"pod-b", "pod-c"}
    assert took >= 0.3, "the reservation should have waited for the migration"
    assert not store.degraded
    assert errorstat(nodes, "ASK") > asks
    assert errorstat(nodes, "TRYAGAIN") > tryagains
    # Everything is on the target now, and complete.
    assert slot in redis_cluster.slots_of(target)
    assert await store.pod_sessions("pod-a") == set(moved + kept)
    assert await store.pod_sessions(owners[0]) == {fresh}


@pytest.mark.parametrize("topology", ["standalone", "cluster", "sentinel"])
async def test_one_flushed_master_is_noticed_and_the_store_resynced(
    request: pytest.FixtureRequest, make: Callable[..., RedisStore], topology: str
) -> None:
    """Every shard has its own marker: on a cluster, one master losing its data (flushed, or
    replaced together with its replica) is noticed although the others still hold theirs."""
    if topology == "standalone":
        url = request.getfixturevalue("redis_url")
        flushed: RedisServer = request.getfixturevalue("redis_server")
    elif topology == "cluster":
        url = request.getfixturevalue("redis_cluster_url")
        flushed = request.getfixturevalue("redis_cluster").masters()[0]
    else:
        url = request.getfixturevalue("redis_sentinel_url")
        flushed = request.getfixturevalue("redis_sentinel").master()
    store = make(url, marker_interval_s=0.2, timeout_s=2.0)
    resynced = asyncio.Event()

    async def on_recovered() -> None:
        resynced.set()

    store.on_recovered = on_recovered
    await store.start()
    await store.put("s1", Location("pod-a", OPEN))
    with flushed.client() as client:
        client.flushall()
    await asyncio.wait_for(resynced.wait(), WAIT_S)
    assert store.resyncs == 1 and not store.degraded
    with flushed.client() as client:  # the markers are back on the flushed node
        assert any(key.endswith(b":marker") for key in client.keys("mrouter:*"))


@pytest.mark.parametrize("scheme", ["redis+cluster", "redis+sentinel"])
async def test_unreachable_topology_degrades_with_one_line_and_no_password(
    make: Callable[..., RedisStore], caplog: pytest.LogCaptureFixture, scheme: str
) -> None:
    caplog.set_level(logging.DEBUG)
    hosts = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    path = "/mrouter/0?sentinel_password=sentinel-secret-7" if scheme.endswith("sentinel") else ""
    store = make(f"{scheme}://:hunter2-secret@{hosts}{path}", timeout_s=0.5)
    await asyncio.wait_for(store.start(), WAIT_S)
    assert store.degraded
    with pytest.raises(StoreUnavailable, match="degraded") as info:
        await store.get("s1")
    await eventually(lambda: store.health_probes >= 2)
    text = caplog.text + str(info.value) + store.degraded_reason
    assert "hunter2-secret" not in text and "sentinel-secret-7" not in text
    ours = [r for r in caplog.records if r.name == "router.redis_store"]
    assert len(ours) == 1 and "unavailable at" in ours[0].getMessage()
    assert f"{scheme}://:***@{hosts}" in ours[0].getMessage()
    assert len(ours[0].getMessage()) < 400, "one readable line"
