"""`RedisStore`: the `LocationStore` shared by router replicas, on standalone Redis, Redis
Cluster or a Sentinel-managed master (`router.redis_topology` parses which).

The store is a cache of the pods' truth (see `router.store`): losing it loses nothing, the pods'
WatchSessions feeds rebuild it. It must therefore never take routing down with it: every call has
a deadline, every backend failure surfaces as `StoreUnavailable`, and while Redis is away the store
says so (`degraded`) and fails fast instead of making each call wait for a dead server.

Key layout, the same on all three topologies (``P`` is the prefix, ``mrouter:`` by default; never
``macp:``, which the runtime owns). Sessions are split into `index_shards` shards (64 by default)
by ``crc32(sid) mod shards``; each shard has a hash tag ``{T}`` (`shard_tags`: short numbers whose
cluster slots are spread evenly over the 16384 slots, so any contiguous slot split among masters
gets an even share of the shards). Every key one script touches carries the same tag, so every
script runs on one slot (no CROSSSLOT on a cluster), and the per-pod index is spread over the
cluster instead of sitting on one node:

``P{T}:s:<sid>``  (string)
    One entry per session, packed as ``1␟<pod>␟<state>␟<incarnation>␟<updated_at_ms>`` (``␟`` is
    the ASCII unit separator 0x1f; ``1`` is the format version). The pod comes first so Lua can
    read the owner with one pattern match. TTL: terminal states -> ``retention_s``; ``reserved``
    -> ``reservation_ttl_s``; ``open``/``suspended`` -> none.
``P{T}:pod:<pod>``  (set of sids)
    The per-pod index of one shard: a pod's entries are listed, reconciled or dropped by walking
    the shards (one pipelined round trip per batch; a cluster client sends each node its part in
    parallel). Members whose entry expired (or was since taken by another pod) may linger here;
    readers filter by owner and clean them lazily, so `pod_sessions` never lies.
``P{T}:marker``  (string ``2/<shards>``)
    One per shard, written at start and after every recovery, checked every `marker_interval_s`
    while healthy. A missing one means that shard's node was flushed or replaced (on a cluster:
    one master and its replicas lost their data), and the router resyncs its near-cache. The
    value names the layout; a store finding another layout's marker refuses to start.
``P{bc}:data``  (hash key -> ``<method>\\n<request bytes>``)
``P{bc}:order``  (sorted set key -> sequence number) and ``P{bc}:seq`` (counter)
    The broadcast registry (one slot): replay order is registration order; registering a key
    again moves it last (the newest registration of a key is the one that must win on replay).
``P drain``  (set of pod names)
    Pods drained by an operator: no new placements on them, from any router sharing the store.

Invariants (on top of those in `router.store`):
- Every write that depends on the current owner runs as one Lua script on one slot (registered
  with ``register_script()``: EVALSHA, reloaded on NOSCRIPT, e.g. on a freshly promoted replica):
  reserve = insert-if-absent returning the owner on conflict; delete and drop = compare-and-
  delete; put = overwrite and move the index membership. Python never reads an owner and then
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

import asyncio
import contextlib
import functools
import logging
import random
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url as parse_redis_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ClusterError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.aio import wait_event
from router.redis_topology import (
    CLUSTER,
    SCHEMES,
    SENTINEL,
    URL_HELP,
    RedisTarget,
    parse_url,
    redact_url,
    validate_url,
)
from router.store import (
    RESERVED,
    STATES,
    BroadcastRecord,
    Location,
    StoreUnavailable,
    now_ms,
)
from router.supervisor import Supervisor

__all__ = [
    "BATCH_SIZE",
    "DEFAULT_INDEX_SHARDS",
    "SCHEMES",
    "URL_HELP",
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

log = logging.getLogger(__name__)

T = TypeVar("T")

BATCH_SIZE = 500
"""Sessions per pipelined round trip in `put_many`, `pod_sessions` and `drop_pod_sessions`."""

DEFAULT_INDEX_SHARDS = 64
"""Shards of the key space (hash tags). Part of the layout: every router sharing a store must
use the same count (the per-shard marker records it). 64 spreads evenly over up to 64 masters."""

LAYOUT_VERSION = "2"

FORMAT_VERSION = b"1"
SEP = b"\x1f"
_SEP_STR = "\x1f"

_CORRUPT_WARN_INTERVAL_S = 10.0
_MAX_BACKOFF_FACTOR = 8.0
_TRANSIENT_RETRY_S = 0.05

# Errors that mean "Redis is not reachable / not usable right now": they flip `degraded`.
# (redis AuthenticationError, AuthorizationError, BusyLoadingError, MasterNotFoundError and
# MaxConnectionsError are ConnectionErrors; builtin TimeoutError is what asyncio.timeout raises;
# OSError covers raw socket failures; ClusterError covers CLUSTERDOWN and a redirection loop;
# RedisClusterException covers "no node of the cluster answers" and uncovered slots; a
# ReadOnlyError is a demoted master still answering.)
_UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    TimeoutError,
    OSError,
    ClusterError,
    RedisClusterException,
    ReadOnlyError,
    TryAgainError,
)
# Cluster states that heal by themselves within moments (a slot mid-migration, a failover being
# voted): retried inside the call's deadline before they count as an outage.
_TRANSIENT = (TryAgainError, ClusterError)


# --- key layout ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def shard_tags(count: int) -> tuple[str, ...]:
    """The hash tag of each of `count` shards: the first decimal numbers whose cluster slot falls
    in that shard's 1/count of the slot space (deterministic: every router computes the same)."""
    if not 1 <= count <= REDIS_CLUSTER_HASH_SLOTS:
        raise ValueError(f"index_shards must be in 1..{REDIS_CLUSTER_HASH_SLOTS}, got {count!r}")
    tags: list[str | None] = [None] * count
    missing = count
    candidate = 0
    while missing:
        text = str(candidate)
        shard = key_slot(text.encode()) * count // REDIS_CLUSTER_HASH_SLOTS
        if tags[shard] is None:
            tags[shard] = text
            missing -= 1
        candidate += 1
    return tuple(tag for tag in tags if tag is not None)


def shard_of(sid: str, count: int) -> int:
    """The shard a session id belongs to."""
    return zlib.crc32(sid.encode()) % count


def entry_key(sid: str, *, prefix: str = "mrouter:", shards: int = DEFAULT_INDEX_SHARDS) -> str:
    """The key of `sid`'s entry (for tools and tests; the store computes its own)."""
    return f"{prefix}{{{shard_tags(shards)[shard_of(sid, shards)]}}}:s:{sid}"


def index_key(
    pod: str, sid: str, *, prefix: str = "mrouter:", shards: int = DEFAULT_INDEX_SHARDS
) -> str:
    """The index key of `pod` in the shard of `sid` (for tools and tests)."""
    return f"{prefix}{{{shard_tags(shards)[shard_of(sid, shards)]}}}:pod:{pod}"


# --- value encoding ---------------------------------------------------------------------------


def _check_field(name: str, value: str) -> None:
    if _SEP_STR in value:
        raise ValueError(f"{name} {value!r} contains the reserved separator 0x1f")


def encode_location(location: Location) -> bytes:
    """Pack a Location for ``P s:<sid>`` (pod first: Lua reads the owner by prefix match)."""
    if not location.pod:
        raise ValueError("location has an empty pod name")
    if location.state not in STATES:
        raise ValueError(f"unknown session state {location.state!r}; expected one of {STATES}")
    _check_field("pod", location.pod)
    _check_field("incarnation", location.incarnation)
    return SEP.join(
        (
            FORMAT_VERSION,
            location.pod.encode(),
            location.state.encode(),
            location.incarnation.encode(),
            str(int(location.updated_at_ms)).encode(),
        )
    )


def decode_location(raw: bytes) -> Location | None:
    """The Location packed in `raw`, or None when it is not one of ours (corrupt or foreign)."""
    parts = raw.split(SEP)
    if len(parts) != 5 or parts[0] != FORMAT_VERSION or not parts[1]:
        return None
    digits = parts[4][1:] if parts[4].startswith(b"-") else parts[4]
    if not digits.isdigit():  # bytes.isdigit is ASCII-only, like Lua's %d in owner_of
        return None
    try:
        pod, state, incarnation = (p.decode() for p in parts[1:4])
        updated_at_ms = int(parts[4])
    except (UnicodeDecodeError, ValueError):
        return None
    if state not in STATES:
        return None
    return Location(pod, state, incarnation, updated_at_ms)


def _encode_broadcast(record: BroadcastRecord) -> bytes:
    if "\n" in record.method or not record.method:
        raise ValueError(f"broadcast method {record.method!r} must be non-empty, without newline")
    return record.method.encode() + b"\n" + bytes(record.request)


def _decode_broadcast(key: bytes, raw: bytes) -> BroadcastRecord | None:
    method, newline, request = raw.partition(b"\n")
    if not newline or not method:
        return None
    try:
        return BroadcastRecord(key.decode(), method.decode(), request)
    except UnicodeDecodeError:
        return None


# --- Lua ----------------------------------------------------------------------------------------

# owner_of(key): nil when absent, false when the value is not ours (corrupt, foreign, wrong
# type: the same values `decode_location` rejects), else the owning pod. redis.pcall keeps a
# WRONGTYPE key from aborting the script.
_LUA_PRELUDE = (
    "local STATES = {"
    + ", ".join(f"['{state}'] = true" for state in sorted(STATES))
    + "}\n"
    + r"""
local function owner_of(key)
  local raw = redis.pcall('GET', key)
  if not raw then return nil end
  if type(raw) ~= 'string' then return false end
  local pod, state = string.match(raw, '^1\031([^\031]+)\031([^\031]*)\031[^\031]*\031%-?%d+$')
  if pod and STATES[state] then return pod end
  return false
end
"""
)

# KEYS: entry, index(shard, pod)  ARGV: sid, pod, packed value, ttl_ms
# Insert-if-absent; returns the owner (the caller's pod when it won).
_LUA_RESERVE = (
    _LUA_PRELUDE
    + r"""
local owner = owner_of(KEYS[1])
if owner then return owner end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
return ARGV[2]
"""
)

# KEYS: entry, index(shard, new pod)  ARGV: sid, pod, packed value, ttl_ms (0 = none),
# the shard's index prefix (the old owner's index is in the same shard, hence the same slot).
# Overwrite; move the index membership when the owner changes.
_LUA_PUT = (
    _LUA_PRELUDE
    + r"""
local old = owner_of(KEYS[1])
if old and old ~= ARGV[2] then redis.call('SREM', ARGV[5] .. old, ARGV[1]) end
if tonumber(ARGV[4]) > 0 then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[3])
end
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
)

# KEYS: entry, index(shard, pod)  ARGV: sid, pod
# Compare-and-delete; the sid leaves pod's index either way (if pod does not own it, the index
# entry was stale).
_LUA_DELETE = (
    _LUA_PRELUDE
    + r"""
local deleted = 0
if owner_of(KEYS[1]) == ARGV[2] then
  redis.call('DEL', KEYS[1])
  deleted = 1
end
redis.call('SREM', KEYS[2], ARGV[1])
return deleted
"""
)

# KEYS: index(shard, pod), entry(sid 1), entry(sid 2), ...  ARGV: pod, delete (1/0), sid 1, ...
# For each sid: when delete=1, compare-and-delete the entry; drop the sid from pod's index when it
# was deleted or pod no longer owns it. Returns the number of entries deleted (delete=1) or of
# stale index members removed (delete=0, the lazy clean-up behind pod_sessions).
_LUA_DROP = (
    _LUA_PRELUDE
    + r"""
local count = 0
local delete = ARGV[2] == '1'
for i = 2, #KEYS do
  local sid = ARGV[i + 1]
  local owner = owner_of(KEYS[i])
  if owner == ARGV[1] then
    if delete then
      redis.call('DEL', KEYS[i])
      redis.call('SREM', KEYS[1], sid)
      count = count + 1
    end
  else
    redis.call('SREM', KEYS[1], sid)
    if not delete then count = count + 1 end
  end
end
return count
"""
)

# KEYS: data, order, seq  ARGV: key, payload
_LUA_RECORD_BROADCAST = r"""
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
return seq
"""

# KEYS: data, order  ARGV: key
_LUA_FORGET_BROADCAST = r"""
redis.call('HDEL', KEYS[1], ARGV[1])
return redis.call('ZREM', KEYS[2], ARGV[1])
"""

# KEYS: data, order  -> flat [key, payload, key, payload, ...] in order
_LUA_LIST_BROADCASTS = r"""
local out = {}
for _, key in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local payload = redis.call('HGET', KEYS[1], key)
  if payload then
    out[#out + 1] = key
    out[#out + 1] = payload
  end
end
return out
"""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, AuthenticationError | AuthorizationError):
        return f"authentication failed ({exc}); check the password / ACL user"
    if isinstance(exc, BusyLoadingError):
        return "Redis is loading its dataset"
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return "no answer before the deadline"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, MasterNotFoundError):
        # redis-py appends the repr of every sentinel client: keep the sentence only.
        return (
            f"{text.split(' : ', 1)[0]} (no sentinel reachable, or none knows a healthy master); "
            "check the sentinels' addresses and the master name"
        )
    return text


class LayoutMismatch(StoreUnavailable):
    """Another router wrote this prefix with a different key layout (version or shard count)."""


Client = Redis | RedisCluster


class RedisStore:
    """`LocationStore` on Redis (see the module docstring for the key layout and invariants)."""

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
        if not prefix:
            raise ValueError("Redis key prefix must not be empty")
        if prefix.startswith("macp:"):
            raise ValueError(f"Redis key prefix {prefix!r} is reserved for the MACP runtime")
        if "{" in prefix or "}" in prefix:
            raise ValueError(
                f"Redis key prefix {prefix!r} must not contain '{{' or '}}': the store's keys "
                "carry their own cluster hash tags"
            )
        for label, value in (
            ("retention_s", retention_s),
            ("reservation_ttl_s", reservation_ttl_s),
            ("timeout_s", timeout_s),
            ("health_interval_s", health_interval_s),
        ):
            if not value > 0:
                raise ValueError(f"{label} must be > 0, got {value!r}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size!r}")

        self.url = redact_url(url)
        """The Redis URL without its password: safe to log and to show in readiness details."""
        self.topology = target.kind
        """"standalone", "cluster" or "sentinel"."""
        self.prefix = prefix
        self.on_recovered: Callable[[], Awaitable[None]] | None = None
        self._retention_ms = _ms(retention_s)
        self._reservation_ms = _ms(reservation_ttl_s)
        self._timeout_s = timeout_s
        self._health_interval_s = health_interval_s
        self._marker_interval_s = marker_interval_s
        self.resyncs = 0
        self._required = required
        self._observe_latency = observe_latency

        self.index_shards = index_shards
        self._tags = shard_tags(index_shards)
        self._layout = f"{LAYOUT_VERSION}/{index_shards}".encode()
        self._shard_prefixes = tuple(f"{prefix}{{{tag}}}:" for tag in self._tags)
        self._markers = tuple(p + "marker" for p in self._shard_prefixes)
        self._bc_data = prefix + "{bc}:data"
        self._bc_order = prefix + "{bc}:order"
        self._bc_seq = prefix + "{bc}:seq"
        self._drain_key = prefix + "drain"

        self._sentinel: Sentinel | None = None
        self._pool: BlockingConnectionPool | None = None
        self._client: Client = self._connect(url, target, password, timeout_s, pool_size)
        # Bounds concurrent calls where the client's own pool does not (cluster nodes and the
        # sentinel pool fail instead of waiting when their connection limit is reached).
        self._slots = asyncio.Semaphore(pool_size)
        self._reserve_script = self._client.register_script(_LUA_RESERVE)
        self._put_script = self._client.register_script(_LUA_PUT)
        self._delete_script = self._client.register_script(_LUA_DELETE)
        self._drop_script = self._client.register_script(_LUA_DROP)
        self._record_bc_script = self._client.register_script(_LUA_RECORD_BROADCAST)
        self._forget_bc_script = self._client.register_script(_LUA_FORGET_BROADCAST)
        self._list_bc_script = self._client.register_script(_LUA_LIST_BROADCASTS)

        self._degraded = False
        self._degraded_reason = ""
        self._degraded_since = 0.0
        self._degraded_event = asyncio.Event()
        self._own_supervisor = supervisor is None
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self.service = f"store_health:{prefix.rstrip(':') or prefix}"
        """The health loop's name in the supervisor (a crash is logged, counted, restarted)."""
        self.health_probes = 0
        """Probes the health loop has sent while degraded (a state tests can wait for)."""
        self.outages = 0
        """Times the store went degraded (a state tests and the load test read)."""
        self._started = False
        self._closed = False
        self._corrupt_last_warn = -_CORRUPT_WARN_INTERVAL_S
        self._corrupt_suppressed = 0

    def _connect(
        self, url: str, target: RedisTarget, password: str | None, timeout_s: float,
        pool_size: int,
    ) -> Client:
        secret = password if password is not None else target.password
        common: dict[str, Any] = dict(
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=False,
            client_name="macp-router",
        )
        if target.kind == CLUSTER:
            # The cluster client re-learns the slot map after a connection error and retries;
            # the store's deadline bounds the whole call anyway.
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                username=target.username,
                password=secret,
                ssl=target.tls,
                max_connections=pool_size + 8,
                retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.1), 2),
                **common,
            )
        # One quick retry on a connection error heals a pooled connection that the server closed
        # (restart, idle timeout); timeouts are not retried: the deadline is the deadline.
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        if target.kind == SENTINEL:
            self._sentinel = Sentinel(
                list(target.nodes),
                # No retries inside a sentinel query: the next sentinel is the retry, and the
                # store's deadline bounds the whole discovery.
                sentinel_kwargs=dict(
                    retry=Retry(NoBackoff(), 0),
                    socket_timeout=timeout_s,
                    socket_connect_timeout=timeout_s,
                    username=target.sentinel_username,
                    password=target.sentinel_password,
                    ssl=target.tls,
                ),
            )
            return self._sentinel.master_for(
                target.master,
                db=target.db,
                username=target.username,
                password=secret,
                ssl=target.tls,
                retry=retry,
                **common,
            )
        kwargs: dict[str, Any] = dict(parse_redis_url(url))
        if password is not None:
            kwargs["password"] = password
        kwargs.update(common, retry=retry)
        self._pool = BlockingConnectionPool(max_connections=pool_size, timeout=timeout_s, **kwargs)
        return Redis.from_pool(self._pool)

    def __repr__(self) -> str:
        return (
            f"RedisStore({self.url!r}, topology={self.topology!r}, prefix={self.prefix!r}, "
            f"degraded={self._degraded})"
        )

    async def __aenter__(self) -> RedisStore:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        return self._degraded

    @property
    def degraded_reason(self) -> str:
        """Why the store is degraded ("" when it is not); for readiness details."""
        return self._degraded_reason if self._degraded else ""

    async def start(self) -> None:
        """Connect, check Redis answers, load the scripts and start the health loop.

        Unreachable Redis: logs one line and comes up degraded (the health loop keeps trying),
        unless the store was built with ``required=True``: then raises `StoreUnavailable`.
        A prefix written with another key layout raises `LayoutMismatch` either way.
        """
        if self._closed:
            raise StoreUnavailable(f"redis store {self.url} is closed; create a new one")
        if self._started:
            return
        try:
            await self._probe()
        except LayoutMismatch:
            await self._close_client()
            raise
        except (*_UNAVAILABLE, RedisError) as exc:
            reason = _describe_error(exc)
            if self._required:
                await self._close_client()
                raise StoreUnavailable(
                    f"redis store required but unavailable at {self.url}: {reason}; "
                    "start Redis or fix the URL/password, or run without --redis-url"
                ) from None
            log.warning(
                "redis store unavailable at %s: %s; routing continues without it and the store "
                "reconnects in the background",
                self.url,
                reason,
            )
            self._enter_degraded(reason, quiet=True)
        self._started = True
        self._supervisor.spawn(self.service, self._health_loop)

    async def aclose(self) -> None:
        """Stop the health loop and close every connection. Idempotent."""
        if self._own_supervisor:
            await self._supervisor.aclose()
        else:
            await self._supervisor.stop(self.service)
        await self._close_client()

    async def _close_client(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._client.aclose()
        if self._sentinel is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._sentinel.aclose()

    async def _probe(self) -> None:
        """PING, load the scripts and write every shard's marker, under the deadline; raises the
        client's errors. Every master must answer: a cluster with a shard down stays degraded."""
        async with asyncio.timeout(self._timeout_s * 2):
            await self._client.ping()
            for script in self._scripts():
                script.sha = await self._client.script_load(script.script)
            await self._write_markers()

    async def _write_markers(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key in self._markers:
            pipe.set(key, self._layout, nx=True)
        for key in self._markers:
            pipe.get(key)
        results = await pipe.execute()
        found = {value for value in results[len(self._markers) :] if value != self._layout}
        if found:
            raise LayoutMismatch(
                f"redis store at {self.url}: prefix {self.prefix!r} holds another key layout "
                f"({sorted(v.decode(errors='replace') for v in found if v)}, this router writes "
                f"{self._layout.decode()}); give this router another --redis-prefix or stop the "
                "routers of the other layout"
            )

    def _scripts(self) -> Sequence[AsyncScript]:
        return (
            self._reserve_script,
            self._put_script,
            self._delete_script,
            self._drop_script,
            self._record_bc_script,
            self._forget_bc_script,
            self._list_bc_script,
        )

    def _enter_degraded(self, reason: str, *, quiet: bool = False) -> None:
        if self._degraded:
            return
        self._degraded = True
        self.outages += 1
        self._degraded_reason = reason
        self._degraded_since = time.monotonic()
        self._degraded_event.set()
        if not quiet:
            log.warning(
                "redis store degraded: %s at %s; routing continues without it and the store "
                "reconnects in the background",
                reason,
                self.url,
            )

    async def _health_loop(self) -> None:
        """While degraded: probe with capped, jittered backoff; on success recover and resync."""
        max_delay = self._health_interval_s * _MAX_BACKOFF_FACTOR
        while True:
            if not await wait_event(self._degraded_event, self._marker_interval_s):
                await self._check_marker()
                continue
            delay = self._health_interval_s
            while self._degraded:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                self.health_probes += 1
                try:
                    await self._probe()
                except (*_UNAVAILABLE, RedisError) as exc:
                    self._degraded_reason = _describe_error(exc)
                    delay = min(delay * 2, max_delay)
                    if self.topology == CLUSTER:
                        # Forget the slot map: the next probe asks the seeds afresh.
                        with contextlib.suppress(RedisError, OSError):
                            await self._client.aclose()
                    continue
                except Exception:
                    # Never let a surprise end the loop: the store would stay degraded forever.
                    log.warning("redis store health probe failed unexpectedly", exc_info=True)
                    delay = min(delay * 2, max_delay)
                    continue
                await self._recover()

    async def _check_marker(self) -> None:
        """A healthy Redis that lost a shard's marker was flushed or replaced: resync it.

        Without this a quick restart or a FLUSHALL between two calls (or, on a cluster, a master
        and its replicas all replaced) would go unnoticed (the pool reconnects silently) and the
        store would stay empty until the feeds rewrote it.
        """
        markers = self._markers

        async def present(client: Client) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for key in markers:
                pipe.exists(key)
            return await pipe.execute()

        try:
            found = await self._call("exists", present)
            if all(found):
                return
            await self._call("set", lambda client: self._write_markers())
        except LayoutMismatch as exc:
            log.error("%s", exc)
            return
        except StoreUnavailable:
            return  # _call flipped `degraded`; the loop's recovery path takes over
        lost = sum(1 for value in found if not value)
        log.warning(
            "redis store at %s lost its data (%d of %d shards flushed or replaced); resyncing",
            self.url,
            lost,
            len(markers),
        )
        self.resyncs += 1
        callback = self.on_recovered
        if callback is not None:
            try:
                await callback()
            except Exception:
                log.warning("redis store resync after a flush failed", exc_info=True)

    async def _reset_connections(self) -> None:
        """Drop idle connections opened before an outage (they are dead) rather than let each
        fail once; a cluster client also forgets its slot map and asks the seeds again."""
        with contextlib.suppress(RedisError, OSError):
            if isinstance(self._client, RedisCluster):
                await self._client.aclose()
            else:
                await self._client.connection_pool.disconnect(inuse_connections=False)

    async def _recover(self) -> None:
        await self._reset_connections()
        outage_s = time.monotonic() - self._degraded_since
        self._degraded = False
        self._degraded_reason = ""
        self._degraded_event.clear()
        log.info("redis store recovered at %s after %.1f s; resyncing", self.url, outage_s)
        callback = self.on_recovered
        if callback is None:
            return
        try:
            await callback()
        except StoreUnavailable as exc:
            log.warning("redis store resync after recovery failed: %s", exc)
        except Exception:
            log.warning("redis store on_recovered callback failed", exc_info=True)

    # --- the one way to talk to Redis ---------------------------------------------------------

    async def _call(
        self, op: str, fn: Callable[[Client], Awaitable[T]], *, even_degraded: bool = False
    ) -> T:
        """Run `fn` under the deadline; map every backend failure to `StoreUnavailable`.

        `fn` must be safe to run twice (every operation here is: scripts are idempotent for the
        same arguments): a slot mid-migration (TRYAGAIN) or a cluster mid-failover is retried
        until the deadline.
        """
        degraded = self._degraded
        if degraded and not even_degraded:
            raise StoreUnavailable(
                f"redis store at {self.url} is degraded ({self._degraded_reason}); "
                f"{op} skipped while it reconnects"
            )
        if self._closed:
            raise StoreUnavailable(f"redis store at {self.url} is closed; {op} not possible")
        if not self._started:
            raise RuntimeError(f"redis store at {self.url}: {op} before start()")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s), self._slots:
                while True:
                    try:
                        return await fn(self._client)
                    except _TRANSIENT:
                        await asyncio.sleep(_TRANSIENT_RETRY_S)
        except LayoutMismatch:
            raise
        except _UNAVAILABLE as exc:
            reason = _describe_error(exc)
            self._enter_degraded(reason)
            state = " (store degraded)" if degraded else ""
            raise StoreUnavailable(
                f"redis store at {self.url}: {op} failed{state}: {reason}"
            ) from exc
        except RedisError as exc:
            raise StoreUnavailable(
                f"redis store at {self.url}: {op} failed: {_describe_error(exc)}"
            ) from exc
        finally:
            if self._observe_latency is not None:
                self._observe_latency(op, time.perf_counter() - started)

    async def _run_scripts(
        self, client: Client, calls: Sequence[tuple[AsyncScript, Sequence[Any]]]
    ) -> list[Any]:
        """One pipelined round trip of EVALSHAs (reloading scripts once if Redis lost them, as a
        freshly promoted replica or a restarted node has)."""
        for attempt in (1, 2):
            pipe = client.pipeline(transaction=False)
            for script, keys_and_args in calls:
                # execute_command: the cluster pipeline blocks its evalsha() helper (a script
                # with keys in one slot is fine, and ours always are).
                pipe.execute_command("EVALSHA", script.sha, *keys_and_args)
            try:
                return await pipe.execute()
            except NoScriptError:
                if attempt == 2:
                    raise
                for script in {id(s): s for s, _ in calls}.values():
                    script.sha = await client.script_load(script.script)
        raise AssertionError("unreachable")

    async def _script(
        self, client: Client, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        (result,) = await self._run_scripts(client, [(script, [len(keys), *keys, *args])])
        return result

    def _warn_corrupt(self, what: str) -> None:
        now = time.monotonic()
        if now - self._corrupt_last_warn < _CORRUPT_WARN_INTERVAL_S:
            self._corrupt_suppressed += 1
            return
        suppressed, self._corrupt_suppressed = self._corrupt_suppressed, 0
        self._corrupt_last_warn = now
        more = f" ({suppressed} more since the last warning)" if suppressed else ""
        log.warning(
            "redis store ignored an undecodable value at %s (corrupt or written by something "
            "else under prefix %r)%s",
            what,
            self.prefix,
            more,
        )

    # --- keys -----------------------------------------------------------------------------------

    def shard(self, sid: str) -> int:
        return shard_of(sid, self.index_shards)

    def entry_key(self, sid: str) -> str:
        """The key holding `sid`'s entry."""
        return self._shard_prefixes[self.shard(sid)] + "s:" + sid

    def index_key(self, pod: str, shard: int) -> str:
        """The key of `pod`'s index in `shard`."""
        return self._shard_prefixes[shard] + "pod:" + pod

    def _ttl_ms_for(self, location: Location) -> int:
        if location.terminal:
            return self._retention_ms
        if location.state == RESERVED:
            return self._reservation_ms
        return 0

    def _put_call(self, sid: str, location: Location) -> tuple[AsyncScript, list[Any]]:
        value = encode_location(location)
        shard = self.shard(sid)
        return (
            self._put_script,
            [
                2,
                self._shard_prefixes[shard] + "s:" + sid,
                self.index_key(location.pod, shard),
                sid,
                location.pod,
                value,
                self._ttl_ms_for(location),
                self._shard_prefixes[shard] + "pod:",
            ],
        )

    # --- LocationStore --------------------------------------------------------------------------

    async def get(self, sid: str) -> Location | None:
        key = self.entry_key(sid)

        async def fn(client: Client) -> bytes | None:
            try:
                return await client.get(key)
            except ResponseError as exc:
                if str(exc).startswith("WRONGTYPE"):
                    return b""
                raise

        raw = await self._call("get", fn)
        if raw is None:
            return None
        location = decode_location(raw)
        if location is None:
            self._warn_corrupt(key)
        return location

    async def put(self, sid: str, location: Location) -> None:
        call = self._put_call(sid, location)
        await self._call("put", lambda client: self._run_scripts(client, [call]))

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
        await self._call("put_many", lambda client: self._run_scripts(client, batch))

    async def reserve(self, sid: str, pod: str) -> str:
        value = encode_location(Location(pod, RESERVED, "", now_ms()))
        keys = [self.entry_key(sid), self.index_key(pod, self.shard(sid))]
        args = [sid, pod, value, self._reservation_ms]
        owner = await self._call(
            "reserve",
            lambda client: self._script(client, self._reserve_script, keys, args),
            even_degraded=True,
        )
        return owner.decode() if isinstance(owner, bytes) else str(owner)

    async def delete(self, sid: str, pod: str) -> bool:
        keys = [self.entry_key(sid), self.index_key(pod, self.shard(sid))]
        deleted = await self._call(
            "delete", lambda client: self._script(client, self._delete_script, keys, [sid, pod])
        )
        return bool(deleted)

    async def _members(self, pod: str, op: str) -> list[list[str]]:
        """`pod`'s index, shard by shard (one pipelined walk over every shard)."""
        keys = [self.index_key(pod, shard) for shard in range(self.index_shards)]

        async def fn(client: Client) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.smembers(key)
            return await pipe.execute()

        found = await self._call(op, fn)
        return [sorted(m.decode(errors="replace") for m in members) for members in found]

    def _batches(self, per_shard: list[list[str]]) -> list[list[tuple[int, list[str]]]]:
        """(shard, sids) chunks grouped so each group holds at most BATCH_SIZE sids."""
        groups: list[list[tuple[int, list[str]]]] = []
        current: list[tuple[int, list[str]]] = []
        size = 0
        for shard, sids in enumerate(per_shard):
            for start in range(0, len(sids), BATCH_SIZE):
                chunk = sids[start : start + BATCH_SIZE]
                if size + len(chunk) > BATCH_SIZE and current:
                    groups.append(current)
                    current, size = [], 0
                current.append((shard, chunk))
                size += len(chunk)
        if current:
            groups.append(current)
        return groups

    async def pod_sessions(self, pod: str) -> set[str]:
        per_shard = await self._members(pod, "pod_sessions")
        live: set[str] = set()
        stale: list[list[str]] = [[] for _ in range(self.index_shards)]
        for group in self._batches(per_shard):

            async def fetch(client: Client, group: list[tuple[int, list[str]]] = group) -> list:
                pipe = client.pipeline(transaction=False)
                for shard, chunk in group:
                    # MGET answers nil for missing and wrong-type keys alike; one slot per MGET.
                    keys = [self._shard_prefixes[shard] + "s:" + sid for sid in chunk]
                    pipe.execute_command("MGET", *keys)
                return await pipe.execute()

            values = await self._call("pod_sessions", fetch)
            for (shard, chunk), raws in zip(group, values, strict=True):
                for sid, raw in zip(chunk, raws, strict=True):
                    location = decode_location(raw) if raw else None
                    if location is not None and location.pod == pod:
                        live.add(sid)
                    else:
                        stale[shard].append(sid)
        if any(stale):
            # Lazy clean-up of expired / moved members; compare-and-remove in Lua, best effort.
            with contextlib.suppress(StoreUnavailable):
                await self._drop(pod, stale, delete=False, op="pod_sessions")
        return live

    async def drop_pod_sessions(self, pod: str, keep: set[str]) -> int:
        per_shard = await self._members(pod, "drop_pod_sessions")
        doomed = [[sid for sid in sids if sid not in keep] for sids in per_shard]
        return await self._drop(pod, doomed, delete=True, op="drop_pod_sessions")

    async def _drop(self, pod: str, per_shard: list[list[str]], *, delete: bool, op: str) -> int:
        total = 0
        flag = "1" if delete else "0"
        for group in self._batches(per_shard):
            calls = []
            for shard, chunk in group:
                prefix = self._shard_prefixes[shard]
                keys = [prefix + "pod:" + pod, *(prefix + "s:" + sid for sid in chunk)]
                calls.append((self._drop_script, [len(keys), *keys, pod, flag, *chunk]))
            counts = await self._call(op, lambda c, calls=calls: self._run_scripts(c, calls))
            total += sum(int(count) for count in counts)
        return total

    async def record_broadcast(self, record: BroadcastRecord) -> None:
        payload = _encode_broadcast(record)
        keys = [self._bc_data, self._bc_order, self._bc_seq]
        await self._call(
            "record_broadcast",
            lambda client: self._script(
                client, self._record_bc_script, keys, [record.key, payload]
            ),
        )

    async def forget_broadcast(self, key: str) -> None:
        keys = [self._bc_data, self._bc_order]
        await self._call(
            "forget_broadcast",
            lambda client: self._script(client, self._forget_bc_script, keys, [key]),
        )

    async def set_draining(self, pod: str, draining: bool) -> None:
        if draining:
            await self._call("sadd", lambda client: client.sadd(self._drain_key, pod))
        else:
            await self._call("srem", lambda client: client.srem(self._drain_key, pod))

    async def draining_pods(self) -> set[str]:
        members = await self._call("smembers", lambda client: client.smembers(self._drain_key))
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    async def broadcasts(self) -> list[BroadcastRecord]:
        keys = [self._bc_data, self._bc_order]
        flat = await self._call(
            "broadcasts",
            lambda client: self._script(client, self._list_bc_script, keys, []),
        )
        records: list[BroadcastRecord] = []
        for key, raw in zip(flat[0::2], flat[1::2], strict=True):
            record = _decode_broadcast(key, raw)
            if record is None:
                self._warn_corrupt(f"{self._bc_data}[{key!r}]")
            else:
                records.append(record)
        return records
