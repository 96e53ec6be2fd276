"""Faults of a distributed store under traffic: a Redis Cluster master killed (its replica takes
over), a Sentinel-managed master killed (the sentinels promote the replica), and slots resharded
between cluster masters mid-run.

Routers are `macp-router serve` processes sharing the store through ``redis+cluster://`` /
``redis+sentinel://`` URLs; pods are in-process SimPods (their records are the ground truth). The
checks are the fault table's: no client error, no session on two pods, no acked session lost, no
call answered not-found for a session that exists, every session routes through every router at
the end, and the store holds every session again afterwards (refilled from the routers'
near-caches where the promoted replica lacked entries).

Starts through ONE router run through every fault (while a shard is down the router places by
rendezvous hash and the client never notices). Starts RACED through both routers (the same
SessionStart sent to both at once) run before the kill and again once both routers are out of
degraded mode, and through the whole resharding: across the failover instant itself nothing
arbitrates them (see tests/faults/README.md, "Known limits", and docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import grpc
import redis

from router.redis_store import entry_key, shard_tags
from router.v1 import router_pb2
from tests.faults.conftest import (
    LOAD_LIMITS,
    Traffic,
    admin_stub,
    checked_outcome,
    eventually,
    report,
    start_sessions,
)
from tests.redis_fixture import RedisClusterServers, RedisSentinelGroup

# One sender (the test client) starts hundreds of sessions and sends thousands of messages:
# raised as an operator would for such a client.
RACES = 0.08
SHARDS_MOVED = 3


def pod_list(pods) -> str:  # type: ignore[no-untyped-def]
    return ",".join(f"{pod.name}={pod.address}" for pod in pods)


async def store_degraded(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await admin_stub(channel).ListPods(router_pb2.ListPodsRequest(), timeout=5)
    return reply.store_degraded


async def both_recovered(routers) -> bool:  # type: ignore[no-untyped-def]
    states = await asyncio.gather(*(store_degraded(r.address) for r in routers))
    return not any(states)


async def no_races_across(traffic: Traffic) -> None:
    """From now on starts go through one router only (none in flight when this returns)."""
    await traffic.pause_starts()
    traffic.races = 0.0
    traffic.resume_starts()


async def races_again(traffic: Traffic) -> None:
    await traffic.pause_starts()
    traffic.races = RACES
    traffic.resume_starts()


def redirections(cluster: RedisClusterServers) -> dict[str, int]:
    """MOVED / ASK / TRYAGAIN replies every node has sent so far (INFO errorstats)."""
    total: dict[str, int] = {}
    for node in cluster.live_nodes():
        with node.client() as client:
            for name, stats in client.info("errorstats").items():
                error = name.removeprefix("errorstat_")
                if error in ("MOVED", "ASK", "TRYAGAIN"):
                    total[error] = total.get(error, 0) + int(stats["count"])
    return total


def missing_from_store(client: redis.Redis | redis.RedisCluster, sids) -> list[str]:  # type: ignore[no-untyped-def]
    return [sid for sid in sids if not client.exists(entry_key(sid))]


async def test_cluster_master_killed_under_traffic_replica_promoted(
    sim_pods, routers, redis_cluster_factory
):
    cluster: RedisClusterServers = redis_cluster_factory()
    pods = await sim_pods(3, **LOAD_LIMITS)
    one = await routers.start(pod_list(pods), "--redis-url", cluster.url, name="r1")
    two = await routers.start(pod_list(pods), "--redis-url", cluster.url, name="r2")
    initial = await start_sessions(one.address, 20)
    victim = cluster.masters()[0]
    replica = cluster.replica_of(victim)
    tag_slots = {int(redis.crc.key_slot(tag.encode())) for tag in shard_tags(64)}
    victim_shards = len(tag_slots & cluster.slots_of(victim))
    assert victim_shards > 0
    async with Traffic([one.address, two.address], initial, workers=6, starts=0.08,
                       races=RACES) as traffic:
        await traffic.hold(1.0)
        await no_races_across(traffic)
        victim.kill()
        killed_at = time.monotonic()

        def promoted() -> bool:
            with replica.client() as client:
                return client.execute_command("ROLE")[0] == b"master"

        await eventually(lambda: asyncio.to_thread(promoted), timeout=20,
                         what="replica promoted", interval=0.05)
        promoted_at = time.monotonic()
        await eventually(lambda: both_recovered([one, two]), timeout=20,
                         what="both routers out of degraded mode", interval=0.05)
        recovered_at = time.monotonic()
        await races_again(traffic)
        await traffic.hold(1.5)
    result = await checked_outcome(pods, traffic, [one, two], initial)
    assert traffic.errors() == {}, traffic.errors()
    outage_starts = [c for c in traffic.calls
                     if c.op == "start" and killed_at <= c.started <= recovered_at]
    assert outage_starts, "no start ran while the store failed over"
    client = redis.RedisCluster(host="127.0.0.1", port=replica.port, socket_timeout=5)
    try:
        await eventually(lambda: asyncio.to_thread(
            lambda: not missing_from_store(client, result.held)),
            timeout=15, what="store refilled after the failover")
    finally:
        client.close()
    report(result.row(
        traffic,
        fault=f"Redis Cluster master SIGKILLed (3 masters + 3 replicas, node timeout 1 s; it "
              f"served {victim_shards} of 64 shards); 2 routers",
        recovery=f"replica promoted {promoted_at - killed_at:.2f} s after the kill; routers out "
                 f"of degraded mode {recovered_at - promoted_at:.2f} s later; store refilled",
        traffic_note=f"; {len(outage_starts)} single-router starts between "
                     "the kill and the routers' recovery; raced starts paused "
                     "over that window",
    ))


async def test_sentinel_master_killed_under_traffic_failover_followed(
    sim_pods, routers, redis_sentinel_factory
):
    group: RedisSentinelGroup = redis_sentinel_factory()
    pods = await sim_pods(3, **LOAD_LIMITS)
    one = await routers.start(pod_list(pods), "--redis-url", group.url, name="r1")
    two = await routers.start(pod_list(pods), "--redis-url", group.url, name="r2")
    initial = await start_sessions(one.address, 20)
    old_master = group.master()
    async with Traffic([one.address, two.address], initial, workers=6, starts=0.08,
                       races=RACES) as traffic:
        await traffic.hold(1.0)
        await no_races_across(traffic)
        old_master.kill()
        killed_at = time.monotonic()

        def failed_over() -> bool:
            try:
                return group.master_port() != old_master.port
            except (RuntimeError, redis.RedisError):
                return False  # sentinels disagree mid-election

        await eventually(lambda: asyncio.to_thread(failed_over), timeout=30,
                         what="sentinels promoted the replica", interval=0.05)
        promoted_at = time.monotonic()
        await eventually(lambda: both_recovered([one, two]), timeout=20,
                         what="both routers out of degraded mode", interval=0.05)
        recovered_at = time.monotonic()
        await races_again(traffic)
        await traffic.hold(1.5)
    result = await checked_outcome(pods, traffic, [one, two], initial)
    assert traffic.errors() == {}, traffic.errors()
    outage_starts = [c for c in traffic.calls
                     if c.op == "start" and killed_at <= c.started <= recovered_at]
    assert outage_starts, "no start ran while the store failed over"
    new_master = group.master()
    assert new_master is not old_master
    with new_master.client() as client:
        await eventually(lambda: asyncio.to_thread(
            lambda: not missing_from_store(client, result.held)),
            timeout=15, what="store refilled on the new master")
    report(result.row(
        traffic,
        fault="Sentinel-managed master SIGKILLed (1 replica, 3 sentinels, quorum 2, "
              "down-after 1 s); 2 routers, not restarted",
        recovery=f"sentinels promoted the replica {promoted_at - killed_at:.2f} s after the "
                 f"kill; routers followed it {recovered_at - promoted_at:.2f} s later; store "
                 "refilled",
        traffic_note=f"; {len(outage_starts)} single-router starts between "
                     "the kill and the routers' recovery; raced starts paused "
                     "over that window",
    ))


async def test_cluster_slots_resharded_under_traffic(sim_pods, routers, redis_cluster,
                                                     redis_cluster_url):
    cluster: RedisClusterServers = redis_cluster
    pods = await sim_pods(3, **LOAD_LIMITS)
    one = await routers.start(pod_list(pods), "--redis-url", redis_cluster_url, name="r1")
    two = await routers.start(pod_list(pods), "--redis-url", redis_cluster_url, name="r2")
    initial = await start_sessions(one.address, 200)
    source, target = cluster.masters()[:2]
    tag_slots = {int(redis.crc.key_slot(tag.encode())) for tag in shard_tags(64)}
    # The first slots of the source in the order the cli takes them, holding SHARDS_MOVED shards.
    owned = sorted(cluster.slots_of(source))
    moved_slots = next(count for count in range(1, len(owned) + 1)
                       if len(tag_slots & set(owned[:count])) >= SHARDS_MOVED)
    argv = [cluster.cli, "--cluster", "reshard", f"127.0.0.1:{source.port}",
            "--cluster-from", cluster.node_id(source), "--cluster-to", cluster.node_id(target),
            "--cluster-slots", str(moved_slots), "--cluster-yes", "--cluster-pipeline", "10"]
    log_path = cluster.datadir / "reshard.log"

    def reshard() -> int:
        with open(log_path, "ab") as log:
            return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=60).returncode

    redirects_before = redirections(cluster)
    async with Traffic([one.address, two.address], initial, workers=6, starts=0.08,
                       races=RACES) as traffic:
        await traffic.hold(1.0)
        began = time.monotonic()
        returncode = await asyncio.to_thread(reshard)
        ended = time.monotonic()
        assert returncode == 0, f"reshard failed; see {log_path}"
        await traffic.hold(1.0)
    redirects = {name: count - redirects_before.get(name, 0)
                 for name, count in redirections(cluster).items()}
    result = await checked_outcome(pods, traffic, [one, two], initial)
    assert traffic.errors() == {}, traffic.errors()
    moved_tags = tag_slots & cluster.slots_of(target) & set(owned[:moved_slots])
    assert len(moved_tags) >= SHARDS_MOVED, "the shards' slots did not move"
    degraded = [await store_degraded(r.address) for r in (one, two)]
    assert not any(degraded)
    client = redis.RedisCluster(host="127.0.0.1", port=target.port, socket_timeout=5)
    try:
        assert not await asyncio.to_thread(missing_from_store, client, result.held)
    finally:
        client.close()
    during = [call for call in traffic.calls if began <= call.started <= ended]
    report(result.row(
        traffic,
        fault=f"Redis Cluster: {moved_slots} slots (with {len(moved_tags)} of the 64 shards) "
              f"resharded between masters by `cli --cluster reshard` mid-run; 2 routers",
        recovery="nothing to recover: the routers got "
                 + (", ".join(f"{n} {name}" for name, n in sorted(redirects.items()) if n)
                    or "no redirection")
                 + " (followed by the cluster client, TRYAGAIN retried inside the store); "
                 "routers never degraded; every entry on its new master",
        traffic_note=f"; {len(during)} calls during the {ended - began:.1f} s "
                     "of resharding, raced starts throughout",
    ))
