"""The router's own health (grpc.health.v1, /healthz, /readyz) and gRPC server reflection."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from router.routes import SERVICE


async def test_grpc_health_follows_pods_and_http_endpoints_explain(sim_pods, make_router):
    pods = await sim_pods(2)
    router = await make_router(pods, metrics_listen="127.0.0.1:0")
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        def get(path: str) -> tuple[int, bytes]:
            url = f"http://127.0.0.1:{router.metrics_port}{path}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        assert (await asyncio.to_thread(get, "/healthz"))[0] == 200
        status, body = await asyncio.to_thread(get, "/readyz")
        detail = json.loads(body)
        assert status == 200 and detail["healthy_pods"] == 2 and detail["store"]["kind"] == "memory"

        for pod in pods:
            await pod.stop()
        deadline = time.monotonic() + 10
        while True:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            assert time.monotonic() < deadline, "router kept reporting SERVING with no pods"
            await asyncio.sleep(0.05)
        status, body = await asyncio.to_thread(get, "/readyz")
        assert status == 503 and "no healthy pod" in json.loads(body)["reason"]
        assert (await asyncio.to_thread(get, "/healthz"))[0] == 200  # alive, just not ready


async def test_server_reflection_lists_the_runtime_and_admin_services(sim_pods, make_router):
    router = await make_router(await sim_pods(1))
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        services = set()
        async for reply in call:
            services |= {s.name for s in reply.list_services_response.service}
    assert {SERVICE, "router.v1.RouterAdmin", "grpc.health.v1.Health"} <= services
