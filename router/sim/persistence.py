"""Persistence of the simulated pod: the state file (its stand-in for the runtime's file backend).

Job: write the pod's sessions to one JSON file, write-behind, and read them back on start so
sessions survive a restart. Registries are not persisted (the runtime rebuilds them per start).

Invariants:
- Write-behind with a short debounce (`PERSIST_DEBOUNCE_S`): at most one write in flight; a
  change made while a write runs is picked up by the next loop turn of that same write.
- Every write is atomic (temporary file + `os.replace`): a reader sees the old or the new file.
- Only sessions marked dirty since the last write are re-encoded; the file lists the sessions in
  the pod's creation order.
- `flush` (called by stop) waits for a write already handed to a thread, then writes the final
  state itself, so no older write can land after it. No writes are scheduled while stopping.
- Without a path every method is a no-op (`MACP_MEMORY_ONLY=1`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import tempfile
from typing import Any

from macp.v1 import core_pb2, envelope_pb2

from router.sim.protocol import DEFAULT_MAX_SUSPEND_MS, PERSIST_DEBOUNCE_S
from router.sim.record import SessionRecord


class StateFile:
    """The pod's state file; `sessions` is the pod's own (live) session dict."""

    def __init__(self, path: str | None, name: str, sessions: dict[str, SessionRecord]) -> None:
        self.path = path
        self.name = name
        self.sessions = sessions
        self.stopping = False
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._dirty = False
        self._dirty_sids: set[str] = set()
        self._encoded: dict[str, str] = {}  # sid -> its JSON entry in the state file

    def mark_dirty(self, rec: SessionRecord | None = None) -> None:
        """Schedule a write (`rec` changed; None: the set of sessions changed)."""
        if not self.path or self.stopping:
            return
        if rec is not None:
            self._dirty_sids.add(rec.metadata.session_id)
        self._dirty = True
        if self._handle is None and self._task is None:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_later(PERSIST_DEBOUNCE_S, self._persist_soon)

    def forget(self, session_id: str) -> None:
        """Drop an evicted session's cached entry (the caller marks the file dirty)."""
        self._encoded.pop(session_id, None)
        self._dirty_sids.discard(session_id)

    def reset(self) -> None:
        self._dirty_sids.clear()
        self._encoded.clear()

    def _persist_soon(self) -> None:
        self._handle = None
        # Not in the pod's tasks: stop() awaits it through flush() instead of cancelling it, so
        # a write already handed to a thread can never land after the final write.
        self._task = asyncio.ensure_future(self._persist())

    async def _persist(self) -> None:
        try:
            while self._dirty:
                self._dirty = False
                blob = self.serialize()
                await asyncio.to_thread(_atomic_write, self.path or "", blob)
        finally:
            self._task = None

    async def flush(self) -> None:
        """Write the state file now (no-op without one)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._task is not None:
            await self._task
        if self.path:
            self._dirty = False
            _atomic_write(self.path, self.serialize())

    def serialize(self) -> bytes:
        """The state file's bytes; only sessions changed since the last call are re-encoded."""
        cache = self._encoded
        for sid in self._dirty_sids:
            rec = self.sessions[sid]
            cache[sid] = json.dumps(
                {
                    "session_id": sid,
                    "state": envelope_pb2.SessionState.Name(rec.metadata.state),
                    "metadata": _b64(rec.metadata),
                    "seen": list(rec.seen),
                    "log": [_b64(env) for env in rec.log],
                    "max_suspend_ms": rec.max_suspend_ms,
                    "banked_ms": rec.banked_ms,
                },
                separators=(",", ":"),
            )
        self._dirty_sids.clear()
        head = json.dumps(
            {
                "version": 1,
                "name": self.name,
            },
            separators=(",", ":"),
        )
        sessions = ",".join(cache[sid] for sid in self.sessions)
        return f'{head[:-1]},"sessions":[{sessions}]}}'.encode()

    def load(self) -> None:
        """Replay the file (if any) into `sessions`; timers are armed by the caller."""
        path = self.path
        if not path or not os.path.exists(path):
            return
        with open(path, "rb") as fh:
            doc = json.loads(fh.read())

        def unb64(cls: Any, text: str) -> Any:
            return cls.FromString(base64.b64decode(text))

        for item in doc.get("sessions", []):
            meta = unb64(core_pb2.SessionMetadata, item["metadata"])
            rec = SessionRecord(
                metadata=meta,
                members=frozenset((meta.initiator, *meta.participants)),
                seen=set(item.get("seen", [])),
                log=[unb64(envelope_pb2.Envelope, t) for t in item.get("log", [])],
                max_suspend_ms=int(item.get("max_suspend_ms", DEFAULT_MAX_SUSPEND_MS)),
                banked_ms=int(item.get("banked_ms", 0)),
            )
            for act in meta.participant_activity:
                rec.activity[act.participant_id] = act
            self.sessions[meta.session_id] = rec
            self._dirty_sids.add(meta.session_id)


def _b64(msg: Any) -> str:
    return base64.b64encode(msg.SerializeToString()).decode("ascii")


def _atomic_write(path: str, blob: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".simpod-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
