"""The lifecycle-event bus: WatchSessions and WatchSignals subscribers and their mailboxes.

Job: deliver session lifecycle events (CREATED, RESOLVED, EXPIRED, SUSPENDED, RESUMED,
CANCELLED) and ambient envelopes (Signal, Progress) to every current subscriber, and build the
WatchSessions snapshot (every in-memory session as CREATED, terminal ones too).

Invariants:
- `publish`/`emit` never block and never await: a state change and its event happen in one
  synchronous step of the event loop, so a subscriber added together with its snapshot sees
  every later change exactly once and nothing twice.
- A subscriber's mailbox (`router.sim.mailbox`) is bounded: past its limit the subscriber is
  lagged and its stream ends RESOURCE_EXHAUSTED (the runtime drops a slow consumer).
- No event is built when nobody listens (the per-call path stays O(1)).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from macp.v1 import core_pb2, envelope_pb2

from router.sim.mailbox import Subscriber
from router.sim.protocol import EV_CREATED

if TYPE_CHECKING:
    from router.sim.record import SessionRecord


class LifecycleBus:
    """The pod's WatchSessions and WatchSignals subscribers."""

    __slots__ = ("session_watchers", "signal_watchers")

    def __init__(self) -> None:
        self.session_watchers: set[Subscriber] = set()
        self.signal_watchers: set[Subscriber] = set()

    def emit(self, event_type: int, rec: SessionRecord, now: int) -> None:
        """Push one lifecycle event for `rec` (its metadata as of now) to every watcher."""
        if not self.session_watchers:
            return
        item = core_pb2.WatchSessionsResponse()
        ev = item.event
        ev.event_type = event_type
        ev.session.CopyFrom(rec.metadata)
        ev.observed_at_unix_ms = now
        for sub in self.session_watchers:
            sub.push(item)

    def publish_signal(self, env: envelope_pb2.Envelope) -> None:
        """Push an accepted Signal / Progress envelope to every WatchSignals subscriber."""
        if self.signal_watchers:
            item = core_pb2.WatchSignalsResponse(envelope=env, sender_authenticated=True)
            for sub in self.signal_watchers:
                sub.push(item)

    @staticmethod
    def snapshot(records: Iterable[SessionRecord]) -> list[core_pb2.WatchSessionsResponse]:
        """Every in-memory session as CREATED (terminal ones too), as the runtime's sync."""
        out = []
        for rec in records:
            item = core_pb2.WatchSessionsResponse()
            item.event.event_type = EV_CREATED
            item.event.session.CopyFrom(rec.metadata)
            item.event.observed_at_unix_ms = rec.metadata.started_at_unix_ms
            out.append(item)
        return out

    def drop_session_watchers(self) -> None:
        """End every current WatchSessions stream with OK, discarding what is queued."""
        for sub in list(self.session_watchers):
            sub.close(discard=True)
        self.session_watchers.clear()

    def close_all(self) -> None:
        """End every stream once its queue drains (pod stopping)."""
        for sub in (*self.session_watchers, *self.signal_watchers):
            sub.close()

    def clear(self) -> None:
        self.session_watchers.clear()
        self.signal_watchers.clear()
