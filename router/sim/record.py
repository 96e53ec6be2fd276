"""One session as the simulated pod holds it (`SessionRecord`).

Invariants: `metadata` is the live SessionMetadata, changed in place only by the session engine
(`router.sim.engine`) in the same loop step as its lifecycle event; `log[i]` has sequence i + 1
and `log[0]` is the SessionStart; `seen` holds every accepted message id; `timer` is the one
pending expiry timer (TTL while OPEN, the suspension cap while SUSPENDED), None otherwise.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from macp.v1 import core_pb2, envelope_pb2

from router.sim.mailbox import Subscriber
from router.sim.protocol import DEFAULT_MAX_SUSPEND_MS


@dataclass(slots=True, eq=False)
class SessionRecord:
    """One session held by the pod.

    `metadata` is the live SessionMetadata (mutated in place; copy before handing it out of the
    event loop). `log` holds accepted envelopes in order (sequence = index + 1, SessionStart
    first). `seen` is the message-id dedup set.
    """

    metadata: core_pb2.SessionMetadata
    members: frozenset[str]
    seen: set[str] = field(default_factory=set)
    log: list[envelope_pb2.Envelope] = field(default_factory=list)
    subs: set[Subscriber] = field(default_factory=set)
    max_suspend_ms: int = DEFAULT_MAX_SUSPEND_MS
    banked_ms: int = 0
    activity: dict[str, core_pb2.ParticipantActivity] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None

    @property
    def session_id(self) -> str:
        return self.metadata.session_id

    @property
    def state(self) -> int:
        return self.metadata.state

    @property
    def initiator(self) -> str:
        return self.metadata.initiator

