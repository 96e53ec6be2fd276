"""How the Redis store connects, and what a failure of that connection means.

`connect` builds the client for one parsed `--redis-url` (`router.redis_topology`): a
`BlockingConnectionPool` for standalone Redis, a `RedisCluster` that follows MOVED / ASK for a
cluster, a `Sentinel`-discovered master for a sentinel group. `describe_error` turns a backend
failure into one sentence for logs, readiness and exceptions.

Invariants:
- No I/O here: `connect` only builds clients (they connect on first use); `Connection.aclose`
  is the one place that closes them, and never raises for a connection already dead.
- Timeouts: every socket has the store's deadline; retries inside the client are at most one
  quick reconnect (standalone, sentinel) or two jittered slot-map refreshes (cluster), so the
  store's own deadline stays the bound of every call.
- `UNAVAILABLE` lists the errors that mean "Redis is not reachable / not usable right now" (they
  flip the store to degraded); `TRANSIENT` the cluster states that heal by themselves within
  moments. `describe_error` never includes a password (redis-py's messages carry none; the URL
  shown elsewhere is redacted by `router.redis_topology.redact_url`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url as parse_redis_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.redis_topology import CLUSTER, SENTINEL, RedisTarget

__all__ = ["TRANSIENT", "UNAVAILABLE", "Client", "Connection", "connect", "describe_error"]

Client = Redis | RedisCluster

# Errors that mean "Redis is not reachable / not usable right now": they flip `degraded`.
# (redis AuthenticationError, AuthorizationError, BusyLoadingError, MasterNotFoundError and
# MaxConnectionsError are ConnectionErrors; builtin TimeoutError is what asyncio.timeout raises;
# OSError covers raw socket failures; ClusterError covers CLUSTERDOWN and a redirection loop;
# RedisClusterException covers "no node of the cluster answers" and uncovered slots; a
# ReadOnlyError is a demoted master still answering.)
UNAVAILABLE = (
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
TRANSIENT = (TryAgainError, ClusterError)


@dataclass
class Connection:
    """The client the store talks through, and what it was built from (for closing)."""

    client: Client
    pool: BlockingConnectionPool | None = None
    """The standalone client's pool (None on a cluster or a sentinel group)."""
    sentinel: Sentinel | None = None
    """The sentinels asked for the master (None unless the topology is sentinel)."""

    async def reset(self) -> None:
        """Drop idle connections opened before an outage (they are dead) rather than let each
        fail once; a cluster client also forgets its slot map and asks the seeds again."""
        with contextlib.suppress(RedisError, OSError):
            if isinstance(self.client, RedisCluster):
                await self.client.aclose()
            else:
                await self.client.connection_pool.disconnect(inuse_connections=False)

    async def aclose(self) -> None:
        await self.client.aclose()
        if self.sentinel is not None:
            with contextlib.suppress(RedisError, OSError):
                await self.sentinel.aclose()


def connect(
    url: str, target: RedisTarget, password: str | None, timeout_s: float, pool_size: int
) -> Connection:
    """The client for `target` (`url` parsed); `password` overrides the URL's. No I/O."""
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
        return Connection(
            RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                username=target.username,
                password=secret,
                ssl=target.tls,
                max_connections=pool_size + 8,
                retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.1), 2),
                **common,
            )
        )
    # One quick retry on a connection error heals a pooled connection that the server closed
    # (restart, idle timeout); timeouts are not retried: the deadline is the deadline.
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    if target.kind == SENTINEL:
        sentinel = Sentinel(
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
        client = sentinel.master_for(
            target.master,
            db=target.db,
            username=target.username,
            password=secret,
            ssl=target.tls,
            retry=retry,
            **common,
        )
        return Connection(client, sentinel=sentinel)
    kwargs: dict[str, Any] = dict(parse_redis_url(url))
    if password is not None:
        kwargs["password"] = password
    kwargs.update(common, retry=retry)
    pool = BlockingConnectionPool(max_connections=pool_size, timeout=timeout_s, **kwargs)
    return Connection(Redis.from_pool(pool), pool=pool)


def describe_error(exc: BaseException) -> str:
    """One sentence saying what failed and, where it helps, what to check."""
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
