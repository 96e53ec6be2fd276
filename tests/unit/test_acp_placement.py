"""ACP `session/new` is placed by the session core and its new id reserved through the store.

The ACP route (`router.acp.session_routes.AcpSessionRoutes._route_new`) runs over the real
core (`SessionRouter` on a `Locator` with a `MemoryStore`); only what needs a network is faked:
the pods' transport (`_send`: a pod answers `session/new` with an id it mints) and the client's
connection (records what the router delivers). No sockets.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from router.acp import jsonrpc as rpc
from router.acp.config import AcpConfig, AcpPodSpec
from router.acp.jsonrpc import Message
from router.acp.session_routes import AcpSessionRoutes
from router.acp.upstream import UpstreamClosed
from router.core.session_router import SessionRouter
from router.store import OPEN, RESERVED
from tests.unit.fakes import FakeBackend, FakeRoster, make_locator
from tests.waiting import eventually

PODS = ("a", "b")


class FakeClient:
    """A client's connection: the sessions it was given and the answers it got."""

    def __init__(self) -> None:
        self.sessions: list[str] = []
        self.answers: list[Message] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    def register(self, sid: str) -> None:
        self.sessions.append(sid)

    def spawn(self, coro: Any, name: str) -> None:
        self.tasks.add(asyncio.ensure_future(coro))

    async def deliver(self, message: Message, sid: str | None = None) -> None:
        self.answers.append(message)


class Routes(AcpSessionRoutes):
    """The ACP session routes over a real core; pods mint `<pod>-<n>` for `session/new`."""

    def __init__(self) -> None:
        self.config = AcpConfig(listen="127.0.0.1:0", pods=tuple(
            AcpPodSpec(pod, f"ws://127.0.0.1:1/{pod}") for pod in PODS))
        self.roster = FakeRoster(*PODS)  # type: ignore[assignment]
        self.backend = FakeBackend(*PODS)
        self.locator = make_locator(self.roster, self.backend, protocol="acp")
        self.metrics = self.locator.metrics
        for pod in PODS:
            self.metrics.add_protocol_pod("acp", pod)
        self.core = SessionRouter(self.locator, self.backend)
        self.unreachable: set[str] = set()
        self.minted: dict[str, str] = {}
        """pod -> the id it mints next (default `<pod>-<n>`)."""
        self.sent: list[str] = []

    async def _send(self, connection: Any, pod: str, request: Message
                    ) -> tuple[Any, asyncio.Future[Message] | None]:
        self.sent.append(pod)
        if pod in self.unreachable:
            raise UpstreamClosed(pod, "connection refused")
        sid = self.minted.pop(pod, f"{pod}-{len(self.sent)}")
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        future.set_result(rpc.result(request["id"], {"sessionId": sid}))
        return None, future

    async def new_session(self, client: FakeClient) -> Message:
        request = {"jsonrpc": "2.0", "id": 7, "method": "session/new", "params": {"cwd": "/"}}
        before = len(client.answers)
        await self._route_new(client, request, None)  # type: ignore[arg-type]
        await eventually(lambda: len(client.answers) > before, timeout=10,
                         what="the session/new answer")
        return client.answers[-1]


@pytest.fixture
def routes() -> Routes:
    return Routes()


async def test_session_new_goes_to_the_cores_choice_and_its_minted_id_is_reserved_in_the_store(
    routes: Routes,
) -> None:
    client = FakeClient()
    first, second = await routes.new_session(client), await routes.new_session(client)
    assert sorted(routes.sent) == ["a", "b"], "the core's placement policy (round robin) chose"
    order = routes.sent
    sids = [first["result"]["sessionId"], second["result"]["sessionId"]]
    assert first["id"] == second["id"] == 7 and client.sessions == sids
    store = routes.locator.store
    reserved = [await store.get(sid) for sid in sids]
    assert [(loc.pod, loc.state) for loc in reserved if loc] == [(p, RESERVED) for p in order]
    assert [routes.locator.near.entry(sid) for sid in sids] == [(p, OPEN) for p in order]
    await routes.locator.flush()  # the confirm's write-behind: reserved -> open
    assert [(await store.get(sid)).state for sid in sids] == [OPEN, OPEN]  # type: ignore[union-attr]
    for pod in PODS:
        placed = routes.metrics.registry.get_sample_value(
            "macp_router_placements_total", {"protocol": "acp", "pod": pod, "result": "placed"})
        assert placed == 1, pod


async def test_a_minted_id_the_store_already_gives_another_pod_keeps_that_owner(
    routes: Routes,
) -> None:
    assert await routes.locator.store.reserve("dup", "b") == "b"
    routes.roster.draining.add("b")  # type: ignore[attr-defined]  # so "a" is chosen
    routes.minted["a"] = "dup"
    answer = await routes.new_session(FakeClient())
    assert answer["result"]["sessionId"] == "dup"
    assert routes.sent == ["a"]
    location = await routes.locator.store.get("dup")
    assert location is not None and location.pod == "b", "the store's reservation is atomic"
    assert routes.locator.try_cached("dup") == "b"


async def test_session_new_skips_an_unreachable_pod_and_says_retry_when_none_is_left(
    routes: Routes,
) -> None:
    routes.unreachable.add("a")
    answers = [await routes.new_session(FakeClient()) for _ in range(2)]
    assert "a" in routes.sent and routes.sent.count("b") == 2
    assert all(answer["result"]["sessionId"].startswith("b-") for answer in answers)
    assert routes.locator.near.sessions_of("a") == []
    routes.unreachable.add("b")
    routes.sent.clear()
    answer = await routes.new_session(FakeClient())
    assert sorted(routes.sent) == ["a", "b"]
    assert answer["error"]["code"] == rpc.ROUTER_UNAVAILABLE
    assert answer["error"]["message"].endswith("are unreachable (retry)")
