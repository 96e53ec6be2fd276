"""Admission control: a bound on the client work one router process has in flight.

Job: past a saturation point a router that keeps accepting work only queues it: every call
gets slower, memory grows with the queue, and throughput falls. `Admission` counts the client
calls and streams in flight and lets the front doors refuse a new one AT ONCE when its kind is
at its bound, with a hint when to retry, so admitted calls keep the latency of a router at
capacity and the excess costs one counter compare and a short answer (no queueing, no pod
contact, no parsing).

Two kinds, bounded separately (`--max-inflight-calls`, `--max-inflight-streams`; 0 = no bound):
- "call": a unary MACP call, an ACP HTTP POST, an ACP WebSocket request; it holds its slot
  until the router has its answer (MACP) or has handed it to the pod (ACP).
- "stream": a MACP server, bidi or client stream, an ACP SSE stream (HTTP GET) or an ACP
  WebSocket connection; it holds its slot while it is open. Streams are
  long-lived and few, calls are short and many: one bound for both would let a few thousand
  idle watchers lock out every unary call, or the reverse.

How a front door uses it (the hot path: an int compare and an increment, no lock, no await,
no allocation):

    if gate.calls >= gate.call_limit:       # refuse: gate.refuse(protocol, CALL) + answer
        ...
    gate.calls += 1
    try:
        ...                                 # the call
    finally:
        gate.calls -= 1

Invariants:
- The counters change only on the event loop thread, between awaits, so compare-then-increment
  needs no lock; the `/metrics` thread only reads them (`snapshot`).
- Every admitted call releases its slot exactly once, on every exit path (answer, exception,
  cancel, deadline): the front doors release in a `finally` around the whole call.
- A limit of 0 means unbounded; it is stored as `UNBOUNDED` so the hot path stays one compare.
- Only client traffic goes through a gate: the router's own work (probes, watch feeds, pod
  health checks, the admin API, `/metrics`, `/readyz`) runs on other channels and servers and
  is never counted or refused.
"""

from __future__ import annotations

import math
import sys
from typing import Protocol

CALL, STREAM = "call", "stream"
KINDS = (CALL, STREAM)
UNBOUNDED = sys.maxsize
"""The stored limit for "no bound" (0 on the command line)."""

PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""gRPC's own retry pushback trailer: a client with a retry policy waits this long."""


class _RefusalCounter(Protocol):
    def record_refused(self, protocol: str, kind: str) -> None: ...


class Admission:
    """In-flight counters and limits of one router process; see the module docstring."""

    __slots__ = ("call_limit", "calls", "metrics", "pushback_ms", "refused", "stream_limit",
                 "streams")

    def __init__(self, max_calls: int = 0, max_streams: int = 0, pushback_ms: int = 100,
                 metrics: _RefusalCounter | None = None) -> None:
        if max_calls < 0 or max_streams < 0:
            raise ValueError(f"admission limits must be >= 0 (0 = unbounded), got calls="
                             f"{max_calls} streams={max_streams}")
        if pushback_ms < 1:
            raise ValueError(f"admission pushback must be >= 1 ms, got {pushback_ms}")
        self.calls = 0
        """Client calls in flight now."""
        self.streams = 0
        """Client streams open now."""
        self.call_limit = max_calls or UNBOUNDED
        self.stream_limit = max_streams or UNBOUNDED
        self.pushback_ms = pushback_ms
        """What a refusal tells the client to wait before it retries."""
        self.metrics = metrics
        self.refused = 0
        """Refusals since start (all protocols and kinds; the metric has the split)."""

    @property
    def max_calls(self) -> int:
        """The configured call bound (0 = unbounded)."""
        return 0 if self.call_limit == UNBOUNDED else self.call_limit

    @property
    def max_streams(self) -> int:
        """The configured stream bound (0 = unbounded)."""
        return 0 if self.stream_limit == UNBOUNDED else self.stream_limit

    # -- the refusal path ------------------------------------------------------------------------
    def refuse(self, protocol: str, kind: str) -> int:
        """Count one refusal; returns the pushback (ms) the answer carries."""
        self.refused += 1
        if self.metrics is not None:
            self.metrics.record_refused(protocol, kind)
        return self.pushback_ms

    def retry_after_s(self) -> int:
        """The pushback as an HTTP `Retry-After` value (whole seconds, at least 1)."""
        return max(1, math.ceil(self.pushback_ms / 1000))

    def details(self, kind: str) -> str:
        """The status text of a refusal: what happened and what the client should do."""
        limit = self.call_limit if kind == CALL else self.stream_limit
        flag = "--max-inflight-calls" if kind == CALL else "--max-inflight-streams"
        return (f"macp-router is at its bound of {limit} client {kind}s in flight ({flag}); "
                f"the {kind} was not started and reached no pod: retry after "
                f"{self.pushback_ms} ms, or on another replica")

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """{kind: (in flight, limit; 0 = unbounded)}, for the metrics collector and status."""
        return {CALL: (self.calls, self.max_calls), STREAM: (self.streams, self.max_streams)}
