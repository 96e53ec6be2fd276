"""Shared fixtures: real servers on loopback (simulated pods, routers, Redis)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from router.app import Router
from router.config import RouterConfig
from router.pods import PodSpec
from router.sim import SimPod
from tests.pod_auth import ROUTER_TOKEN, pod_options

pytest_plugins = ["tests.redis_fixture"]


@pytest.fixture(autouse=True)
def _collect_grpc_garbage() -> Iterator[None]:
    """Collect each test's garbage right after it.

    grpc.aio objects left for the cyclic GC outlive their test's event loop; collected at an
    arbitrary later moment (once, inside pytest's terminal summary) grpc's engine shutdown
    waited forever for its poller thread and the run never ended.
    """
    yield
    gc.collect()

PodsFactory = Callable[..., Awaitable[list[SimPod]]]
RouterFactory = Callable[..., Awaitable[Router]]


@pytest.fixture
async def sim_pods() -> AsyncIterator[PodsFactory]:
    """`await sim_pods(3)` -> started simulated pods a, b, c on free loopback ports.

    Each pod is configured as the runtime would be in a deployment (`tests.pod_auth`: token
    entries for the router and the test agents, default rate limits); keyword arguments
    override single settings (e.g. `start_limit_per_minute=1000` for a test that starts many
    sessions from one sender, as an operator would raise it).
    """
    started: list[SimPod] = []

    async def make(count: int = 3, **kwargs: object) -> list[SimPod]:
        pods = []
        for _ in range(count):
            pod = SimPod(chr(ord("a") + len(started)), "127.0.0.1:0", **pod_options(**kwargs))
            await pod.start()
            started.append(pod)
            pods.append(pod)
        return pods

    yield make
    for pod in started:
        await pod.stop()


@pytest.fixture
async def make_router() -> AsyncIterator[RouterFactory]:
    """`await make_router(pods, **config)` -> an in-process router whose feeds are up."""
    routers: list[Router] = []

    async def make(pods: list[SimPod], *, wait: bool = True, **overrides: object) -> Router:
        settings: dict[str, object] = {
            "listen": "127.0.0.1:0",
            "pods": tuple(PodSpec(pod.name, pod.address) for pod in pods),
            "token": ROUTER_TOKEN,
            "health_interval_ms": 200,
        }
        settings.update(overrides)
        router = Router(RouterConfig(**settings))  # type: ignore[arg-type]
        await router.start()
        routers.append(router)
        if wait:
            assert await router.wait_ready(10), "router feeds did not come up"
        return router

    yield make
    for router in routers:
        await router.stop(grace=0)


@pytest.fixture
async def named_pods(tmp_path) -> AsyncIterator[Callable[..., Awaitable[list[SimPod]]]]:
    """`await named_pods("a", "b", persist=True)` -> started pods with these names.

    With `persist`, each pod gets its own state file under `tmp_path`, so a pod that is
    stopped and started again comes back with its sessions (same name, same port).
    """
    started: list[SimPod] = []

    async def make(*names: str, persist: bool = False, **kwargs: object) -> list[SimPod]:
        pods = []
        for name in names:
            state_file = str(tmp_path / f"pod-{name}.json") if persist else None
            pod = SimPod(name, "127.0.0.1:0", state_file=state_file, **pod_options(**kwargs))
            await pod.start()
            started.append(pod)
            pods.append(pod)
        return pods

    yield make
    for pod in started:
        await pod.stop()
