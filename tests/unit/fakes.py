"""Fakes for the session core's unit tests: a pod roster, a backend, and a locator builder.

No sockets: the backend answers from a dict of which pod holds which session, and counts the
probes and forwards it was asked for, so a test can assert on exactly what reached "pods".
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from router.core.call import Call
from router.core.errors import Abort
from router.core.session_router import StartOutcome
from router.core.status import LIVE, NOT_FOUND, UNKNOWN, LocateStatus
from router.locator import Locator
from router.metrics import Metrics
from router.placement import RoundRobin
from router.store import MemoryStore


class FakeRoster:
    """Pods by name with a healthy/placeable flag each (the locator's `PodRoster`)."""

    def __init__(self, *names: str) -> None:
        self.healthy = dict.fromkeys(names, True)
        self.draining: set[str] = set()

    def names(self) -> list[str]:
        return list(self.healthy)

    def is_healthy(self, name: str) -> bool:
        return self.healthy.get(name, False)

    def placeable_names(self) -> list[str]:
        return [n for n, ok in self.healthy.items() if ok and n not in self.draining]


class FakeBackend:
    """A `Backend` over `holds` (pod -> set of sids); `silent` pods never answer a probe."""

    def __init__(self, *names: str) -> None:
        self.holds: dict[str, set[str]] = {name: set() for name in names}
        self.silent: set[str] = set()
        self.probes: list[tuple[str, str]] = []
        self.forwards: list[tuple[str, Any]] = []
        self.probe_gate: asyncio.Event | None = None
        self.start_answers: dict[str, str] = {}
        """pod -> "ok" | "refused" | "unreadable" | "unreachable" for starts."""
        self.fail_with: BaseException | None = None

    async def probe(self, pod: str, sid: str) -> LocateStatus:
        self.probes.append((pod, sid))
        if self.probe_gate is not None:
            await self.probe_gate.wait()
        if pod in self.silent:
            await asyncio.Event().wait()  # never answers: the locator's deadline ends it
        return LIVE if sid in self.holds[pod] else NOT_FOUND

    async def answers(self, pod: Any) -> bool:
        return pod not in self.silent

    async def forward(self, call: Call, pod: str, request: Any) -> Any:
        self.forwards.append((pod, request))
        if self.fail_with is not None:
            raise self.fail_with
        if call.route_class == "start":
            return self._start(call, pod)
        if call.sid not in self.holds[pod]:
            raise Abort(grpc.StatusCode.NOT_FOUND, f"session {call.sid} not on {pod}")
        return f"{pod}:{request}"

    def _start(self, call: Call, pod: str) -> str:
        answer = self.start_answers.get(pod, "ok")
        if answer == "unreachable":
            abort = Abort(grpc.StatusCode.UNAVAILABLE, f"{pod} connection refused")
            abort.never_sent = True
            raise abort
        if answer == "ok":
            self.holds[pod].add(call.sid)
        return answer

    def not_here(self, call: Call, answer: Any) -> bool:
        return isinstance(answer, Abort) and answer.code is grpc.StatusCode.NOT_FOUND

    def start_outcome(self, call: Call, answer: Any) -> StartOutcome:
        if answer == "unreadable":
            raise Abort(grpc.StatusCode.INTERNAL, "unreadable start answer")
        return StartOutcome.ACCEPTED if answer == "ok" else StartOutcome.REFUSED

    async def not_found(self, call: Call, sid: str, request: Any) -> Any:
        return f"not-found:{sid}"

    def answering_probe(self, call: Call, request: Any) -> None:
        return None  # no call of these fakes is a probe: a miss probes, then forwards


def make_locator(roster: FakeRoster, backend: FakeBackend, **options: Any) -> Locator:
    return Locator(roster=roster, store=MemoryStore(), probe=backend.probe,
                   placement=RoundRobin(), metrics=Metrics(), **options)


def call(method: str = "GetSession", route_class: str = "session") -> Call:
    return Call("macp", method, route_class)


__all__ = ["UNKNOWN", "FakeBackend", "FakeRoster", "call", "make_locator"]
