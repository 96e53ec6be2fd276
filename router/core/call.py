"""`Call`: one object per client call, carried from the front door through the core.

It replaces argument lists and output lists (`target: list[str]`): the route class, the pod the
call went to (the last one, after a stale retry), when it started and what it ended with. A
front door creates it when the call arrives and `finish`es it exactly once; the metric labels
come from it and nowhere else.

Invariants:
- `finish` records one request metric per call, with the pod the call last went to ("none"
  when it reached no pod) and the status code name it ended with.
- Cheap on the hot path: a slotted object, no per-call dict, no I/O.
"""

from __future__ import annotations

import time
from typing import Any, Protocol


class _RequestRecorder(Protocol):
    def record_request(self, protocol: str, method: str, route: str, pod: str | None,
                       code: str, seconds: float) -> None: ...


class Call:
    """One client call: see the module docstring."""

    __slots__ = ("code", "context", "finished", "method", "pod", "protocol", "request",
                 "route", "route_class", "sid", "started")

    def __init__(
        self, protocol: str, method: str, route_class: str, route: Any = None,
        context: Any = None,
    ) -> None:
        self.protocol = protocol
        self.method = method
        self.route_class = route_class
        """The route class label (session, start, fanout, broadcast, any, ...)."""
        self.route = route
        """The front door's own route descriptor (a MACP `Route`; unused by the core)."""
        self.context = context
        """The front door's per-call context (a gRPC `ServicerContext`; unused by the core)."""
        self.request: Any = None
        """The client's request when the front door keeps it parsed (ACP: the JSON-RPC
        message); MACP relays bytes and keeps none."""
        self.sid = ""
        """The session the call routes on ("" until parsed, or for calls on no session)."""
        self.pod: str | None = None
        """The pod the call (last) went to."""
        self.code = "OK"
        self.started = time.perf_counter()
        self.finished = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def finish(self, metrics: _RequestRecorder, code: str | None = None) -> None:
        """Record the call's metric once (`code` overrides the code set so far)."""
        if self.finished:
            return
        self.finished = True
        if code is not None:
            self.code = code
        metrics.record_request(self.protocol, self.method, self.route_class, self.pod,
                               self.code, time.perf_counter() - self.started)

    def __repr__(self) -> str:
        return (f"Call({self.protocol} {self.method} [{self.route_class}] pod={self.pod} "
                f"code={self.code})")
