"""The Redis store's shared registries: the broadcast records replayed to every pod
(``P{bc}:data``, ``P{bc}:order``, ``P{bc}:seq``) and the set of drained pods (``P drain``); see
`router.redis_layout` for the keys.

Invariants:
- The broadcast keys share one hash tag (``{bc}``): each operation is one Lua script on one slot.
  Replay order is registration order; registering a key again moves it last.
- A record that does not decode is skipped by `broadcasts` and reported through the store's
  rate-limited `UndecodableLog`, never raised: one corrupt value must not stop a replay.
"""

from __future__ import annotations

from router.redis_layout import KeyLayout, UndecodableLog, decode_broadcast, encode_broadcast
from router.redis_link import RedisLink
from router.store import BroadcastRecord

__all__ = ["Registry"]


class Registry:
    """Broadcast records and drained pods of one store, through `link`."""

    def __init__(self, link: RedisLink, keys: KeyLayout, undecodable: UndecodableLog) -> None:
        self._link = link
        self._keys = keys
        self._undecodable = undecodable

    async def record_broadcast(self, record: BroadcastRecord) -> None:
        payload = encode_broadcast(record)
        link, keys = self._link, [self._keys.bc_data, self._keys.bc_order, self._keys.bc_seq]
        await link.call(
            "record_broadcast",
            lambda client: link.script(
                client, link.scripts.record_broadcast, keys, [record.key, payload]
            ),
        )

    async def forget_broadcast(self, key: str) -> None:
        link, keys = self._link, [self._keys.bc_data, self._keys.bc_order]
        await link.call(
            "forget_broadcast",
            lambda client: link.script(client, link.scripts.forget_broadcast, keys, [key]),
        )

    async def broadcasts(self) -> list[BroadcastRecord]:
        link, keys = self._link, [self._keys.bc_data, self._keys.bc_order]
        flat = await link.call(
            "broadcasts",
            lambda client: link.script(client, link.scripts.list_broadcasts, keys, []),
        )
        records: list[BroadcastRecord] = []
        for key, raw in zip(flat[0::2], flat[1::2], strict=True):
            record = decode_broadcast(key, raw)
            if record is None:
                self._undecodable.warn(f"{self._keys.bc_data}[{key!r}]")
            else:
                records.append(record)
        return records

    async def set_draining(self, pod: str, draining: bool) -> None:
        drain = self._keys.drain
        if draining:
            await self._link.call("sadd", lambda client: client.sadd(drain, pod))
        else:
            await self._link.call("srem", lambda client: client.srem(drain, pod))

    async def draining_pods(self) -> set[str]:
        drain = self._keys.drain
        members = await self._link.call("smembers", lambda client: client.smembers(drain))
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}
