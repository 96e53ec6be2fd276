"""Shared fixtures: real servers on loopback (simulated pods, routers, Redis)."""

from __future__ import annotations

import asyncio
import gc
import inspect
import sys
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


def _dump_tasks(loop: asyncio.AbstractEventLoop, test: str) -> None:
    print(f"--- {test} is about to time out; every task of its event loop:", file=sys.stderr)
    for task in asyncio.all_tasks(loop):
        print(f"task {task.get_name()}:", file=sys.stderr)
        task.print_stack(limit=12, file=sys.stderr)


@pytest.fixture(autouse=True)
def _tasks_dumped_before_a_timeout(request: pytest.FixtureRequest) -> Iterator[None]:
    """For a coroutine test: 5 s before pytest-timeout fires, print where each task of the
    test's loop waits. The timeout's own dump shows threads only, and a hung asyncio test is
    a loop idling in select()."""
    if not inspect.iscoroutinefunction(getattr(request.node, "obj", None)):
        yield
        return
    marker = request.node.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker and marker.args else float(
        request.config.getini("timeout") or 0)
    handle = None
    if timeout > 10:
        asyncio_marker = request.node.get_closest_marker("asyncio")
        scope = asyncio_marker.kwargs.get("loop_scope", "function") if asyncio_marker else (
            "function")
        try:  # pytest-asyncio >= 1.0 runs each loop in a Runner fixture of this name
            loop = request.getfixturevalue(f"_{scope}_scoped_runner").get_loop()
        except pytest.FixtureLookupError:
            loop = None
        if loop is not None:
            handle = loop.call_later(timeout - 5, _dump_tasks, loop, request.node.nodeid)
    yield
    if handle is not None:
        handle.cancel()


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
