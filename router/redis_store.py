"""`RedisStore`: the `LocationStore` shared by router replicas, on `redis.asyncio`.

The store is a cache of the pods' truth (see `router.store`): losing it loses nothing, the pods'
WatchSessions feeds rebuild it. It must therefore never take routing down with it: every call has
a deadline, every backend failure surfaces as `StoreUnavailable`, and while Redis is away the store
says so (`degraded`) and fails fast instead of making each call wait for a dead server.

Key layout (``P`` is the prefix, ``mrouter:`` by default; never ``macp:``, which the runtime owns):

``P s:<sid>``  (string)
    One entry per session, packed as ``1␟<pod>␟<state>␟<incarnation>␟<updated_at_ms>`` (``␟`` is
    the ASCII unit separator 0x1f; ``1`` is the format version). The pod comes first so Lua can
    read the owner with one pattern match. TTL: terminal states -> ``retention_s``; ``reserved``
    -> ``reservation_ttl_s``; ``open``/``suspended`` -> none.
``P pod:<pod>``  (set of sids)
    The per-pod index, so a pod's entries can be listed, reconciled or dropped in one pass. Entries
    whose key has expired (or was since taken by another pod) may linger here; readers filter by
    owner and clean them lazily, so `pod_sessions` never lies.
``P bc:data``  (hash key -> ``<method>\\n<request bytes>``)
``P bc:order``  (sorted set key -> sequence number) and ``P bc:seq`` (counter)
``P drain``  (set of pod names)
    Pods drained by an operator: no new placements on them, from any router sharing the store.
``P marker``  (string "1")
    Written at start and after every recovery; checked every `marker_interval_s` while healthy.
    Its absence means Redis was flushed or replaced, and the router resyncs its near-cache.
    The broadcast registry: replay order is registration order; registering a key again moves it
    last (the newest registration of a key is the one that must win on replay).

Invariants (on top of those in `router.store`):
- Every write that depends on the current owner runs as one Lua script (registered with
  ``register_script()``): reserve = insert-if-absent returning the owner on conflict; delete and
  drop = compare-and-delete; put = overwrite and move the index membership. Python never reads an
  owner and then writes based on it.
- `put_many` and `drop_pod_sessions` send one pipelined round trip per batch of
  `BATCH_SIZE` sessions, never one per session.
- Values under the prefix that do not decode (corrupt, written by something else, wrong type) are
  treated as absent: `get` returns None and logs a rate-limited warning; reserve/put overwrite them.
- Connection errors, timeouts and authentication failures raise `StoreUnavailable` and flip
  `degraded` on, logging ONE warning per transition. While degraded, calls fail fast without I/O
  (except `reserve`, which decides where a session lives: it still asks Redis, so a router whose
  health loop has not yet noticed Redis is back cannot place a start elsewhere than a recovered
  replica just reserved it); a background health loop owned by the store (`start()`/`aclose()`)
  PINGs with backoff and, when Redis answers, clears `degraded`, logs one line and awaits
  `on_recovered` (the router resyncs its near-cache into Redis there).
- The password never appears in a log line or an exception message (`redact_url`).

Scripts derive the old owner's index key from the stored value, so the layout suits a standalone
(or sentinel-managed) Redis, not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.aio import wait_event
from router.store import (
    RESERVED,
    STATES,
    BroadcastRecord,
    Location,
    StoreUnavailable,
    now_ms,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

BATCH_SIZE = 500
"""Sessions per pipelined round trip in `put_many` and `drop_pod_sessions`."""

FORMAT_VERSION = b"1"
SEP = b"\x1f"
_SEP_STR = "\x1f"

SCHEMES = ("redis", "rediss", "unix")
_URL_HELP = (
    "expected redis://[[user]:password@]host[:port][/db], rediss://... (TLS) "
    "or unix:///path/to/redis.sock[?db=N]"
)

_CORRUPT_WARN_INTERVAL_S = 10.0
_MAX_BACKOFF_FACTOR = 8.0

# Errors that mean "Redis is not reachable / not usable right now": they flip `degraded`.
# (redis AuthenticationError, AuthorizationError and BusyLoadingError are ConnectionErrors;
# builtin TimeoutError is what asyncio.timeout raises; OSError covers raw socket failures.)
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)


# --- URL handling -----------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """`url` with any password replaced by ``***`` (userinfo and ``?password=``), for logs.

    Never raises: a URL too broken to split is reduced to its scheme.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, colon, _password = userinfo.partition(":")
            netloc = f"{user}:***@{hostport}" if colon else f"{user}@{hostport}"
        query = parts.query
        if query:
            pairs = []
            for pair in query.split("&"):
                name, eq, _value = pair.partition("=")
                pairs.append(f"{name}=***" if eq and name.lower() == "password" else pair)
            query = "&".join(pairs)
        if "://" not in url:
            return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
        # Rebuilt by hand: urlunsplit drops the "//" of an empty netloc (unix:///path).
        rebuilt = f"{parts.scheme}://{netloc}{parts.path}"
        rebuilt += f"?{query}" if query else ""
        return rebuilt + (f"#{parts.fragment}" if parts.fragment else "")
    except ValueError:
        scheme = url.split(":", 1)[0] if ":" in url else ""
        return f"{scheme}://<unparseable>" if scheme else "<unparseable>"


def validate_url(url: str) -> None:
    """Raise ValueError (password-free message) unless `url` is a usable Redis URL."""
    shown = redact_url(url)

    def bad(reason: str) -> ValueError:
        return ValueError(f"invalid Redis URL {shown!r}: {reason}; {_URL_HELP}")

    if not isinstance(url, str) or not url.strip():
        raise bad("empty")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise bad(f"cannot parse ({exc})") from None
    if parts.scheme not in SCHEMES:
        raise bad(f"unsupported scheme {parts.scheme!r}")
    query = parse_qs(parts.query)
    db: str | None = query["db"][0] if "db" in query else None
    if parts.scheme == "unix":
        if not parts.path:
            raise bad("no socket path")
    else:
        if not parts.hostname:
            raise bad("no host")
        try:
            port = parts.port
        except ValueError:
            raise bad("port is not a number in 1..65535") from None
        if port is not None and not 0 < port < 65536:
            raise bad("port is not a number in 1..65535")
        path = parts.path.strip("/")
        if path and db is None:
            db = path
    if db is not None and not (db.isascii() and db.isdigit()):
        raise bad(f"database {db!r} is not a non-negative integer")


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

# KEYS: entry, index(pod)  ARGV: sid, pod, packed value, ttl_ms
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

# KEYS: entry, index(new pod)  ARGV: sid, pod, packed value, ttl_ms (0 = none), index prefix
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

# KEYS: entry, index(pod)  ARGV: sid, pod
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

# KEYS: index(pod)  ARGV: pod, entry prefix, delete (1/0), sid...
# For each sid: when delete=1, compare-and-delete the entry; drop the sid from pod's index when it
# was deleted or pod no longer owns it. Returns the number of entries deleted (delete=1) or of
# stale index members removed (delete=0, the lazy clean-up behind pod_sessions).
_LUA_DROP = (
    _LUA_PRELUDE
    + r"""
local count = 0
local delete = ARGV[3] == '1'
for i = 4, #ARGV do
  local key = ARGV[2] .. ARGV[i]
  local owner = owner_of(key)
  if owner == ARGV[1] then
    if delete then
      redis.call('DEL', key)
      redis.call('SREM', KEYS[1], ARGV[i])
      count = count + 1
    end
  else
    redis.call('SREM', KEYS[1], ARGV[i])
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
    return text


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
    ) -> None:
        validate_url(url)
        if not prefix:
            raise ValueError("Redis key prefix must not be empty")
        if prefix.startswith("macp:"):
            raise ValueError(f"Redis key prefix {prefix!r} is reserved for the MACP runtime")
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
        self.prefix = prefix
        self.on_recovered: Callable[[], Awaitable[None]] | None = None
        self._retention_ms = _ms(retention_s)
        self._reservation_ms = _ms(reservation_ttl_s)
        self._timeout_s = timeout_s
        self._health_interval_s = health_interval_s
        self._marker_interval_s = marker_interval_s
        self._marker_key = f"{prefix}marker"
        self.resyncs = 0
        self._required = required
        self._observe_latency = observe_latency

        self._entry_prefix = prefix + "s:"
        self._index_prefix = prefix + "pod:"
        self._bc_data = prefix + "bc:data"
        self._bc_order = prefix + "bc:order"
        self._bc_seq = prefix + "bc:seq"
        self._drain_key = prefix + "drain"

        kwargs: dict[str, Any] = dict(parse_url(url))
        if password is not None:
            kwargs["password"] = password
        # One quick retry on a connection error heals a pooled connection that the server closed
        # (restart, idle timeout); timeouts are not retried: the deadline is the deadline.
        kwargs.update(
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            decode_responses=False,
            client_name="macp-router",
        )
        self._pool = BlockingConnectionPool(max_connections=pool_size, timeout=timeout_s, **kwargs)
        self._client: Redis = Redis.from_pool(self._pool)
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
        self._health_task: asyncio.Task[None] | None = None
        self.health_probes = 0
        """PINGs the health loop has sent while degraded (a state tests can wait for)."""
        self._started = False
        self._closed = False
        self._corrupt_last_warn = -_CORRUPT_WARN_INTERVAL_S
        self._corrupt_suppressed = 0

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r}, degraded={self._degraded})"

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
        """
        if self._closed:
            raise StoreUnavailable(f"redis store {self.url} is closed; create a new one")
        if self._started:
            return
        try:
            await self._probe()
        except (*_UNAVAILABLE, RedisError) as exc:
            reason = _describe_error(exc)
            if self._required:
                await self._client.aclose()
                self._closed = True
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
        self._health_task = asyncio.create_task(
            self._health_loop(), name=f"redis-store-health {self.url}"
        )

    async def aclose(self) -> None:
        """Stop the health loop and close every connection. Idempotent."""
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not self._closed:
            self._closed = True
            await self._client.aclose()

    async def _probe(self) -> None:
        """PING, load the scripts and set the marker, under the deadline; raises the client's
        errors."""
        async with asyncio.timeout(self._timeout_s):
            await self._client.ping()
            for script in self._scripts():
                script.sha = await self._client.script_load(script.script)
            await self._client.set(self._marker_key, "1")

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
        """While degraded: PING with capped, jittered backoff; on success recover and resync."""
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
                    continue
                except Exception:
                    # Never let a surprise end the loop: the store would stay degraded forever.
                    log.warning("redis store health probe failed unexpectedly", exc_info=True)
                    delay = min(delay * 2, max_delay)
                    continue
                await self._recover()

    async def _check_marker(self) -> None:
        """A healthy Redis that lost our marker key was flushed or replaced: resync it.

        Without this a quick restart or a FLUSHALL between two calls would go unnoticed (the
        pool reconnects silently) and the store would stay empty until the feeds rewrote it.
        """
        try:
            present = await self._call("exists", lambda r: r.exists(self._marker_key))
            if present:
                return
            await self._call("set", lambda r: r.set(self._marker_key, "1"))
        except StoreUnavailable:
            return  # _call flipped `degraded`; the loop's recovery path takes over
        log.warning("redis store at %s lost its data (flushed or replaced); resyncing", self.url)
        self.resyncs += 1
        callback = self.on_recovered
        if callback is not None:
            try:
                await callback()
            except Exception:
                log.warning("redis store resync after a flush failed", exc_info=True)

    async def _recover(self) -> None:
        # Pooled connections opened before the outage are dead; drop the idle ones now rather
        # than let each fail once.
        with contextlib.suppress(RedisError, OSError):
            await self._pool.disconnect(inuse_connections=False)
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
        self, op: str, fn: Callable[[Redis], Awaitable[T]], *, even_degraded: bool = False
    ) -> T:
        """Run `fn` under the deadline; map every backend failure to `StoreUnavailable`."""
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
            async with asyncio.timeout(self._timeout_s):
                return await fn(self._client)
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

    async def _run_scripts(self, client: Redis, calls: list[tuple[AsyncScript, list[Any]]]) -> list:
        """One pipelined round trip of EVALSHAs (reloading scripts once if Redis lost them)."""
        for attempt in (1, 2):
            pipe = client.pipeline(transaction=False)
            for script, keys_and_args in calls:
                pipe.evalsha(script.sha, *keys_and_args)
            try:
                return await pipe.execute()
            except NoScriptError:
                if attempt == 2:
                    raise
                for script in {id(s): s for s, _ in calls}.values():
                    script.sha = await client.script_load(script.script)
        raise AssertionError("unreachable")

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

    def _entry(self, sid: str) -> str:
        return self._entry_prefix + sid

    def _index(self, pod: str) -> str:
        return self._index_prefix + pod

    def _ttl_ms_for(self, location: Location) -> int:
        if location.terminal:
            return self._retention_ms
        if location.state == RESERVED:
            return self._reservation_ms
        return 0

    def _put_call(self, sid: str, location: Location) -> tuple[AsyncScript, list[Any]]:
        value = encode_location(location)
        return (
            self._put_script,
            [
                2,
                self._entry(sid),
                self._index(location.pod),
                sid,
                location.pod,
                value,
                self._ttl_ms_for(location),
                self._index_prefix,
            ],
        )

    # --- LocationStore --------------------------------------------------------------------------

    async def get(self, sid: str) -> Location | None:
        key = self._entry(sid)

        async def fn(client: Redis) -> bytes | None:
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
        owner = await self._call(
            "reserve",
            lambda client: self._reserve_script(
                keys=[self._entry(sid), self._index(pod)],
                args=[sid, pod, value, self._reservation_ms],
                client=client,
            ),
            even_degraded=True,
        )
        return owner.decode() if isinstance(owner, bytes) else str(owner)

    async def delete(self, sid: str, pod: str) -> bool:
        deleted = await self._call(
            "delete",
            lambda client: self._delete_script(
                keys=[self._entry(sid), self._index(pod)], args=[sid, pod], client=client
            ),
        )
        return bool(deleted)

    async def pod_sessions(self, pod: str) -> set[str]:
        index = self._index(pod)
        members: set[bytes] = await self._call("pod_sessions", lambda c: c.smembers(index))
        if not members:
            return set()
        sids = [m.decode(errors="replace") for m in members]
        live: set[str] = set()
        stale: list[str] = []
        for start in range(0, len(sids), BATCH_SIZE):
            chunk = sids[start : start + BATCH_SIZE]
            keys = [self._entry(sid) for sid in chunk]
            # MGET answers nil for missing and wrong-type keys alike.
            values = await self._call("pod_sessions", lambda c, keys=keys: c.mget(keys))
            for sid, raw in zip(chunk, values, strict=True):
                location = decode_location(raw) if raw else None
                if location is not None and location.pod == pod:
                    live.add(sid)
                else:
                    stale.append(sid)
        if stale:
            # Lazy clean-up of expired / moved members; compare-and-remove in Lua, best effort.
            with contextlib.suppress(StoreUnavailable):
                await self._drop(pod, stale, delete=False, op="pod_sessions")
        return live

    async def drop_pod_sessions(self, pod: str, keep: set[str]) -> int:
        index = self._index(pod)
        members: set[bytes] = await self._call("drop_pod_sessions", lambda c: c.smembers(index))
        doomed = [sid for m in members if (sid := m.decode(errors="replace")) not in keep]
        return await self._drop(pod, doomed, delete=True, op="drop_pod_sessions")

    async def _drop(self, pod: str, sids: list[str], *, delete: bool, op: str) -> int:
        total = 0
        flag = "1" if delete else "0"
        for start in range(0, len(sids), BATCH_SIZE):
            chunk = sids[start : start + BATCH_SIZE]
            call = (self._drop_script, [1, self._index(pod), pod, self._entry_prefix, flag, *chunk])
            (count,) = await self._call(op, lambda c, call=call: self._run_scripts(c, [call]))
            total += int(count)
        return total

    async def record_broadcast(self, record: BroadcastRecord) -> None:
        payload = _encode_broadcast(record)
        await self._call(
            "record_broadcast",
            lambda client: self._record_bc_script(
                keys=[self._bc_data, self._bc_order, self._bc_seq],
                args=[record.key, payload],
                client=client,
            ),
        )

    async def forget_broadcast(self, key: str) -> None:
        await self._call(
            "forget_broadcast",
            lambda client: self._forget_bc_script(
                keys=[self._bc_data, self._bc_order], args=[key], client=client
            ),
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
        flat = await self._call(
            "broadcasts",
            lambda client: self._list_bc_script(
                keys=[self._bc_data, self._bc_order], args=[], client=client
            ),
        )
        records: list[BroadcastRecord] = []
        for key, raw in zip(flat[0::2], flat[1::2], strict=True):
            record = _decode_broadcast(key, raw)
            if record is None:
                self._warn_corrupt(f"{self._bc_data}[{key!r}]")
            else:
                records.append(record)
        return records
