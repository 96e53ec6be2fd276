"""Readiness on its own: the verdict and the snapshot, with fake pods and a real supervisor.

The pods are plain records with the fields readiness reads (health, feed, credentials,
placeability); the store is the real `MemoryStore`, the supervisor and metrics are real.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from grpc_health.v1 import health

from router.metrics import Metrics
from router.readiness import Readiness
from router.store import MemoryStore
from router.supervisor import Backoff, Supervisor
from tests.waiting import eventually


def pod(name: str, *, healthy: bool = True, rejected: str = "") -> SimpleNamespace:
    return SimpleNamespace(name=name, address=f"{name}:50051", healthy=healthy, draining=False,
                           feed_up=healthy, last_error="", credentials_rejected=rejected,
                           placeable=healthy and not rejected, not_placeable_reason="")


class Pods(list):  # the roster readiness iterates; len() is its pod count
    pass


def readiness(pods: list[SimpleNamespace], supervisor: Supervisor | None = None) -> Readiness:
    locator: Any = SimpleNamespace(near={})
    return Readiness(pods=Pods(pods), store=MemoryStore(), locator=locator,  # type: ignore[arg-type]
                     supervisor=supervisor or Supervisor(), metrics=Metrics(),
                     health_servicer=health.aio.HealthServicer(), drain_sync_s=60)


def test_ready_while_one_healthy_pod_accepts_the_routers_token() -> None:
    state = readiness([pod("a", healthy=False), pod("b", rejected="UNAUTHENTICATED"), pod("c")])
    state.refresh()
    assert state.snapshot["ready"] is True and state.snapshot["reason"] == ""
    assert state.snapshot["healthy_pods"] == 2 and state.snapshot["feeds_up"] == 2


def test_not_ready_when_every_healthy_pod_rejects_the_token_and_the_reason_says_what_to_do(
) -> None:
    state = readiness([pod("a", rejected="UNAUTHENTICATED"), pod("b", healthy=False)])
    state.refresh()
    assert state.snapshot["ready"] is False
    assert state.snapshot["reason"].startswith(
        "every healthy pod rejects the router's credentials (a): give the router a token")


def test_no_pods_and_no_healthy_pod_are_told_apart() -> None:
    empty = readiness([])
    empty.refresh()
    down = readiness([pod("a", healthy=False)])
    down.refresh()
    assert (empty.snapshot["reason"], down.snapshot["reason"]) == ("no pods", "no healthy pod")


def test_shutting_down_is_never_ready_whatever_the_pods() -> None:
    state = readiness([pod("a")])
    state.shutting_down = True
    state.refresh()
    assert (state.snapshot["ready"], state.snapshot["reason"]) == (False, "shutting down")


async def test_a_crashed_service_is_listed_down_without_changing_readiness() -> None:
    supervisor = Supervisor()

    async def broken() -> None:
        raise ConnectionResetError("store client bug")

    async def fine() -> None:
        await asyncio.Event().wait()

    supervisor.spawn("store_writer:macp", broken, backoff=Backoff(base_s=60, max_s=60))
    supervisor.spawn("sweeper:macp", fine)
    state = readiness([pod("a")], supervisor)
    await eventually(lambda: (supervisor.state("store_writer:macp").crashes == 1  # type: ignore[union-attr]
                              and supervisor.state("sweeper:macp").up),  # type: ignore[union-attr]
                     timeout=10, what="one crashed, one running")
    state.refresh()
    assert state.snapshot["ready"] is True
    assert state.snapshot["services_down"] == ["store_writer:macp"]
    writer = state.snapshot["services"]["store_writer:macp"]
    assert (writer["up"], writer["crashes"], writer["last_error"]) == (
        False, 1, "ConnectionResetError: store client bug")
    assert state.snapshot["services"]["sweeper:macp"]["up"] is True
    await supervisor.aclose()
