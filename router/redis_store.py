"""`RedisStore`: the `LocationStore` shared by router replicas, on standalone Redis, Redis
Cluster or a Sentinel-managed master (`router.redis_topology` parses which).

The store is a cache of the pods' truth (see `router.store`): losing it loses nothing, the pods'
WatchSessions feeds rebuild it. It must therefore never take routing down with it: every call has
a deadline, every backend failure surfaces as `StoreUnavailable`, and while Redis is away the store
says so (`degraded`) and fails fast instead of making each call wait for a dead server.

The store is composed of one module per concept (read them in this order):

`router.redis_layout`
    The key layout (one hash tag per shard, so every script runs on one slot), the value
    encoding and the Lua scripts.
`router.redis_connect`
    The client for each topology (standalone pool, cluster, sentinel-discovered master) and what
    its errors mean.
`router.redis_link`
    The one way to talk to Redis (deadline, retries, `StoreUnavailable`) and degraded mode: the
    supervised health loop, the per-shard markers, the resync after an outage or a flush.
`router.redis_pod_index`
    The per-pod walks over every shard's index (`pod_sessions`, `drop_pod_sessions`).
`router.redis_registry`
    The broadcast records and the drained pods.

Invariants (on top of those in `router.store`):
- Every write that depends on the current owner runs as one Lua script on one slot (registered
  with ``register_script()``: EVALSHA, reloaded on NOSCRIPT, e.g. on a freshly promoted replica):
  reserve = insert-if-absent returning the owner on conflict; delete and drop = compare-and-
  delete; release = compare-and-set on (pod, reserved, token); put = overwrite and move the
  index membership. Python never reads an owner and then
  writes based on it. Placement is therefore atomic on every topology.
- `put_many`, `pod_sessions` and `drop_pod_sessions` send one pipelined round trip per batch of
  `BATCH_SIZE` sessions (on a cluster: one per node, in parallel), never one per session.
- Values under the prefix that do not decode (corrupt, written by something else, wrong type) are
  treated as absent: `get` returns None and logs a rate-limited warning; reserve/put overwrite them.
- Connection errors, timeouts, authentication failures and cluster/sentinel outages (no master
  for a slot, CLUSTERDOWN, no master known to the sentinels) raise `StoreUnavailable` and flip
  `degraded` on, logging ONE warning per transition. Redirections (MOVED, ASK) are followed by
  the cluster client; TRYAGAIN and a cluster that is mid-failover are retried inside the call's
  deadline before they count as an outage. While degraded, calls fail fast without I/O (except
  `reserve`, which decides where a session lives: it still asks Redis, so a router whose health
  loop has not yet noticed Redis is back cannot place a start elsewhere than a recovered replica
  just reserved it); a background health loop (`start()`/`aclose()`; the supervised service
  `store_health:<prefix>` of the router's supervisor, or of the store's own) probes
  with backoff (PING, script load, every shard's marker: every master must answer) and, when it
  succeeds, clears `degraded`, logs one line and awaits `on_recovered` (the router resyncs its
  near-cache into Redis there). A cache hit never reaches this module: zero commands per hit.
- The password never appears in a log line or an exception message (`redact_url`).

Replication is asynchronous on every topology: a reservation acknowledged by a master that dies
before its replica copied it is gone after the failover (see docs/scaling.md for what a start
raced across that instant can still do).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from router.redis_connect import Client, connect
from router.redis_layout import (
    DEFAULT_INDEX_SHARDS,
    KeyLayout,
    LayoutMismatch,
    UndecodableLog,
    decode_location,
    encode_location,
    entry_key,
    index_key,
    shard_of,
    shard_tags,
)
from router.redis_link import RedisLink
from router.redis_pod_index import BATCH_SIZE, PodIndex
from router.redis_registry import Registry
from router.redis_topology import SCHEMES, URL_HELP, parse_url, redact_url, validate_url
from router.store import RESERVED, BroadcastRecord, Location, now_ms
from router.supervisor import Supervisor

__all__ = [
    "BATCH_SIZE",
    "DEFAULT_INDEX_SHARDS",
    "SCHEMES",
    "URL_HELP",
    "LayoutMismatch",
    "RedisStore",
    "decode_location",
    "encode_location",
    "entry_key",
    "index_key",
    "redact_url",
    "shard_of",
    "shard_tags",
    "validate_url",
]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _check_settings(prefix: str, positive: dict[str, float], pool_size: int) -> None:
    """ValueError naming the first setting a store cannot run with."""
    if not prefix:
        raise ValueError("Redis key prefix must not be empty")
    if prefix.startswith("macp:"):
        raise ValueError(f"Redis key prefix {prefix!r} is reserved for the MACP runtime")
    if "{" in prefix or "}" in prefix:
        raise ValueError(
            f"Redis key prefix {prefix!r} must not contain '{{' or '}}': the store's keys "
            "carry their own cluster hash tags"
        )
    for label, value in positive.items():
        if not value > 0:
            raise ValueError(f"{label} must be > 0, got {value!r}")
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size!r}")


class RedisStore:
    """`LocationStore` on Redis (see the module docstring for the parts and invariants)."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "mrouter:",
        password: str | None = None,
        retention_s: float = 600.0,
        reservation_ttl_s: float = 300.0,
        timeout_s: float = 0.5,
        pool_size: int = 32,
        health_interval_s: float = 1.0,
        required: bool = False,
        observe_latency: Callable[[str, float], None] | None = None,
        marker_interval_s: float = 5.0,
        index_shards: int = DEFAULT_INDEX_SHARDS,
        supervisor: Supervisor | None = None,
    ) -> None:
        target = parse_url(url)
        _check_settings(
            prefix,
            dict(
                retention_s=retention_s,
                reservation_ttl_s=reservation_ttl_s,
                timeout_s=timeout_s,
                health_interval_s=health_interval_s,
            ),
            pool_size,
        )
        self.url = redact_url(url)
        """The Redis URL without its password: safe to log and to show in readiness details."""
        self.topology = target.kind
        """"standalone", "cluster" or "sentinel"."""
        self.prefix = prefix
        self.index_shards = index_shards
        self.service = f"store_health:{prefix.rstrip(':') or prefix}"
        """The health loop's name in the supervisor (a crash is logged, counted, restarted)."""
        self._retention_ms = _ms(retention_s)
        self._reservation_ms = _ms(reservation_ttl_s)
        self._keys = KeyLayout(prefix, index_shards)
        self._link = RedisLink(
            url=self.url,
            topology=target.kind,
            connection=connect(url, target, password, timeout_s, pool_size),
            keys=self._keys,
            timeout_s=timeout_s,
            pool_size=pool_size,
            health_interval_s=health_interval_s,
            marker_interval_s=marker_interval_s,
            required=required,
            observe_latency=observe_latency,
            supervisor=supervisor,
            service=self.service,
        )
        self._undecodable = UndecodableLog(prefix)
        self._pods = PodIndex(self._link, self._keys)
        self._registry = Registry(self._link, self._keys, self._undecodable)

    def __repr__(self) -> str:
        return (
            f"RedisStore({self.url!r}, topology={self.topology!r}, prefix={self.prefix!r}, "
            f"degraded={self.degraded})"
        )

    async def __aenter__(self) -> RedisStore:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- lifecycle and health (`router.redis_link`) ---------------------------------------------

    @property
    def on_recovered(self) -> Callable[[], Awaitable[None]] | None:
        """Awaited after an outage or a flush (the router resyncs its near-cache there)."""
        return self._link.on_recovered

    @on_recovered.setter
    def on_recovered(self, callback: Callable[[], Awaitable[None]] | None) -> None:
        self._link.on_recovered = callback

    @property
    def degraded(self) -> bool:
        return self._link.degraded

    @property
    def degraded_reason(self) -> str:
        """Why the store is degraded ("" when it is not); for readiness details."""
        return self._link.degraded_reason if self._link.degraded else ""

    @property
    def outages(self) -> int:
        """Times the store went degraded (a state tests and the load test read)."""
        return self._link.outages

    @property
    def health_probes(self) -> int:
        """Probes the health loop has sent while degraded (a state tests can wait for)."""
        return self._link.health_probes

    @property
    def resyncs(self) -> int:
        """Times a flushed or replaced shard was noticed and resynced."""
        return self._link.resyncs

    async def start(self) -> None:
        """Connect, check Redis answers, load the scripts and start the health loop.

        Unreachable Redis: logs one line and comes up degraded (the health loop keeps trying),
        unless the store was built with ``required=True``: then raises `StoreUnavailable`.
        A prefix written with another key layout raises `LayoutMismatch` either way.
        """
        await self._link.start()

    async def aclose(self) -> None:
        """Stop the health loop and close every connection. Idempotent."""
        await self._link.aclose()

    # --- keys -----------------------------------------------------------------------------------

    def shard(self, sid: str) -> int:
        return self._keys.shard(sid)

    def entry_key(self, sid: str) -> str:
        """The key holding `sid`'s entry."""
        return self._keys.entry(sid)

    def index_key(self, pod: str, shard: int) -> str:
        """The key of `pod`'s index in `shard`."""
        return self._keys.index(pod, shard)

    def _ttl_ms_for(self, location: Location) -> int:
        if location.terminal:
            return self._retention_ms
        if location.state == RESERVED:
            return self._reservation_ms
        return 0

    def _put_call(self, sid: str, location: Location) -> tuple[AsyncScript, list[Any]]:
        value = encode_location(location)
        shard = self._keys.shard(sid)
        return (
            self._link.scripts.put,
            [
                2,
                self._keys.entry(sid, shard),
                self._keys.index(location.pod, shard),
                sid,
                location.pod,
                value,
                self._ttl_ms_for(location),
                self._keys.index_prefix(shard),
            ],
        )

    # --- LocationStore: entries -----------------------------------------------------------------

    async def get(self, sid: str) -> Location | None:
        key = self._keys.entry(sid)

        async def fn(client: Client) -> bytes | None:
            try:
                return await client.get(key)
            except ResponseError as exc:
                if str(exc).startswith("WRONGTYPE"):
                    return b""
                raise

        raw = await self._link.call("get", fn)
        if raw is None:
            return None
        location = decode_location(raw)
        if location is None:
            self._undecodable.warn(key)
        return location

    async def put(self, sid: str, location: Location) -> None:
        call = self._put_call(sid, location)
        await self._link.call("put", lambda client: self._link.run_scripts(client, [call]))

    async def put_many(self, items: Iterable[tuple[str, Location]]) -> None:
        batch: list[tuple[AsyncScript, list[Any]]] = []
        for sid, location in items:
            batch.append(self._put_call(sid, location))
            if len(batch) >= BATCH_SIZE:
                await self._put_batch(batch)
                batch = []
        if batch:
            await self._put_batch(batch)

    async def _put_batch(self, batch: list[tuple[AsyncScript, list[Any]]]) -> None:
        await self._link.call("put_many", lambda client: self._link.run_scripts(client, batch))

    async def reserve(self, sid: str, pod: str, token: str = "") -> str:
        link = self._link
        value = encode_location(Location(pod, RESERVED, token, now_ms()))
        keys = [self._keys.entry(sid), self._keys.index(pod, self._keys.shard(sid))]
        args = [sid, pod, value, self._reservation_ms]
        owner = await link.call(
            "reserve",
            lambda client: link.script(client, link.scripts.reserve, keys, args),
            even_degraded=True,
        )
        return owner.decode() if isinstance(owner, bytes) else str(owner)

    async def release(self, sid: str, pod: str, token: str = "") -> bool:
        link = self._link
        keys = [self._keys.entry(sid), self._keys.index(pod, self._keys.shard(sid))]
        released = await link.call(
            "release",
            lambda client: link.script(client, link.scripts.release, keys, [sid, pod, token]),
        )
        return bool(released)

    async def delete(self, sid: str, pod: str) -> bool:
        link = self._link
        keys = [self._keys.entry(sid), self._keys.index(pod, self._keys.shard(sid))]
        deleted = await link.call(
            "delete", lambda client: link.script(client, link.scripts.delete, keys, [sid, pod])
        )
        return bool(deleted)

    # --- LocationStore: per-pod walks (`router.redis_pod_index`) --------------------------------

    async def pod_sessions(self, pod: str) -> set[str]:
        return await self._pods.pod_sessions(pod)

    async def drop_pod_sessions(self, pod: str, keep: set[str]) -> int:
        return await self._pods.drop_pod_sessions(pod, keep)

    # --- LocationStore: registries (`router.redis_registry`) ------------------------------------

    async def record_broadcast(self, record: BroadcastRecord) -> None:
        await self._registry.record_broadcast(record)

    async def forget_broadcast(self, key: str) -> None:
        await self._registry.forget_broadcast(key)

    async def broadcasts(self) -> list[BroadcastRecord]:
        return await self._registry.broadcasts()

    async def set_draining(self, pod: str, draining: bool) -> None:
        await self._registry.set_draining(pod, draining)

    async def draining_pods(self) -> set[str]:
        return await self._registry.draining_pods()
