"""The Redis store's key layout, value encoding and Lua scripts: what is stored where, on every
topology (standalone, Cluster, Sentinel), and the scripts that change it atomically.

``P`` is the prefix, ``mrouter:`` by default; never ``macp:``, which the runtime owns. Sessions are
split into `index_shards` shards (64 by default) by ``crc32(sid) mod shards``; each shard has a
hash tag ``{T}`` (`shard_tags`: short numbers whose cluster slots are spread evenly over the 16384
slots, so any contiguous slot split among masters gets an even share of the shards). Every key one
script touches carries the same tag, so every script runs on one slot (no CROSSSLOT on a cluster),
and the per-pod index is spread over the cluster instead of sitting on one node:

``P{T}:s:<sid>``  (string)
    One entry per session, packed as ``1␟<pod>␟<state>␟<incarnation>␟<updated_at_ms>`` (``␟`` is
    the ASCII unit separator 0x1f; ``1`` is the format version). The pod comes first so Lua can
    read the owner with one pattern match. TTL: terminal states -> ``retention_s``; ``reserved``
    -> ``reservation_ttl_s``; ``open``/``suspended`` -> none. A ``reserved`` entry's incarnation
    field holds the reserving router's token, which the release script compares.
``P{T}:pod:<pod>``  (set of sids)
    The per-pod index of one shard (walked by `router.redis_pod_index`). Members whose entry
    expired (or was since taken by another pod) may linger here; readers filter by owner.
``P{T}:marker``  (string ``2/<shards>``)
    One per shard, written at start and after every recovery, checked while healthy
    (`router.redis_link`). A missing one means that shard's node was flushed or replaced. The
    value names the layout; a store finding another layout's marker refuses to start.
``P{bc}:data``  (hash key -> ``<method>\\n<request bytes>``)
``P{bc}:order``  (sorted set key -> sequence number) and ``P{bc}:seq`` (counter)
    The broadcast registry (one slot): replay order is registration order; registering a key
    again moves it last (the newest registration of a key is the one that must win on replay).
``P drain``  (set of pod names)
    Pods drained by an operator: no new placements on them, from any router sharing the store.

Invariants:
- The layout is a contract between every router sharing a prefix: `LAYOUT_VERSION` and the shard
  count are written in each shard's marker, and the functions here are the only place that
  spells a key (`KeyLayout` for the store, `entry_key` / `index_key` for tools and tests).
- Every script touches keys of one hash tag only, so it runs on one slot on every topology.
- `owner_of` in Lua accepts exactly the values `decode_location` accepts; anything else under the
  prefix (corrupt, foreign, wrong type) counts as absent, and `UndecodableLog` says so in at most
  one warning per 10 s (on the ``router.redis_store`` logger, the store's one logger name).
"""

from __future__ import annotations

import functools
import logging
import time
import zlib
from dataclasses import dataclass

from redis.commands.core import AsyncScript
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from router.redis_connect import Client
from router.store import STATES, BroadcastRecord, Location, StoreUnavailable

__all__ = [
    "DEFAULT_INDEX_SHARDS",
    "LAYOUT_VERSION",
    "KeyLayout",
    "LayoutMismatch",
    "Scripts",
    "UndecodableLog",
    "decode_broadcast",
    "decode_location",
    "encode_broadcast",
    "encode_location",
    "entry_key",
    "index_key",
    "shard_of",
    "shard_tags",
]

log = logging.getLogger("router.redis_store")

DEFAULT_INDEX_SHARDS = 64
"""Shards of the key space (hash tags). Part of the layout: every router sharing a store must
use the same count (the per-shard marker records it). 64 spreads evenly over up to 64 masters."""

LAYOUT_VERSION = "2"

FORMAT_VERSION = b"1"
SEP = b"\x1f"
_SEP_STR = "\x1f"


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


def encode_broadcast(record: BroadcastRecord) -> bytes:
    if "\n" in record.method or not record.method:
        raise ValueError(f"broadcast method {record.method!r} must be non-empty, without newline")
    return record.method.encode() + b"\n" + bytes(record.request)


def decode_broadcast(key: bytes, raw: bytes) -> BroadcastRecord | None:
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

# KEYS: entry, index(shard, pod)  ARGV: sid, pod, token
# Compare-and-set release of a reservation: the entry is deleted only while it is still the one
# reserve wrote (pod, state reserved, incarnation = the reserving router's token), so an OPEN
# written since (a feed, a confirm) or another router's reservation survives. The sid leaves
# pod's index only when the entry went or pod no longer owns it.
_LUA_RELEASE = (
    _LUA_PRELUDE
    + r"""
if owner_of(KEYS[1]) ~= ARGV[2] then
  redis.call('SREM', KEYS[2], ARGV[1])  -- pod does not own it: its index member is stale
  return 0
end
local state, token = string.match(redis.call('GET', KEYS[1]),
                                  '^1\031[^\031]+\031([^\031]*)\031([^\031]*)\031')
if state ~= 'reserved' or token ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
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


class LayoutMismatch(StoreUnavailable):
    """Another router wrote this prefix with a different key layout (version or shard count)."""


class KeyLayout:
    """Every key of one store: a prefix and a shard count, spelled the way the module docstring
    says (precomputed: building a key is one concatenation)."""

    def __init__(self, prefix: str, shards: int) -> None:
        self.prefix = prefix
        self.shards = shards
        self.layout = f"{LAYOUT_VERSION}/{shards}".encode()
        """The marker value: the layout version and the shard count."""
        self.shard_prefixes = tuple(f"{prefix}{{{tag}}}:" for tag in shard_tags(shards))
        self.markers = tuple(p + "marker" for p in self.shard_prefixes)
        self.bc_data = prefix + "{bc}:data"
        self.bc_order = prefix + "{bc}:order"
        self.bc_seq = prefix + "{bc}:seq"
        self.drain = prefix + "drain"

    def shard(self, sid: str) -> int:
        return shard_of(sid, self.shards)

    def entry(self, sid: str, shard: int | None = None) -> str:
        """The key holding `sid`'s entry (`shard` when the caller already knows it)."""
        return self.shard_prefixes[self.shard(sid) if shard is None else shard] + "s:" + sid

    def index(self, pod: str, shard: int) -> str:
        """The key of `pod`'s index in `shard`."""
        return self.shard_prefixes[shard] + "pod:" + pod

    def index_prefix(self, shard: int) -> str:
        """What precedes a pod name in `shard`'s index keys (the put script moves memberships)."""
        return self.shard_prefixes[shard] + "pod:"


@dataclass(frozen=True)
class Scripts:
    """The store's Lua scripts, registered on one client (EVALSHA; reloaded on NOSCRIPT)."""

    reserve: AsyncScript
    put: AsyncScript
    delete: AsyncScript
    release: AsyncScript
    drop: AsyncScript
    record_broadcast: AsyncScript
    forget_broadcast: AsyncScript
    list_broadcasts: AsyncScript

    @classmethod
    def register(cls, client: Client) -> Scripts:
        """Register every script on `client`; no I/O."""
        register = client.register_script
        return cls(
            register(_LUA_RESERVE),
            register(_LUA_PUT),
            register(_LUA_DELETE),
            register(_LUA_RELEASE),
            register(_LUA_DROP),
            register(_LUA_RECORD_BROADCAST),
            register(_LUA_FORGET_BROADCAST),
            register(_LUA_LIST_BROADCASTS),
        )

    def all(self) -> tuple[AsyncScript, ...]:
        return (
            self.reserve,
            self.put,
            self.delete,
            self.release,
            self.drop,
            self.record_broadcast,
            self.forget_broadcast,
            self.list_broadcasts,
        )


_CORRUPT_WARN_INTERVAL_S = 10.0


class UndecodableLog:
    """Rate-limited warnings about values under the prefix that do not decode (one line per
    `_CORRUPT_WARN_INTERVAL_S`, counting the ones it held back)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._last_warn = -_CORRUPT_WARN_INTERVAL_S
        self._suppressed = 0

    def warn(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_warn < _CORRUPT_WARN_INTERVAL_S:
            self._suppressed += 1
            return
        suppressed, self._suppressed = self._suppressed, 0
        self._last_warn = now
        more = f" ({suppressed} more since the last warning)" if suppressed else ""
        log.warning(
            "redis store ignored an undecodable value at %s (corrupt or written by something "
            "else under prefix %r)%s",
            what,
            self.prefix,
            more,
        )
