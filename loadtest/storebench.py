"""The `store` scenario: the location store on one Redis topology, measured.

    python -m loadtest run --scenario store --redis standalone|cluster|sentinel

What it measures (all on loopback, every phase bounded by --duration and per-call deadlines):

1. **placements/s** straight on `RedisStore.reserve` (fresh session ids, --concurrency callers in
   this process), with the Redis servers' CPU per placement (process CPU of every data node,
   replicas included) and the reservation script's own execution time (commandstats usec).
   `cluster` runs it on a 1-master and on a 3-master cluster (each master with one replica);
   `standalone` and `sentinel` on their one master. On a 2-core machine the Python caller
   saturates first: the servers' CPU per placement is the figure that carries over.
2. **Redis commands per hit, per start and per session lifecycle**, through a real router
   (`macp-router serve --redis-url ...`, 3 simulated pods), counted from `INFO commandstats` on
   every master (one kept connection each, so the counting adds nothing). A lifecycle is
   SessionStart, 3 Proposals and a Commitment (the session resolves; its entry then expires by
   TTL, which costs no command); then the same lifecycles with a second router watching the
   same pods (every router writes what its feeds report). Timer-driven commands (marker EXISTS
   every 5 s, drain-set SMEMBERS every 2 s, PINGs, a replica's REPLCONF ACK, the sentinels'
   hello PUBLISH) are listed apart and measured on an idle window of the same length.
   Last, sessions started and resolved directly on the pods: the router's CPU and the Redis
   commands per watch-feed event it applies (every router applies every pod's events).
3. **memory per session in Redis**: `used_memory` summed over the masters before/after
   `put_many` of 100,000 open sessions, 1,000 per pod name (the density of 1M sessions on 1,000
   pods; entry + index membership). (The router's own few hundred sessions are too few to read
   through `used_memory`'s noise: replication and client buffers move it by kilobytes.)

Counting is done on the masters only (a replica's commandstats are the replication stream).
"Commands per start / lifecycle" are the commands the router sent; the commands its scripts run
inside Redis (GET, SET, SADD, ...: also in commandstats) are reported beside them
(`..._with_script_internal`), and a new connection's handshake (HELLO, CLIENT SETNAME) apart.

The Redis processes come from tests/redis_fixture.py (the one launcher of the project: same
flags, same flavour choice, MACP_ROUTER_TEST_REDIS=redis-server|valkey|auto).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest import payloads
from loadtest.cluster import CALL_TIMEOUT_S, Client

if TYPE_CHECKING:
    from loadtest.scenarios import Run

TOPOLOGIES = ("standalone", "cluster", "sentinel")
TIMER_COMMANDS = ("exists", "ping", "smembers", "replconf", "publish")
# A new connection's handshake: counted apart (once per pooled connection, not per call).
HANDSHAKE_COMMANDS = ("hello", "client|setname", "client|setinfo", "select", "auth")
# What the store's scripts run inside Redis (counted by INFO commandstats too); the store never
# sends these itself on the paths measured here (drain SADD/SREM are admin calls).
SCRIPT_INTERNAL = ("set", "sadd", "srem", "del", "incr", "hset", "hdel", "hget", "zadd", "zrem",
                   "zrange")
LIFECYCLE_PROPOSALS = 3
MD = payloads.METADATA
T = CALL_TIMEOUT_S


def _log(msg: str) -> None:
    import sys

    print(f"== store: {msg}", file=sys.stderr, flush=True)


class Topology:
    """One started Redis topology: URL, data nodes (for counting), masters (for memory)."""

    def __init__(self, kind: str, masters: int, datadir: Path) -> None:
        try:
            from tests import redis_fixture
        except ImportError as exc:  # pragma: no cover - a checkout without the tests
            raise RuntimeError(
                f"the store scenario starts Redis with tests/redis_fixture.py ({exc}); run it "
                "from the repository root with the test extra installed"
            ) from exc
        self.kind = kind
        exe = redis_fixture.find_server_executable()
        self.executable = exe
        if kind == "cluster":
            self.servers: Any = redis_fixture.RedisClusterServers(exe, datadir, masters=masters)
        elif kind == "sentinel":
            self.servers = redis_fixture.RedisSentinelGroup(exe, datadir)
        else:
            self.servers = redis_fixture.RedisServer(exe, datadir, password=None)

    def start(self) -> Topology:
        self.servers.start()
        return self

    @property
    def url(self) -> str:
        return str(self.servers.url)

    def data_nodes(self) -> list[Any]:
        if self.kind == "cluster":
            return list(self.servers.live_nodes())
        if self.kind == "sentinel":
            return [s for s in self.servers.data if s.running]
        return [self.servers]

    def masters(self) -> list[Any]:
        if self.kind == "cluster":
            return list(self.servers.masters())
        if self.kind == "sentinel":
            return [self.servers.master()]
        return [self.servers]

    def counter(self) -> Any:
        """Commands on the masters (a replica's counts are the replication stream, not calls)."""
        from tests.redis_fixture import ClusterCommandCounter

        return ClusterCommandCounter([node.command_counter() for node in self.masters()])

    def used_memory(self) -> int:
        total = 0
        for node in self.masters():
            with node.client() as client:
                total += int(client.info("memory")["used_memory"])
        return total

    def evalsha_usec(self) -> tuple[int, int]:
        """(EVALSHA calls, their total server-side microseconds) summed over the masters."""
        calls = usec = 0
        for node in self.masters():
            with node.client() as client:
                stat = client.info("commandstats").get("cmdstat_evalsha", {})
                calls += int(stat.get("calls", 0))
                usec += int(stat.get("usec", 0))
        return calls, usec

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        nodes = self.data_nodes()
        for node in nodes:
            if node.process is not None:
                with contextlib.suppress(psutil.Error):
                    times = psutil.Process(node.process.pid).cpu_times()
                    total += times.user + times.system
        return total

    def stop(self) -> None:
        if self.kind == "standalone":
            self.servers.kill()
        else:
            self.servers.stop()


@contextlib.asynccontextmanager
async def topology(kind: str, masters: int, root: Path) -> AsyncIterator[Topology]:
    datadir = Path(tempfile.mkdtemp(prefix=f"store-{kind}-{masters}-", dir=root))
    started = time.perf_counter()
    topo = Topology(kind, masters, datadir)
    try:
        await asyncio.to_thread(topo.start)
        _log(f"{kind} ({masters} master(s)) up in {time.perf_counter() - started:.1f} s")
        yield topo
    finally:
        await asyncio.to_thread(topo.stop)


async def placements(topo: Topology, *, duration: float, concurrency: int) -> dict[str, Any]:
    """RedisStore.reserve on fresh sids for `duration` s with `concurrency` callers."""
    from router.redis_store import RedisStore

    store = RedisStore(topo.url, timeout_s=2.0, pool_size=max(32, concurrency))
    await store.start()
    if store.degraded:
        raise RuntimeError(f"store degraded at start: {store.degraded_reason}")
    pods = [f"pod-{i}" for i in range(16)]
    done = 0
    errors = 0
    cpu0 = await asyncio.to_thread(topo.cpu_seconds)
    evals0 = await asyncio.to_thread(topo.evalsha_usec)
    stop_at = time.perf_counter() + duration
    began = time.perf_counter()

    async def worker(index: int) -> None:
        nonlocal done, errors
        turn = index
        while time.perf_counter() < stop_at:
            try:
                await store.reserve(str(uuid.uuid4()), pods[turn % len(pods)])
                done += 1
            except Exception:
                errors += 1
            turn += 1

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        elapsed = time.perf_counter() - began
        cpu1 = await asyncio.to_thread(topo.cpu_seconds)
        evals1 = await asyncio.to_thread(topo.evalsha_usec)
        await store.aclose()
    calls = evals1[0] - evals0[0]
    return {
        "redis_usec_per_reserve_script": round((evals1[1] - evals0[1]) / max(1, calls), 2),
        "placements_per_s": round(done / elapsed, 1),
        "placements": done,
        "errors": errors,
        "redis_cpu_us_per_placement": round((cpu1 - cpu0) * 1e6 / max(1, done), 1),
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
    }


async def memory_per_session(topo: Topology, sessions: int) -> dict[str, Any]:
    """used_memory delta over the masters for `sessions` open entries, 1,000 per pod (the
    density of 1M sessions on 1,000 pods: each pod's index spreads over the 64 shards, so a
    sparser set-up pays a whole index key per session instead of a set member)."""
    from router.redis_store import RedisStore
    from router.store import OPEN, Location

    store = RedisStore(topo.url, timeout_s=10.0, prefix="mrouter:membench:")
    await store.start()
    try:
        before = await asyncio.to_thread(topo.used_memory)
        pods = max(1, sessions // 1000)
        items = [(str(uuid.uuid4()), Location(f"pod-{i % pods:04d}", OPEN, "inc-1", 1))
                 for i in range(sessions)]
        await store.put_many(items)
        after = await asyncio.to_thread(topo.used_memory)
    finally:
        await store.aclose()
    return {"sessions": sessions, "pods": pods,
            "bytes_per_session": round((after - before) / sessions, 1)}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _split(delta: dict[str, int]) -> tuple[int, dict[str, int]]:
    """(commands that are not timer-driven, the timer-driven ones)."""
    timers = {k: v for k, v in delta.items() if k in TIMER_COMMANDS}
    apart = {*TIMER_COMMANDS, *HANDSHAKE_COMMANDS}
    return sum(v for k, v in delta.items() if k not in apart), timers


def _client_commands(delta: dict[str, int]) -> int:
    """Commands the router sent (round-trip commands), script-internal ones left out: every
    script here reads its entry with one GET, so direct GETs are GETs minus EVALSHAs."""
    scripts = delta.get("evalsha", 0) + delta.get("eval", 0)
    gets = max(0, delta.get("get", 0) - scripts)
    skip = {*SCRIPT_INTERNAL, *TIMER_COMMANDS, *HANDSHAKE_COMMANDS, "get", "evalsha", "eval"}
    return scripts + gets + sum(v for k, v in delta.items() if k not in skip)


async def _settled(counter: Any, quiet_s: float = 1.0, timeout: float = 30.0) -> dict[str, int]:
    """Commands so far, once no non-timer command has run for `quiet_s` (write-behind done)."""
    deadline = time.perf_counter() + timeout
    last = await asyncio.to_thread(counter.sample)
    last_change = time.perf_counter()
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.1)
        now = await asyncio.to_thread(counter.sample)
        if _split(_delta(last, now))[0]:
            last, last_change = now, time.perf_counter()
        elif time.perf_counter() - last_change >= quiet_s:
            return now
    return last


async def _lifecycles(client: Client, sids: list[str]) -> None:
    """One session life per sid through the router: SessionStart, the proposals, a Commitment
    that resolves it (the entry then expires by TTL)."""
    for sid in sids:
        steps = [payloads.send_start(sid)]
        steps += [payloads.send_proposal(sid) for _ in range(LIFECYCLE_PROPOSALS)]
        steps.append(payloads.send_commitment(sid))
        for request in steps:
            err = payloads.ack_error(await client.send(request, metadata=MD, timeout=T))
            if err:
                raise RuntimeError(f"lifecycle step failed through the router: {err}")


async def _sends(client: Client, requests: list[bytes], concurrency: int) -> int:
    queue = list(reversed(requests))
    failures = 0

    async def worker() -> None:
        nonlocal failures
        while queue:
            request = queue.pop()
            if payloads.ack_error(await client.send(request, metadata=MD, timeout=T)):
                failures += 1

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(requests))))))
    return failures


async def router_counts(run: Run, topo: Topology, *, starts: int, hits: int,
                        lifecycles: int, feed_sessions: int) -> dict[str, Any]:
    """Commands per start / hit / lifecycle through a real router on `topo`."""
    cluster = run.cluster
    pods = await cluster.start_pods(3, prefix=f"store-{topo.kind}-pod", state=False)
    await asyncio.gather(*(p.client.ready() for p in pods if p.client is not None))
    router = await cluster.start_router(pods, redis_url=topo.url, name=f"router-{topo.kind}")
    assert router.client is not None
    await router.client.ready()
    client = router.client
    out: dict[str, Any] = {}
    counter = await asyncio.to_thread(topo.counter)
    try:
        base = await _settled(counter)
        sids = [payloads.new_id() for _ in range(starts)]
        failed = await _sends(client, [payloads.send_start(s) for s in sids], 16)
        after_starts = await _settled(counter)
        delta = _delta(base, after_starts)
        work, _timers = _split(delta)
        out["per_start"] = round(_client_commands(delta) / starts, 3)
        out["per_start_with_script_internal"] = round(work / starts, 3)
        out["start_commands"] = delta
        out["start_failures"] = failed

        # hits: one fixed Proposal per session, re-sent (duplicates are full routed calls)
        requests = [payloads.send_proposal(s, payloads.new_id()) for s in sids]
        await _sends(client, requests, 16)  # first delivery: every later send is a hit
        before = await _settled(counter)
        began = time.perf_counter()
        batch = (requests * (hits // len(requests) + 1))[:hits]
        await _sends(client, batch, 32)
        window = time.perf_counter() - began
        after_hits = await asyncio.to_thread(counter.sample)
        work, timers = _split(_delta(before, after_hits))
        await asyncio.sleep(window)  # an idle window as long as the hits took
        idle = _split(_delta(after_hits, await asyncio.to_thread(counter.sample)))[1]
        out["per_hit"] = round(work / hits, 6)
        out["hit_window_s"] = round(window, 2)
        out["hits"] = hits
        out["hit_window_timer_commands"] = timers
        out["idle_window_timer_commands"] = idle

        # lifecycles: start, proposals, commitment (resolved; the entry then expires by TTL)
        life = [payloads.new_id() for _ in range(lifecycles)]
        before = await _settled(counter)
        await _lifecycles(client, life)
        after = await _settled(counter)
        delta = _delta(before, after)
        work, _timers = _split(delta)
        out["per_lifecycle"] = round(_client_commands(delta) / lifecycles, 3)
        out["per_lifecycle_with_script_internal"] = round(work / lifecycles, 3)
        out["lifecycle_commands"] = delta
        out["lifecycle"] = f"SessionStart + {LIFECYCLE_PROPOSALS} Proposals + Commitment"

        # The same lifecycles with a second router watching the same pods: every router writes
        # what its feeds report, so each extra router adds its own writes per lifecycle.
        second = await cluster.start_router(pods, redis_url=topo.url,
                                            name=f"router-{topo.kind}-2")
        assert second.client is not None
        await second.client.ready()
        life = [payloads.new_id() for _ in range(lifecycles)]
        before = await _settled(counter, quiet_s=2.0)
        await _lifecycles(client, life)
        after = await _settled(counter, quiet_s=2.0)
        delta = _delta(before, after)
        out["per_lifecycle_2_routers"] = round(_client_commands(delta) / lifecycles, 3)
        out["lifecycle_2_routers_commands"] = delta
        await cluster.stop_router(second)

        # Feed events: sessions started and resolved directly on the pods (not through the
        # router); the router only learns them from its watch feeds and writes them behind.
        await _settled(counter)
        from loadtest.cluster import metric_sum

        idle0, idle_t0 = router.proc.cpu_seconds(), time.perf_counter()
        await asyncio.sleep(2.0)  # the router's own idle CPU (health loops, feeds), subtracted
        idle_rate = (router.proc.cpu_seconds() - idle0) / (time.perf_counter() - idle_t0)
        m0 = await router.metrics()
        cpu0, t0 = router.proc.cpu_seconds(), time.perf_counter()
        before = await asyncio.to_thread(counter.sample)
        await run.create_sessions([pods[i % len(pods)] for i in range(feed_sessions)],
                                  resolve=True)
        events0 = metric_sum(m0, "macp_router_watch_events_total")
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            m1 = await router.metrics()
            if metric_sum(m1, "macp_router_watch_events_total") - events0 >= 2 * feed_sessions:
                break
            await asyncio.sleep(0.1)
        after = await _settled(counter)
        cpu1, t1 = router.proc.cpu_seconds(), time.perf_counter()
        events = metric_sum(m1, "macp_router_watch_events_total") - events0
        delta = _delta(before, after)
        busy = max(0.0, (cpu1 - cpu0) - idle_rate * (t1 - t0))
        out["feed_events"] = int(events)
        out["router_idle_cpu_cores"] = round(idle_rate, 4)
        out["router_cpu_us_per_feed_event"] = round(busy * 1e6 / max(1, events), 1)
        out["commands_per_feed_event"] = round(_client_commands(delta) / max(1, events), 3)
    finally:
        await asyncio.to_thread(counter.close)
        await cluster.stop_router(router)
        for pod in pods:
            await cluster.procs.stop(pod.proc)
    return out


async def run_store_scenario(run: Run) -> dict[str, Any]:
    s = run.settings
    kind = s.store_topology or "standalone"
    root = Path(s.out) / "store-redis"
    root.mkdir(parents=True, exist_ok=True)
    quick = s.quick
    duration = s.duration
    summary: dict[str, Any] = {"topology": kind}
    mastersets = (1, 3) if kind == "cluster" else (1,)
    for masters in mastersets:
        async with topology(kind, masters, root) as topo:
            summary.setdefault("server", topo.executable)
            label = f"{masters}_master" + ("s" if masters > 1 else "")
            result = await placements(topo, duration=duration, concurrency=s.concurrency)
            summary[f"placements_{label}"] = result
            _log(f"{label}: {result['placements_per_s']}/s, "
                 f"{result['redis_cpu_us_per_placement']} us Redis CPU per placement")
            if masters == mastersets[-1]:
                summary["memory"] = await memory_per_session(topo, 2_000 if quick else 100_000)
                summary["router"] = await router_counts(
                    run, topo, starts=40 if quick else 200, hits=400 if quick else 5_000,
                    lifecycles=10 if quick else 100, feed_sessions=50 if quick else 1000)
    first: Callable[[str], Any] = lambda key: summary.get(key, {}).get("placements_per_s")  # noqa: E731
    if kind == "cluster" and first("placements_1_master") and first("placements_3_masters"):
        summary["placements_ratio_3_vs_1"] = round(
            first("placements_3_masters") / first("placements_1_master"), 3)
    summary["redis_commands_per_hit"] = summary["router"]["per_hit"]
    summary["redis_commands_per_start"] = summary["router"]["per_start"]
    summary["redis_commands_per_lifecycle"] = summary["router"]["per_lifecycle"]
    summary["redis_commands_per_lifecycle_2_routers"] = summary["router"].get(
        "per_lifecycle_2_routers")
    summary["redis_bytes_per_session"] = summary["memory"]["bytes_per_session"]
    summary["router_cpu_us_per_feed_event"] = summary["router"].get("router_cpu_us_per_feed_event")
    return summary
