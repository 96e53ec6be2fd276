"""The supervisor: crashes are logged, counted, shown as down and restarted; stop is bounded."""

from __future__ import annotations

import asyncio
import logging

import pytest

from router.supervisor import Backoff, ServiceState, Supervisor
from tests.waiting import eventually

FAST = Backoff(base_s=0.001, max_s=0.002)


async def test_a_crashing_service_is_logged_counted_and_restarted(caplog) -> None:
    crashes: list[tuple[str, str]] = []
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise ValueError(f"bad event #{runs}")
        await asyncio.Event().wait()

    supervisor = Supervisor(on_crash=lambda name, exc: crashes.append((name, str(exc))))
    with caplog.at_level(logging.ERROR, logger="router.supervisor"):
        state = supervisor.spawn("feed:a", flaky, backoff=FAST)
        await eventually(lambda: runs == 3 and state.up, timeout=10, what="third run up")
    await supervisor.aclose()
    assert crashes == [("feed:a", "bad event #1"), ("feed:a", "bad event #2")]
    assert state.crashes == 2 and state.starts == 3
    assert state.last_error == "ValueError: bad event #2"
    crash_logs = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert len(crash_logs) == 2 and all(r.exc_info for r in crash_logs), "traceback logged"


async def test_an_exception_outside_the_services_own_handling_is_never_reported_up() -> None:
    """A protobuf DecodeError is neither ValueError nor RuntimeError: whatever the type, the
    service is down from the instant it raises until it runs again."""

    class DecodeError(Exception):
        pass

    seen: list[bool] = []
    gate = asyncio.Event()

    async def feed() -> None:
        if not gate.is_set():
            raise DecodeError("Error parsing message")
        await asyncio.Event().wait()

    supervisor = Supervisor(on_state=lambda s: seen.append(s.up))
    state = supervisor.spawn("feed:b", feed, backoff=Backoff(base_s=60, max_s=60))
    await eventually(lambda: state.crashes == 1, timeout=10, what="first crash")
    assert not state.up and state.last_error.startswith("DecodeError")
    assert [s.name for s in supervisor.down()] == ["feed:b"]
    await supervisor.aclose()
    assert seen == [True, False]


async def test_a_service_comes_back_up_after_its_backoff() -> None:
    fail = True

    async def feed() -> None:
        if fail:
            raise ConnectionError("pod gone")
        await asyncio.Event().wait()

    supervisor = Supervisor()
    state = supervisor.spawn("feed:c", feed, backoff=Backoff(base_s=0.05, max_s=0.05))
    await eventually(lambda: state.crashes >= 1, timeout=10, what="crash")
    fail = False
    await eventually(lambda: state.up, timeout=10, what="back up")
    assert supervisor.down() == []
    await supervisor.aclose()


async def test_a_once_service_that_returns_is_not_restarted() -> None:
    runs = 0

    async def job() -> None:
        nonlocal runs
        runs += 1

    supervisor = Supervisor()
    state = supervisor.spawn("replay:a", job, backoff=FAST, once=True)
    await eventually(lambda: not state.up and state.starts == 1, timeout=10, what="done")
    await asyncio.sleep(0.01)  # a restart, if any, would need only FAST's 2 ms
    assert runs == 1
    await supervisor.aclose()


async def test_aclose_cancels_every_service_and_names_one_that_does_not_stop(caplog) -> None:
    stubborn_released = asyncio.Event()

    async def polite() -> None:
        await asyncio.Event().wait()

    async def stubborn() -> None:
        while not stubborn_released.is_set():
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                await stubborn_released.wait()

    supervisor = Supervisor(stop_timeout_s=0.1)
    polite_state = supervisor.spawn("sweep", polite)
    supervisor.spawn("stubborn", stubborn)
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="router.supervisor"):
        await supervisor.aclose()
    assert "did not stop within 0.1s: stubborn" in caplog.text
    assert not polite_state.up
    with pytest.raises(RuntimeError, match="stopping"):
        supervisor.spawn("late", polite)
    stubborn_released.set()
    await asyncio.sleep(0.01)


async def test_two_services_cannot_share_a_name() -> None:
    async def body() -> None:
        await asyncio.Event().wait()

    supervisor = Supervisor()
    supervisor.spawn("feed:a", body)
    with pytest.raises(ValueError, match="already running"):
        supervisor.spawn("feed:a", body)
    await supervisor.stop("feed:a")
    assert supervisor.state("feed:a") is None
    supervisor.spawn("feed:a", body)  # a stopped name can be used again
    await supervisor.aclose()


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    backoff = Backoff(base_s=0.1, max_s=1.0)
    for streak, ceiling in [(0, 0.1), (1, 0.2), (3, 0.8), (4, 1.0), (30, 1.0)]:
        delays = [backoff.delay(streak) for _ in range(50)]
        assert all(ceiling * 0.5 <= d <= ceiling for d in delays), (streak, min(delays))


def test_service_state_starts_down() -> None:
    assert not ServiceState("x").up


async def test_a_finished_job_is_done_not_down_and_leaves_the_table() -> None:
    release = asyncio.Event()
    runs: list[str] = []

    async def replay() -> None:
        runs.append("replay")
        await release.wait()

    supervisor = Supervisor()
    first = supervisor.spawn_job("replay:a", replay, backoff=FAST)
    second = supervisor.spawn_job("replay:a", replay, backoff=FAST)  # same pod, still running
    assert first.name == "replay:a" and second.name.startswith("replay:a#")
    assert first.kind == second.kind == "replay"
    await eventually(lambda: runs == ["replay", "replay"], timeout=10, what="both jobs run")
    assert supervisor.running("replay:a") and supervisor.running(second.name)
    release.set()
    await eventually(lambda: first.done and second.done, timeout=10, what="both jobs done")
    assert supervisor.down() == [] and list(supervisor.states()) == []
    assert not supervisor.running("replay:a")
    await supervisor.aclose()


async def test_a_job_that_raises_is_restarted_until_it_completes() -> None:
    attempts = 0

    async def forget() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise KeyError("pod a")

    crashed: list[str] = []
    supervisor = Supervisor(on_crash=lambda name, exc: crashed.append(name))
    state = supervisor.spawn_job("forget_pod:a", forget, backoff=FAST)
    await eventually(lambda: state.done, timeout=10, what="the job completed")
    assert attempts == 2 and crashed == ["forget_pod:a"] and state.crashes == 1
    await supervisor.aclose()


async def test_a_failing_state_callback_never_stops_a_service(caplog) -> None:
    def broken_report(state: ServiceState) -> None:
        raise RuntimeError("metrics registry gone")

    supervisor = Supervisor(on_state=broken_report,
                            on_crash=lambda name, exc: broken_report(ServiceState(name)))
    runs = 0

    async def body() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise ValueError("first run fails")
        await asyncio.Event().wait()

    with caplog.at_level(logging.ERROR, logger="router.supervisor"):
        state = supervisor.spawn("sweeper", body, backoff=FAST)
        await eventually(lambda: runs == 2 and state.up, timeout=10, what="restarted and up")
    assert "state callback failed for background service sweeper" in caplog.text
    assert "crash callback failed for background service sweeper" in caplog.text
    await supervisor.aclose()
    assert supervisor.closing


def test_the_kind_of_a_service_is_its_name_before_the_instance() -> None:
    assert [ServiceState(n).kind for n in ("watch:pod-a", "replay:b#3", "status", "dns:x:53")] \
        == ["watch", "replay", "status", "dns"]


async def test_a_service_not_yet_scheduled_is_starting_not_down() -> None:
    async def body() -> None:
        await asyncio.Event().wait()

    supervisor = Supervisor()
    state = supervisor.spawn("status", body)
    assert not state.up and supervisor.down() == []  # spawned, its task not run yet
    await eventually(lambda: state.up, timeout=10, what="running")
    await supervisor.aclose()
    assert supervisor.down() == [state]


async def test_cancel_stops_a_service_at_once_for_a_synchronous_caller() -> None:
    """(A pod leaving: its feed must stop before its channels close, from a plain callback.)"""
    async def feed() -> None:
        await asyncio.Event().wait()

    supervisor = Supervisor()
    state = supervisor.spawn("watch:a", feed)
    await eventually(lambda: state.up, timeout=10, what="running")
    task = supervisor.cancel("watch:a")
    assert task is not None and supervisor.state("watch:a") is None
    assert not supervisor.running("watch:a")
    await asyncio.wait({task}, timeout=2)
    assert task.cancelled() and not state.up
    assert supervisor.cancel("watch:a") is None  # already gone: nothing to cancel
    await supervisor.aclose()
