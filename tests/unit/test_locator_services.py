"""The locator's background loops run under the router's supervisor and lose no write.

A `Locator` with a fake roster and probe and the real `MemoryStore`, wrapped so that its
`put_many` can raise an exception nobody planned for (a bug in a store client): the store
writer crashes, the supervisor counts and restarts it, and the batch it was writing is written
by the restarted writer.
"""

from __future__ import annotations

from collections.abc import Iterable

from router.locator import Locator
from router.metrics import Metrics
from router.placement import RoundRobin
from router.store import OPEN, Location, MemoryStore
from router.supervisor import Supervisor
from tests.unit.fakes import FakeBackend, FakeRoster
from tests.waiting import eventually

SID = "0190a5b4-7c1d-7aaa-8bbb-0123456789ab"


class SurpriseStore(MemoryStore):
    """The real in-process store, whose next `put_many` raises a TypeError when armed."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.put_calls = 0

    async def put_many(self, items: Iterable[tuple[str, Location]]) -> None:
        self.put_calls += 1
        if self.armed:
            self.armed = False
            raise TypeError("unexpected reply type from the store client")
        await super().put_many(items)


def make(store: MemoryStore) -> Locator:
    backend = FakeBackend()
    return Locator(roster=FakeRoster("a", "b"), store=store, probe=backend.probe,
                   placement=RoundRobin(), metrics=Metrics())


async def test_the_writer_and_sweeper_are_services_of_the_supervisor_given() -> None:
    supervisor = Supervisor()
    locator = make(MemoryStore())
    await locator.start(supervisor)
    assert sorted(state.name for state in supervisor.states()) == ["store_writer:macp",
                                                                     "sweeper:macp"]
    await eventually(lambda: all(state.up for state in supervisor.states()), timeout=10,
                     what="both loops running")
    await locator.aclose()
    assert list(supervisor.states()) == [], "stopped and forgotten; the supervisor lives on"
    assert not supervisor.closing
    await supervisor.aclose()


async def test_a_store_writer_crash_is_counted_restarted_and_its_batch_written_later() -> None:
    crashes: list[str] = []
    supervisor = Supervisor(on_crash=lambda name, exc: crashes.append(name))
    store = SurpriseStore()
    locator = make(store)
    await locator.start(supervisor)
    writer = supervisor.state("store_writer:macp")
    assert writer is not None

    store.armed = True
    locator.observe("a", SID, OPEN)
    await eventually(lambda: crashes == ["store_writer:macp"], timeout=10,
                     what="the writer crashed once")
    assert writer.last_error.startswith("TypeError: unexpected reply type")

    async def written() -> bool:
        location = await store.get(SID)
        return location is not None and location.pod == "a"

    await eventually(written, timeout=5, what="the batch written by the restarted writer")
    assert writer.up and writer.starts == 2 and store.put_calls == 2
    await locator.aclose()
    await supervisor.aclose()


async def test_a_locator_started_without_a_supervisor_still_writes_behind() -> None:
    """(A front door that owns no supervisor yet.)"""
    store = MemoryStore()
    locator = make(store)
    await locator.start()
    locator.observe("a", SID, OPEN)

    async def written() -> bool:
        return await store.get(SID) is not None

    await eventually(written, timeout=5, what="written by the writer, no flush called")
    await locator.aclose()
