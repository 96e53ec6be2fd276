"""The Redis store's per-pod walks: list a pod's sessions (`pod_sessions`) and drop them
(`drop_pod_sessions`), over the per-pod index sets ``P{T}:pod:<pod>`` of every shard
(`router.redis_layout`).

Invariants:
- One pipelined round trip per batch of at most `BATCH_SIZE` sessions (on a cluster the client
  sends each node its part in parallel), never one per session; the index itself is read in one
  pipelined walk over every shard.
- `pod_sessions` never lies: an index member counts only when its entry decodes and names the
  pod. Members whose entry expired or moved are removed afterwards, best effort, by the same
  compare-and-remove script as a drop (so a session taken meanwhile is never touched).
- Deleting is compare-and-delete in Lua, per shard (one slot): an entry another pod has taken
  since the index was read survives.
"""

from __future__ import annotations

import contextlib
from typing import Any

from router.redis_connect import Client
from router.redis_layout import KeyLayout, decode_location
from router.redis_link import RedisLink
from router.store import StoreUnavailable

__all__ = ["BATCH_SIZE", "PodIndex"]

BATCH_SIZE = 500
"""Sessions per pipelined round trip in `put_many`, `pod_sessions` and `drop_pod_sessions`."""


class PodIndex:
    """A pod's sessions, walked shard by shard through `link` (see the module docstring)."""

    def __init__(self, link: RedisLink, keys: KeyLayout) -> None:
        self._link = link
        self._keys = keys

    async def pod_sessions(self, pod: str) -> set[str]:
        per_shard = await self._members(pod, "pod_sessions")
        live: set[str] = set()
        stale: list[list[str]] = [[] for _ in range(self._keys.shards)]
        for group in batches(per_shard):

            async def fetch(client: Client, group: list[tuple[int, list[str]]] = group) -> list:
                pipe = client.pipeline(transaction=False)
                for shard, chunk in group:
                    # MGET answers nil for missing and wrong-type keys alike; one slot per MGET.
                    pipe.execute_command("MGET", *(self._keys.entry(sid, shard) for sid in chunk))
                return await pipe.execute()

            values = await self._link.call("pod_sessions", fetch)
            for (shard, chunk), raws in zip(group, values, strict=True):
                for sid, raw in zip(chunk, raws, strict=True):
                    location = decode_location(raw) if raw else None
                    if location is not None and location.pod == pod:
                        live.add(sid)
                    else:
                        stale[shard].append(sid)
        if any(stale):
            # Lazy clean-up of expired / moved members; compare-and-remove in Lua, best effort.
            with contextlib.suppress(StoreUnavailable):
                await self._drop(pod, stale, delete=False, op="pod_sessions")
        return live

    async def drop_pod_sessions(self, pod: str, keep: set[str]) -> int:
        per_shard = await self._members(pod, "drop_pod_sessions")
        doomed = [[sid for sid in sids if sid not in keep] for sids in per_shard]
        return await self._drop(pod, doomed, delete=True, op="drop_pod_sessions")

    async def _members(self, pod: str, op: str) -> list[list[str]]:
        """`pod`'s index, shard by shard (one pipelined walk over every shard)."""
        keys = [self._keys.index(pod, shard) for shard in range(self._keys.shards)]

        async def fn(client: Client) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.smembers(key)
            return await pipe.execute()

        found = await self._link.call(op, fn)
        return [sorted(m.decode(errors="replace") for m in members) for members in found]

    async def _drop(self, pod: str, per_shard: list[list[str]], *, delete: bool, op: str) -> int:
        link, script = self._link, self._link.scripts.drop
        total = 0
        flag = "1" if delete else "0"
        for group in batches(per_shard):
            calls = []
            for shard, chunk in group:
                keys = [self._keys.index(pod, shard), *(self._keys.entry(s, shard) for s in chunk)]
                calls.append((script, [len(keys), *keys, pod, flag, *chunk]))
            counts = await link.call(op, lambda c, calls=calls: link.run_scripts(c, calls))
            total += sum(int(count) for count in counts)
        return total


def batches(per_shard: list[list[str]]) -> list[list[tuple[int, list[str]]]]:
    """(shard, sids) chunks grouped so each group holds at most BATCH_SIZE sids."""
    groups: list[list[tuple[int, list[str]]]] = []
    current: list[tuple[int, list[str]]] = []
    size = 0
    for shard, sids in enumerate(per_shard):
        for start in range(0, len(sids), BATCH_SIZE):
            chunk = sids[start : start + BATCH_SIZE]
            if size + len(chunk) > BATCH_SIZE and current:
                groups.append(current)
                current, size = [], 0
            current.append((shard, chunk))
            size += len(chunk)
    if current:
        groups.append(current)
    return groups
