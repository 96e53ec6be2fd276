"""The ACP front door's transport surface: what acp's Streamable HTTP transport defines, bad
input answered with the right HTTP or JSON-RPC error (original ids kept, types included), other
transports (WebSocket clients, http upstreams), and metrics labelled by protocol."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from acp._sse import parse_sse_stream
from acp.exceptions import RequestError

from router.app import Router
from router.config import RouterConfig
from router.metrics import Metrics
from router.pods import PodSpec
from tests import macp_calls
from tests.acp_support import T, acp_cluster, connect

pytestmark = pytest.mark.timeout(60)

JSON = {"Content-Type": "application/json"}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": 1}}


def rpc(id_: Any, method: Any, params: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "method": method}
    if params is not None:
        message["params"] = params
    return message


async def next_event(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    return await asyncio.wait_for(events.__anext__(), T)


async def test_transport_errors_are_the_ones_acp_defines_and_nothing_breaks(
    tmp_path: Path,
) -> None:
    async with acp_cluster(tmp_path, count=2) as cluster, httpx.AsyncClient(timeout=T) as http:
        url = cluster.url
        bad = await http.post(url, content=b'{"jsonrpc": "2.0", "id": 1, "meth', headers=JSON)
        assert (bad.status_code, bad.json()) == (400, {"error": "Invalid JSON"})
        plain = await http.post(url, content=json.dumps(INIT),
                                headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415
        batch = await http.post(url, json=[INIT])
        assert batch.status_code == 501
        scalar = await http.post(url, json=42)
        assert (scalar.status_code, scalar.json()) == (400, {"error": "Invalid JSON-RPC message"})
        no_conn = await http.post(url, json=rpc(2, "session/new", {"cwd": "/"}))
        assert (no_conn.status_code, no_conn.json()) == (400, {"error": "Missing connection id"})
        unknown = await http.post(url, json=rpc(2, "session/new", {"cwd": "/"}),
                                  headers={"Acp-Connection-Id": "no-such-connection"})
        assert (unknown.status_code, unknown.json()) == (404, {"error": "Unknown connection id"})
        get_unknown = await http.get(url, headers={"Accept": "text/event-stream",
                                                   "Acp-Connection-Id": "no-such-connection"})
        assert get_unknown.status_code == 404
        delete_unknown = await http.delete(url, headers={"Acp-Connection-Id": "nope"})
        assert delete_unknown.status_code == 404

        init = await http.post(url, json=INIT)
        assert init.status_code == 200
        body = init.json()
        assert body["id"] == 1 and isinstance(body["id"], int)
        caps = body["result"]["agentCapabilities"]
        assert caps["sessionCapabilities"]["status"] == {}
        assert caps["loadSession"] is True
        cid = init.headers["Acp-Connection-Id"]
        headers = {"Acp-Connection-Id": cid}
        no_accept = await http.get(url, headers={**headers, "Accept": "application/json"})
        assert no_accept.status_code == 406
        unknown_session = await http.get(
            url, headers={**headers, "Accept": "text/event-stream", "Acp-Session-Id": "nope"}
        )
        assert (unknown_session.status_code, unknown_session.json()) == (
            404, {"error": "Unknown session id"})
        missing_header = await http.post(
            url, json=rpc(3, "session/prompt", {"sessionId": "s", "prompt": []}), headers=headers
        )
        assert (missing_header.status_code, missing_header.json()) == (
            400, {"error": "Missing session id header"})

        async with http.stream("GET", url, headers={**headers, "Accept": "text/event-stream"},
                               timeout=httpx.Timeout(T, read=None)) as stream:
            assert stream.status_code == 200
            events = parse_sse_stream(stream.aiter_bytes())

            async def ask(message: dict[str, Any], **extra: str) -> dict[str, Any]:
                posted = await http.post(url, json=message, headers={**headers, **extra})
                assert posted.status_code == 202, posted.text
                return await next_event(events)

            answer = await ask(rpc("abc", "foo/bar", {}))
            assert answer["id"] == "abc" and answer["error"]["code"] == -32601
            answer = await ask(rpc(8, "session/status", {}))
            assert answer["id"] == 8 and isinstance(answer["id"], int)
            assert answer["error"]["code"] == -32602
            answer = await ask(rpc(9, "session/prompt", {"prompt": []}), **{"Acp-Session-Id": "s"})
            assert answer["id"] == 9 and answer["error"]["code"] == -32602
            answer = await ask(rpc(10, 12345))
            assert answer["id"] == 10 and answer["error"]["code"] == -32600
            answer = await ask(rpc("x1", "session/status", {"sessionId": "sess_nowhere"}))
            assert answer == {"jsonrpc": "2.0", "id": "x1", "result": {"status": "not_found"}}
            answer = await ask(rpc(11.5, "session/new", {"cwd": "/", "mcpServers": []}))
            assert answer["id"] == 11.5 and answer["result"]["sessionId"].startswith("sess_")
            # A response to a request nobody made, and a notification: accepted, ignored.
            stray = await http.post(url, json={"jsonrpc": "2.0", "id": 99, "result": {}},
                                    headers=headers)
            assert stray.status_code == 202
            note = await http.post(url, json={"jsonrpc": "2.0", "method": "session/cancel",
                                              "params": {"sessionId": "sess_nowhere"}},
                                   headers={**headers, "Acp-Session-Id": "sess_nowhere"})
            assert note.status_code == 202

        deleted = await http.delete(url, headers=headers)
        assert deleted.status_code == 202
        gone = await http.post(url, json=rpc(12, "session/list", {}), headers=headers)
        assert gone.status_code == 404

        # The router is unharmed: a real client still works end to end.
        client = await cluster.client()
        sid = await client.new()
        assert await client.prompt(sid, "still fine") == "end_turn"


async def test_websocket_clients_are_routed_like_http_ones(tmp_path: Path) -> None:
    async with acp_cluster(tmp_path, count=2) as cluster:
        client = await connect(cluster.url, websocket=True)
        cluster.clients.append(client)
        sid = await client.new()
        assert await client.status(sid) == "live"
        assert await client.prompt(sid, "ask permission over a websocket") == "end_turn"
        assert "permission: allow" in client.recorder.texts(sid)


async def test_http_upstreams_route_new_sessions_prompts_and_status(tmp_path: Path) -> None:
    async with acp_cluster(tmp_path, count=2, upstream_transport="http") as cluster:
        client = await cluster.client()
        sids = [await client.new() for _ in range(4)]
        for sid in sids:
            assert await client.prompt(sid, "ask permission over http") == "end_turn"
            assert await client.status(sid) == "live"
            assert "permission: allow" in client.recorder.texts(sid)
        assert sum(cluster.calls("session/prompt").values()) == 4


async def test_metrics_carry_a_protocol_label(tmp_path: Path, sim_pods: Any) -> None:
    metrics = Metrics()
    macp_pods = await sim_pods(2)
    router = Router(RouterConfig(
        listen="127.0.0.1:0", pods=tuple(PodSpec(pod.name, pod.address) for pod in macp_pods),
        token="router", health_interval_ms=200,
    ), metrics=metrics)
    await router.start()
    try:
        assert await router.wait_ready(10)
        async with grpc.aio.insecure_channel(router.address) as channel:
            await macp_calls.start(channel)
        async with acp_cluster(tmp_path, count=2, metrics=metrics) as cluster:
            client = await cluster.client()
            sid = await client.new()
            await client.prompt(sid, "hello")
            await client.status("sess_nowhere")
            sample = metrics.registry.get_sample_value
            requests = {
                s.labels["protocol"]: s.value for family in metrics.requests.collect()
                for s in family.samples if s.name == "macp_router_requests_total"
            }
            assert requests.get("macp", 0) >= 1 and requests.get("acp", 0) >= 1
            [holder] = cluster.holders(sid)
            assert sample("macp_router_requests_total", {
                "protocol": "acp", "method": "session/prompt", "route": "session",
                "pod": holder, "code": "OK"}) == 1
            assert sample("macp_router_locate_total",
                          {"protocol": "acp", "result": "not_found"}) == 1
            assert sample("macp_router_probes_total",
                          {"protocol": "acp", "pod": "a", "result": "not_found"}) == 1
            assert sample("macp_router_pod_up", {"protocol": "acp", "pod": "a"}) == 1
            protocols = {
                s.labels["protocol"] for family in metrics.registry.collect()
                for s in family.samples if "protocol" in s.labels
            }
            assert protocols == {"macp", "acp"}
    finally:
        await router.stop(grace=0)


async def test_a_client_that_vanished_without_delete_is_reaped_and_live_ones_are_not(
    tmp_path: Path,
) -> None:
    async with acp_cluster(tmp_path, count=2, connection_idle_s=0.3) as cluster, \
            httpx.AsyncClient(timeout=T) as http:
        live = await cluster.client()  # keeps its connection stream open
        sid = await live.new()
        init = await http.post(cluster.url, json=INIT)  # initializes, never opens a stream
        cid = init.headers["Acp-Connection-Id"]
        deadline = asyncio.get_running_loop().time() + T
        while cluster.frontdoor.connections.get(cid) is not None:
            assert asyncio.get_running_loop().time() < deadline, "idle connection never reaped"
            await asyncio.sleep(0.05)
        gone = await http.post(cluster.url, json=rpc(2, "session/list", {}),
                               headers={"Acp-Connection-Id": cid})
        assert gone.status_code == 404
        await asyncio.sleep(0.5)  # longer than the idle limit: the open stream keeps it
        assert await live.prompt(sid, "still connected") == "end_turn"


async def test_http_upstream_refusal_after_a_load_is_explained_and_keeps_the_pod_healthy(
    tmp_path: Path,
) -> None:
    # acp 0.12.1's HTTP server registers a session on a connection only when a response result
    # carries its sessionId (session/new's does, session/load's does not).
    async with acp_cluster(tmp_path, count=1, upstream_transport="http") as cluster:
        direct = await cluster.direct("a")
        stored = await direct.new()
        await direct.call("session/close", {"sessionId": stored})
        client = await cluster.client()
        created = await client.new()
        await client.load(stored)
        with pytest.raises(RequestError) as excinfo:
            await client.prompt(stored, "hello")
        assert "--acp-upstream ws" in str(excinfo.value)
        assert excinfo.value.data["httpStatus"] == 404
        assert cluster.frontdoor.roster.is_healthy("a")
        assert await client.prompt(created, "the same upstream still works") == "end_turn"
