"""The Redis store's one way to talk to Redis (`RedisLink.call`), and what happens while Redis
is away: degraded mode, the supervised health loop, the per-shard markers and the resync.

Invariants:
- Every command of the store goes through `call`: under the store's deadline, bounded in
  concurrency, with its latency observed; every backend failure leaves as `StoreUnavailable`.
  TRYAGAIN and a cluster mid-failover are retried inside the deadline before they count as an
  outage; redirections (MOVED, ASK) are the cluster client's business.
- An outage (connection error, timeout, authentication failure, CLUSTERDOWN, no master known to
  the sentinels) flips `degraded` on and logs ONE warning per transition. While degraded, calls
  fail fast without I/O, except those made with ``even_degraded=True`` (`reserve`: it decides
  where a session lives, so it still asks Redis).
- The health loop runs as the supervised service `service` (of the router's supervisor, or of a
  private one): while degraded it probes with capped, jittered backoff (PING, script load, every
  shard's marker: every master must answer) and on success clears `degraded`, logs one line and
  awaits `on_recovered` (the router resyncs its near-cache into Redis there). While healthy it
  checks the markers every `marker_interval_s`: a missing one means that shard was flushed or
  replaced, and `on_recovered` runs too. A callback's failure is logged, never ends the loop.
- A prefix written with another key layout raises `LayoutMismatch` from `start` and is logged
  (not retried) by the marker check; it never flips `degraded`.
- Log lines go to the ``router.redis_store`` logger (operators filter on that one name).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from router.aio import wait_event
from router.redis_connect import TRANSIENT, UNAVAILABLE, Client, Connection, describe_error
from router.redis_layout import KeyLayout, LayoutMismatch, Scripts
from router.redis_topology import CLUSTER
from router.store import StoreUnavailable
from router.supervisor import Supervisor

__all__ = ["RedisLink"]

log = logging.getLogger("router.redis_store")

T = TypeVar("T")

_MAX_BACKOFF_FACTOR = 8.0
_TRANSIENT_RETRY_S = 0.05


class RedisLink:
    """One store's connection to Redis and its health (see the module docstring)."""

    def __init__(
        self,
        *,
        url: str,
        topology: str,
        connection: Connection,
        keys: KeyLayout,
        timeout_s: float,
        pool_size: int,
        health_interval_s: float,
        marker_interval_s: float,
        required: bool,
        observe_latency: Callable[[str, float], None] | None,
        supervisor: Supervisor | None,
        service: str,
    ) -> None:
        self.url = url
        """Redacted: safe to log."""
        self.topology = topology
        self.connection = connection
        self.scripts = Scripts.register(connection.client)
        self.keys = keys
        self.timeout_s = timeout_s
        self.health_interval_s = health_interval_s
        self.marker_interval_s = marker_interval_s
        self.required = required
        self.observe_latency = observe_latency
        self.on_recovered: Callable[[], Awaitable[None]] | None = None
        # Bounds concurrent calls where the client's own pool does not (cluster nodes and the
        # sentinel pool fail instead of waiting when their connection limit is reached).
        self._slots = asyncio.Semaphore(pool_size)
        self.degraded = False
        self.degraded_reason = ""
        self._degraded_since = 0.0
        self._degraded_event = asyncio.Event()
        self._own_supervisor = supervisor is None
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self.service = service
        self.health_probes = 0
        self.outages = 0
        self.resyncs = 0
        self._started = False
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Probe Redis and start the health loop (see `RedisStore.start`)."""
        if self._closed:
            raise StoreUnavailable(f"redis store {self.url} is closed; create a new one")
        if self._started:
            return
        try:
            await self.probe()
        except LayoutMismatch:
            await self.close_client()
            raise
        except (*UNAVAILABLE, RedisError) as exc:
            reason = describe_error(exc)
            if self.required:
                await self.close_client()
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
            self.enter_degraded(reason, quiet=True)
        self._started = True
        self._supervisor.spawn(self.service, self._health_loop)

    async def aclose(self) -> None:
        """Stop the health loop and close every connection. Idempotent."""
        if self._own_supervisor:
            await self._supervisor.aclose()
        else:
            await self._supervisor.stop(self.service)
        await self.close_client()

    async def close_client(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.connection.aclose()

    async def probe(self) -> None:
        """PING, load the scripts and write every shard's marker, under the deadline; raises the
        client's errors. Every master must answer: a cluster with a shard down stays degraded."""
        client = self.connection.client
        async with asyncio.timeout(self.timeout_s * 2):
            await client.ping()
            for script in self.scripts.all():
                script.sha = await client.script_load(script.script)
            await self.write_markers()

    async def write_markers(self) -> None:
        markers, layout = self.keys.markers, self.keys.layout
        pipe = self.connection.client.pipeline(transaction=False)
        for key in markers:
            pipe.set(key, layout, nx=True)
        for key in markers:
            pipe.get(key)
        results = await pipe.execute()
        found = {value for value in results[len(markers) :] if value != layout}
        if found:
            raise LayoutMismatch(
                f"redis store at {self.url}: prefix {self.keys.prefix!r} holds another key layout "
                f"({sorted(v.decode(errors='replace') for v in found if v)}, this router writes "
                f"{layout.decode()}); give this router another --redis-prefix or stop the "
                "routers of the other layout"
            )

    # --- degraded mode ---------------------------------------------------------------------------

    def enter_degraded(self, reason: str, *, quiet: bool = False) -> None:
        if self.degraded:
            return
        self.degraded = True
        self.outages += 1
        self.degraded_reason = reason
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
        while True:
            if not await wait_event(self._degraded_event, self.marker_interval_s):
                await self.check_marker()
                continue
            await self._probe_until_recovered()

    async def _probe_until_recovered(self) -> None:
        max_delay = self.health_interval_s * _MAX_BACKOFF_FACTOR
        delay = self.health_interval_s
        while self.degraded:
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            self.health_probes += 1
            try:
                await self.probe()
            except (*UNAVAILABLE, RedisError) as exc:
                self.degraded_reason = describe_error(exc)
                delay = min(delay * 2, max_delay)
                if self.topology == CLUSTER:
                    # Forget the slot map: the next probe asks the seeds afresh.
                    await self.connection.reset()
                continue
            except Exception:
                # Never let a surprise end the loop: the store would stay degraded forever.
                log.warning("redis store health probe failed unexpectedly", exc_info=True)
                delay = min(delay * 2, max_delay)
                continue
            await self._recover()

    async def check_marker(self) -> None:
        """A healthy Redis that lost a shard's marker was flushed or replaced: resync it.

        Without this a quick restart or a FLUSHALL between two calls (or, on a cluster, a master
        and its replicas all replaced) would go unnoticed (the pool reconnects silently) and the
        store would stay empty until the feeds rewrote it.
        """
        markers = self.keys.markers

        async def present(client: Client) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for key in markers:
                pipe.exists(key)
            return await pipe.execute()

        try:
            found = await self.call("exists", present)
            if all(found):
                return
            await self.call("set", lambda client: self.write_markers())
        except LayoutMismatch as exc:
            log.error("%s", exc)
            return
        except StoreUnavailable:
            return  # call() flipped `degraded`; the loop's recovery path takes over
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

    async def _recover(self) -> None:
        await self.connection.reset()
        outage_s = time.monotonic() - self._degraded_since
        self.degraded = False
        self.degraded_reason = ""
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

    # --- the one way to talk to Redis ------------------------------------------------------------

    async def call(
        self, op: str, fn: Callable[[Client], Awaitable[T]], *, even_degraded: bool = False
    ) -> T:
        """Run `fn` under the deadline; map every backend failure to `StoreUnavailable`.

        `fn` must be safe to run twice (every operation of the store is: scripts are idempotent
        for the same arguments): a slot mid-migration (TRYAGAIN) or a cluster mid-failover is
        retried until the deadline.
        """
        degraded = self.degraded
        if degraded and not even_degraded:
            raise StoreUnavailable(
                f"redis store at {self.url} is degraded ({self.degraded_reason}); "
                f"{op} skipped while it reconnects"
            )
        if self._closed:
            raise StoreUnavailable(f"redis store at {self.url} is closed; {op} not possible")
        if not self._started:
            raise RuntimeError(f"redis store at {self.url}: {op} before start()")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s), self._slots:
                while True:
                    try:
                        return await fn(self.connection.client)
                    except TRANSIENT:
                        await asyncio.sleep(_TRANSIENT_RETRY_S)
        except LayoutMismatch:
            raise
        except UNAVAILABLE as exc:
            reason = describe_error(exc)
            self.enter_degraded(reason)
            state = " (store degraded)" if degraded else ""
            raise StoreUnavailable(
                f"redis store at {self.url}: {op} failed{state}: {reason}"
            ) from exc
        except RedisError as exc:
            raise StoreUnavailable(
                f"redis store at {self.url}: {op} failed: {describe_error(exc)}"
            ) from exc
        finally:
            if self.observe_latency is not None:
                self.observe_latency(op, time.perf_counter() - started)

    async def run_scripts(
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

    async def script(
        self, client: Client, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        (result,) = await self.run_scripts(client, [(script, [len(keys), *keys, *args])])
        return result
