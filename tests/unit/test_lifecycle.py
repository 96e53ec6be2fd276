"""The lifecycle: stages start in order, stop in reverse, every stop bounded and named."""

from __future__ import annotations

import asyncio
import logging

import pytest

from router.lifecycle import Lifecycle, Stage


def recording(events: list[str], name: str, *, fail_start: bool = False,
              fail_stop: bool = False, hang_stop: asyncio.Event | None = None,
              stop_timeout_s: float = 1.0) -> Stage:
    async def start() -> None:
        events.append(f"start {name}")
        if fail_start:
            raise OSError(f"{name}: address in use")

    async def stop() -> None:
        events.append(f"stop {name}")
        if fail_stop:
            raise RuntimeError(f"{name}: already closed")
        if hang_stop is not None:
            await hang_stop.wait()

    return Stage(name, start, stop, stop_timeout_s)


async def test_stages_start_in_order_and_stop_in_reverse() -> None:
    events: list[str] = []
    lifecycle = Lifecycle([recording(events, n) for n in ("store", "pods", "feeds", "servers")])
    await lifecycle.start()
    assert lifecycle.started == ["store", "pods", "feeds", "servers"]
    await lifecycle.stop()
    assert events == ["start store", "start pods", "start feeds", "start servers",
                      "stop servers", "stop feeds", "stop pods", "stop store"]
    assert lifecycle.started == []


async def test_a_failed_start_stops_the_failed_stage_and_those_before_it_in_reverse() -> None:
    events: list[str] = []
    lifecycle = Lifecycle([recording(events, "store"), recording(events, "pods"),
                           recording(events, "servers", fail_start=True),
                           recording(events, "status")])
    with pytest.raises(OSError, match="servers: address in use"):
        await lifecycle.start()
    assert events == ["start store", "start pods", "start servers",
                      "stop servers", "stop pods", "stop store"]
    await lifecycle.stop()  # nothing left to stop
    assert events[-1] == "stop store"


async def test_a_hanging_stop_is_named_in_the_log_and_the_next_stages_still_stop(caplog) -> None:
    events: list[str] = []
    never = asyncio.Event()
    lifecycle = Lifecycle([recording(events, "store"),
                           recording(events, "watch feeds", hang_stop=never,
                                     stop_timeout_s=0.05),
                           recording(events, "servers")])
    await lifecycle.start()
    with caplog.at_level(logging.WARNING, logger="macp_router.lifecycle"):
        async with asyncio.timeout(2):
            await lifecycle.stop()
    assert events[3:] == ["stop servers", "stop watch feeds", "stop store"]
    assert "shutdown: watch feeds did not stop within 0.1s" in caplog.text


async def test_a_stop_that_raises_is_logged_with_its_traceback_and_stopping_goes_on(
    caplog,
) -> None:
    events: list[str] = []
    lifecycle = Lifecycle([recording(events, "store"), recording(events, "locator",
                                                                 fail_stop=True)])
    await lifecycle.start()
    with caplog.at_level(logging.ERROR, logger="macp_router.lifecycle"):
        await lifecycle.stop()
    assert events[2:] == ["stop locator", "stop store"]
    failed = [r for r in caplog.records if "stopping locator failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None


async def test_a_stop_timeout_can_be_read_at_stop_time(caplog) -> None:
    """The servers' stop is bounded by the shutdown grace chosen when stop is called."""
    grace = {"s": 10.0}
    never = asyncio.Event()

    async def stop_server() -> None:
        await never.wait()

    lifecycle = Lifecycle([Stage("gRPC server", stop=stop_server,
                                 stop_timeout_s=lambda: grace["s"])])
    await lifecycle.start()
    grace["s"] = 0.05
    with caplog.at_level(logging.WARNING, logger="macp_router.lifecycle"):
        async with asyncio.timeout(2):
            await lifecycle.stop()
    assert "gRPC server did not stop within 0.1s" in caplog.text


async def test_stop_before_start_and_a_second_stop_do_nothing() -> None:
    events: list[str] = []
    lifecycle = Lifecycle([recording(events, "store")])
    await lifecycle.stop()
    assert events == []
    await lifecycle.start()
    await lifecycle.stop()
    await lifecycle.stop()
    assert events == ["start store", "stop store"]


async def test_a_lifecycle_starts_once_per_stop() -> None:
    lifecycle = Lifecycle([Stage("store")])
    await lifecycle.start()
    with pytest.raises(RuntimeError, match="already started"):
        await lifecycle.start()
    await lifecycle.stop()
    await lifecycle.start()  # stopped: it can start again
    await lifecycle.stop()


def test_stage_names_are_unique() -> None:
    with pytest.raises(ValueError, match="unique: store"):
        Lifecycle([Stage("store"), Stage("pods"), Stage("store")])


def test_the_router_stops_accepting_calls_before_it_closes_what_calls_use() -> None:
    """The router's own stage list: serving starts last and stops first; the feeds and pods
    stop before the locator flushes to the store; every service still running stops last."""
    from router.app import Router
    from router.config import RouterConfig
    from router.pods import PodSpec

    router = Router(RouterConfig(listen="127.0.0.1:0", pods=(PodSpec("a", "127.0.0.1:9"),),
                                 token="router"))  # built, never started: no socket
    names = [stage.name for stage in router.lifecycle.stages]
    stop_order = names[::-1]
    assert names[0] == "background services" and stop_order[-1] == "background services"
    assert stop_order[:2] == ["readiness and drain sync", "gRPC server"]
    for earlier, later in [("gRPC server", "ACP front door"),
                           ("ACP front door", "DNS discovery"),
                           ("DNS discovery", "pods and their watch feeds"),
                           ("pods and their watch feeds", "locator"),
                           ("locator", "store"),
                           ("store", "router token file watch")]:
        assert stop_order.index(earlier) < stop_order.index(later), (earlier, later)
    assert router.supervisor is not None and list(router.supervisor.states()) == []
