"""The one pod health state machine (`router.core.health.PodHealth`) driven by fake checks.

No sockets: a `ScriptedPod` feeds the state machine the results a health check or a call would
give (serving, failed, silent, credentials refused), the way `router.pods.Pod` and
`router.acp.pods.AcpPod` do, and its health loop runs under a real `Supervisor`.
"""

from __future__ import annotations

import asyncio

import pytest

from router.acp.pods import AcpPod
from router.core.health import HealthState, PodHealth
from router.pods import Pod
from router.supervisor import Backoff, Supervisor
from tests.waiting import eventually


class ScriptedPod(PodHealth):
    """A pod whose health checks answer from a script: "ok", "fail", or an exception."""

    def __init__(self, name: str = "a") -> None:
        super().__init__()
        self.name = name
        self.describe = f"pod {name}"
        self.script: list[object] = []
        self.changes: list[bool] = []
        self.on_health_change = lambda pod: self.changes.append(pod.healthy)
        self.answers_calls = True

    def check(self) -> None:
        """One health check, as `Pod.check_health` reads it."""
        result = self.script.pop(0)
        if isinstance(result, BaseException):
            raise result
        if result == "ok":
            if not self.silent or self.answers_calls:
                self.report_success()
        else:
            self.check_failed(f"health check failed: {result}")
        self.checked()

    async def health_loop(self) -> None:
        while True:
            if self.script:
                self.check()
            await self.pause(0.01)


def test_a_new_pod_is_unchecked_and_not_placeable_until_a_check_answers() -> None:
    pod = ScriptedPod()
    assert pod.health is HealthState.UNCHECKED
    assert pod.not_placeable_reason == "unhealthy (no health answer yet)"
    pod.script = ["ok"]
    pod.check()
    assert pod.health is HealthState.HEALTHY and pod.placeable
    assert pod.changes == [True]


def test_a_failed_call_marks_the_pod_failed_with_the_reason_and_wakes_the_loop() -> None:
    pod = ScriptedPod()
    pod.report_success()
    pod._wake.clear()
    pod.report_failure("connection refused")
    assert pod.health is HealthState.FAILED
    assert pod.not_placeable_reason == "unhealthy (connection refused)"
    assert pod._wake.is_set()  # the health loop checks again now, not after its interval


def test_repeated_reports_without_a_change_fire_no_callback() -> None:
    pod = ScriptedPod()
    pod.report_success()
    pod.report_success()
    pod.report_failure("x")
    pod.report_failure("y")
    pod.check_failed("z")
    assert pod.changes == [True, False]  # the no-change guard
    assert pod.last_error == "z"


def test_a_failing_check_on_an_unhealthy_pod_keeps_it_failed_with_the_newer_reason() -> None:
    pod = ScriptedPod()
    pod.script = ["fail", "ok", "NOT_SERVING"]
    pod.check()
    assert pod.health is HealthState.FAILED and pod.changes == []
    pod.check()
    assert pod.healthy
    pod.check()
    assert pod.health is HealthState.FAILED
    assert pod.last_error == "health check failed: NOT_SERVING"


def test_a_silent_pod_stays_unhealthy_until_it_answers_a_call_not_just_its_health_check() -> None:
    pod = ScriptedPod()
    pod.report_success()
    pod.report_silent("probe: no answer within 250 ms")
    assert pod.health is HealthState.SILENT
    pod.answers_calls = False
    pod.script = ["ok", "ok"]
    pod.check()
    assert pod.health is HealthState.SILENT  # its health endpoint answers, its calls do not
    pod.answers_calls = True
    pod.check()
    assert pod.health is HealthState.HEALTHY and not pod.silent


def test_draining_is_not_placeable_but_stays_healthy() -> None:
    pod = ScriptedPod()
    pod.report_success()
    pod.draining = True
    assert pod.healthy and not pod.placeable
    assert pod.not_placeable_reason == "draining"


def test_credentials_rejected_is_reported_once_per_episode() -> None:
    pod = ScriptedPod()
    seen: list[str] = []
    pod.on_health_change = lambda p: seen.append(p.credentials_rejected)
    pod.report_credentials_rejected("watch", "UNAUTHENTICATED", "bad token")
    pod.report_credentials_rejected("probe", "UNAUTHENTICATED", "bad token")
    assert pod.credentials_rejected == "probe answered UNAUTHENTICATED: bad token"
    pod.report_credentials_accepted()
    pod.report_credentials_accepted()
    assert seen == ["watch answered UNAUTHENTICATED: bad token", ""]


async def test_wait_healthy_returns_when_a_check_answers_and_times_out_otherwise() -> None:
    pod = ScriptedPod()
    assert await pod.wait_healthy(0.01) is False
    waiter = asyncio.create_task(pod.wait_healthy(5))
    await asyncio.sleep(0)
    pod.report_success()
    assert await waiter is True


async def test_a_crashing_health_loop_is_restarted_by_the_supervisor_and_health_goes_on() -> None:
    pod = ScriptedPod()
    pod.script = ["ok", RuntimeError("check blew up"), "fail", "ok"]
    crashes: list[str] = []
    supervisor = Supervisor(on_crash=lambda name, exc: crashes.append(f"{name}: {exc}"))
    try:
        state = supervisor.spawn("health:a", pod.health_loop,
                                 backoff=Backoff(base_s=0.001, max_s=0.002))
        await eventually(lambda: not pod.script, timeout=5, what="every scripted check ran")
        assert crashes == ["health:a: check blew up"]
        assert pod.healthy and pod.changes == [True, False, True]
        await eventually(lambda: state.up, timeout=5, what="the loop runs again")
    finally:
        await supervisor.aclose()


async def test_pause_is_cut_short_by_a_failure_report() -> None:
    pod = ScriptedPod()
    pod.report_success()
    sleeper = asyncio.create_task(pod.pause(30))
    await asyncio.sleep(0)
    pod.report_failure("forward failed")
    await asyncio.wait_for(sleeper, 1)


@pytest.mark.parametrize("pod_class", [Pod, AcpPod])
def test_both_protocols_pods_use_the_one_state_machine(pod_class: type) -> None:
    assert issubclass(pod_class, PodHealth)
    for method in ("report_failure", "report_silent", "report_success", "_set_healthy",
                   "wait_healthy", "pause"):
        assert getattr(pod_class, method) is getattr(PodHealth, method), method
