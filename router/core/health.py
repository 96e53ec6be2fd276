"""`PodHealth`: the one health state machine of a pod, for MACP and ACP pods alike.

A pod is in one of these states (`HealthState`), decided only by what the router observed:

    UNCHECKED  no check has answered yet
    HEALTHY    its last check answered, and no call failed since
    FAILED     a call, probe or check failed (connection refused, not serving, ...)
    SILENT     a call got no answer at all within its deadline: it accepts calls and never
               answers; it stays unhealthy until it answers a real call (`answer_check`),
               not merely its health endpoint

Orthogonal to health: `credentials_rejected` (the pod refuses the router's own token: a
configuration error, not silence) and `draining` (an operator stopped new sessions on it). A
protocol's pod class adds its own placement conditions (a MACP pod's feed and registry replay)
in `not_placeable_reason`.

Transitions: `report_failure` / `report_silent` (calls and probes), `check_failed` (a health
check), `report_success` (a check or call answered). Every transition goes through
`_set_healthy`, which has the no-change guard: a report that does not change `healthy` changes
neither the events nor the callbacks. The health loop sleeps with `router.aio.wait_event`
(`asyncio.wait_for` can swallow a cancel on 3.11) and is woken early by a failure.

Invariants:
- `healthy` is False from the first failure until a check answers (and, for a SILENT pod, a
  real call answers too).
- `on_health_change` is called exactly once per change of `healthy`, and once per change of
  `credentials_rejected` between "" and a reason.
- Unhealthy or draining pods are never placeable; the reason is always a sentence an operator
  can act on.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from typing import Any

from router.aio import wait_event
from router.supervisor import Supervisor

log = logging.getLogger("macp_router.pods")


class HealthState(enum.StrEnum):
    UNCHECKED = "unchecked"
    HEALTHY = "healthy"
    FAILED = "failed"
    SILENT = "silent"


class PodHealth:
    """Health, silence, credentials and drain state of one pod (see the module docstring)."""

    name: str
    describe: str
    """How log lines name the pod ("pod a (host:port)")."""

    def __init__(self) -> None:
        self.healthy = False
        self.silent = False
        self.draining = False
        self.last_error = ""
        self.credentials_rejected = ""
        """Why the pod rejects the router's own token ("" while it accepts it)."""
        self.checks = 0
        """Health checks answered (either way) so far."""
        self.on_health_change: Callable[[Any], None] | None = None
        self._wake = asyncio.Event()
        self._became_healthy = asyncio.Event()
        self._checked = asyncio.Event()
        self._supervisor: Supervisor | None = None
        self._own_supervisor = False

    @property
    def health(self) -> HealthState:
        if self.healthy:
            return HealthState.HEALTHY
        if self.silent:
            return HealthState.SILENT
        if self.checks == 0 and not self.last_error:
            return HealthState.UNCHECKED
        return HealthState.FAILED

    @property
    def placeable(self) -> bool:
        return not self.not_placeable_reason

    @property
    def not_placeable_reason(self) -> str:
        """Why the pod takes no new sessions ("" when it does)."""
        if not self.healthy:
            return f"unhealthy ({self.last_error or 'no health answer yet'})"
        if self.draining:
            return "draining"
        return ""

    # -- transitions -------------------------------------------------------------------------
    def report_failure(self, reason: str) -> None:
        """A forward, probe, feed or check failed in a way that says the pod is not answering."""
        self.last_error = reason
        if self.healthy:
            log.warning("%s marked unhealthy: %s", self.describe, reason)
            self._set_healthy(False)
        self._wake.set()

    def report_silent(self, reason: str) -> None:
        """A call got no answer at all within its deadline: unhealthy until it answers again."""
        self.silent = True
        self.report_failure(reason)

    def check_failed(self, reason: str) -> None:
        """A health check failed: a healthy pod is marked failed, an unhealthy one keeps
        its state with the newer reason."""
        if self.healthy:
            self.report_failure(reason)
        else:
            self.last_error = reason

    def report_success(self) -> None:
        """A check (and, for a silent pod, a real call) answered."""
        self.silent = False
        self._set_healthy(True)

    def checked(self) -> None:
        """A health check answered (either way): `wait_checked` returns."""
        self.checks += 1
        self._checked.set()

    def _set_healthy(self, healthy: bool) -> None:
        if healthy == self.healthy:
            return  # the no-change guard: no event, no callback
        self.healthy = healthy
        if healthy:
            log.info("%s is healthy", self.describe)
            self.last_error = ""
            self._became_healthy.set()
        else:
            self._became_healthy.clear()
        self._health_changed(healthy)
        if self.on_health_change is not None:
            self.on_health_change(self)

    def _health_changed(self, healthy: bool) -> None:
        """Hook for a protocol's pod: what else a change of `healthy` resets."""

    def report_credentials_rejected(self, call: str, code: Any, details: str,
                                    fix_hint: str = "") -> None:
        """The pod answered one of the router's own calls UNAUTHENTICATED / PERMISSION_DENIED:
        a configuration error (the router's token), not silence. Logged once per episode."""
        name = getattr(code, "name", str(code))
        reason = f"{call} answered {name}: {details}".strip().rstrip(":")
        first = not self.credentials_rejected
        self.credentials_rejected = reason
        if first:
            log.error("%s rejects the router's credentials (%s): the router cannot watch, "
                      "list or locate its sessions; %s", self.describe, reason, fix_hint)
            if self.on_health_change is not None:
                self.on_health_change(self)

    def report_credentials_accepted(self) -> None:
        """One of the router's own calls was accepted (a feed came up, a probe answered)."""
        if self.credentials_rejected:
            self.credentials_rejected = ""
            log.info("%s accepts the router's credentials now", self.describe)
            if self.on_health_change is not None:
                self.on_health_change(self)

    # -- the health loop, supervised -----------------------------------------------------------
    service_kind = "health"
    """The health loop's service kind (`<kind>:<pod>` in the supervisor)."""

    @property
    def service(self) -> str:
        """The health loop's name in the supervisor."""
        return f"{self.service_kind}:{self.name}"

    async def _health_loop(self) -> None:
        raise NotImplementedError  # each protocol's pod checks its own way

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Run the health loop as `supervisor`'s service (a private supervisor if none)."""
        if self._supervisor is None:
            self._own_supervisor = supervisor is None
            self._supervisor = supervisor if supervisor is not None else Supervisor()
            self._supervisor.spawn(self.service, self._health_loop)

    async def stop_health_loop(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            if self._own_supervisor:
                await supervisor.aclose()
            else:
                await supervisor.stop(self.service)

    # -- waiting -----------------------------------------------------------------------------
    async def wait_healthy(self, timeout: float) -> bool:
        await wait_event(self._became_healthy, timeout)
        return self.healthy

    async def wait_checked(self, timeout: float) -> bool:
        """Until the first health check has answered (either way) or `timeout`."""
        return await wait_event(self._checked, timeout)

    async def pause(self, interval_s: float) -> None:
        """The health loop's sleep: `interval_s` while healthy, a quarter of it otherwise,
        cut short by a failure report."""
        self._wake.clear()
        await wait_event(self._wake, interval_s if self.healthy else interval_s / 4)
