"""The ACP front door's per-connection state is bounded: session streams go when a session is
closed or the connection ends, idle client connections (WebSocket ones too) and idle upstreams
are closed after --acp-idle-timeout-s, and the sizes are exported.

Real simulated ACP pods and a real front door on loopback, real acp clients (HTTP and
WebSocket). Every wait is bounded; states are awaited with `eventually`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from router.acp.connection import VirtualConnection
from tests.acp_support import AcpCluster, T, acp_cluster, connect
from tests.waiting import eventually

IDLE_S = 0.4


def only_connection(cluster: AcpCluster) -> VirtualConnection:
    [connection] = cluster.frontdoor.connections.all()
    return connection


async def test_a_closed_session_leaves_its_connection_and_a_closed_connection_leaves_nothing(
    tmp_path: Path,
) -> None:
    async with acp_cluster(tmp_path, count=2) as cluster:
        client = await cluster.client()
        sids = [await client.new() for _ in range(3)]
        connection = only_connection(cluster)
        assert set(connection.session_streams) == set(sids)
        assert cluster.metric("macp_router_acp_session_streams") == 3
        assert cluster.metric("macp_router_acp_connections", side="client") == 1
        await asyncio.wait_for(client.conn.close_session(session_id=sids[0]), T)
        await eventually(lambda: sids[0] not in connection.session_streams, timeout=T,
                         what="the closed session's stream removed")
        assert set(connection.session_streams) == set(sids[1:])
        assert cluster.metric("macp_router_acp_session_streams") == 2
        assert await client.prompt(sids[1], "the others still work") == "end_turn"
        await client.close()
        await eventually(lambda: len(cluster.frontdoor.connections) == 0, timeout=T,
                         what="the connection removed")
        assert connection.session_streams == {} and connection.upstreams == {}
        assert cluster.metric("macp_router_acp_session_streams") == 0
        assert cluster.metric("macp_router_acp_connections", side="upstream") == 0


async def test_an_idle_websocket_client_is_closed_but_a_busy_one_is_not(tmp_path: Path) -> None:
    async with acp_cluster(tmp_path, count=2, connection_idle_s=IDLE_S) as cluster:
        busy = await connect(cluster.url, websocket=True)
        cluster.clients.append(busy)
        busy_sid = await busy.new()
        slow = asyncio.ensure_future(busy.prompt(busy_sid, "a slow one"))
        idle = await connect(cluster.url, websocket=True)
        cluster.clients.append(idle)
        idle_sid = await idle.new()
        assert await idle.prompt(idle_sid, "then nothing") == "end_turn"
        assert cluster.metric("macp_router_acp_connections", side="client") == 2
        await eventually(lambda: cluster.metric("macp_router_acp_idle_closed_total",
                                                side="client") == 1,
                         timeout=T, what="the idle WebSocket client closed")
        assert len(cluster.frontdoor.connections) == 1
        # The router ended the idle client's socket: its next call fails at once, it does not
        # hang on a connection nobody serves.
        with pytest.raises(Exception):  # noqa: B017  # acp raises its transport's own error
            await asyncio.wait_for(idle.status(idle_sid), T)
        # The busy one (a prompt in flight, longer than the idle timeout) was never touched.
        assert not slow.done()
        await asyncio.wait_for(busy.conn.cancel(session_id=busy_sid), T)
        assert await asyncio.wait_for(slow, T) == "cancelled"
        assert cluster.metric("macp_router_acp_idle_closed_total", side="client") == 1


async def test_an_idle_upstream_is_closed_unless_its_pod_holds_a_session_of_the_client(
    tmp_path: Path,
) -> None:
    """An HTTP client with its connection stream open is never idle itself. Its upstream to
    the pod that holds its session stays (a stock acp pod would end the session with it); its
    upstream to the pod whose sessions it closed goes after the idle timeout, and is opened
    again when needed."""
    async with acp_cluster(tmp_path, count=2, connection_idle_s=IDLE_S) as cluster:
        client = await cluster.client()
        sids = [await client.new() for _ in range(4)]
        holder = {sid: cluster.holders(sid)[0] for sid in sids}
        assert set(holder.values()) == {"a", "b"}  # least-sessions p2c over two pods
        kept = sids[0]
        for sid in sids[1:]:
            if holder[sid] != holder[kept]:
                await asyncio.wait_for(client.conn.close_session(session_id=sid), T)
        other = ({"a", "b"} - {holder[kept]}).pop()
        connection = only_connection(cluster)
        assert set(connection.upstreams) == {"a", "b"}
        await eventually(lambda: cluster.metric("macp_router_acp_idle_closed_total",
                                                side="upstream") == 1,
                         timeout=T, what=f"the idle upstream to pod {other} closed")
        assert other not in connection.upstreams
        assert holder[kept] in connection.upstreams
        assert cluster.metric("macp_router_acp_connections", side="upstream") == 1
        assert cluster.frontdoor.connections.get(connection.connection_id) is connection
        assert await client.prompt(kept, "still here") == "end_turn"
        fresh = await client.new()  # the least loaded pod: `other`, through a new upstream
        assert cluster.holders(fresh) == [other]
        assert await client.prompt(fresh, "on a reopened upstream") == "end_turn"
        assert set(connection.upstreams) == {"a", "b"}


def test_streams_of_sessions_the_router_forgot_are_pruned_unless_a_client_reads_them() -> None:
    known: dict[str, str] = {"s1": "a", "s2": "a", "s3": "b"}

    async def dispatch(*_: object) -> None:
        return None

    connection = VirtualConnection("c1", {}, roster=None,  # type: ignore[arg-type]
                                   dispatch=dispatch, cached_pod=known.get)
    for sid in known:
        connection.register(sid)
    connection.attach("s2")
    del known["s1"], known["s2"]  # ended and expired (or forgotten with their pod)
    assert connection.prune() == 1
    assert set(connection.session_streams) == {"s2", "s3"}  # s2 is being read
    connection.detach("s2")
    assert connection.prune() == 1
    assert set(connection.session_streams) == {"s3"}
