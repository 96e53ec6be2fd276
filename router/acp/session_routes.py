"""ACP session routes: calls routed by a session id, and calls for any pod.

One method per route class of `router.acp.routes`, each driving the session core
(`router.core.SessionRouter`) step by step, since the answer is relayed by a task: `session`
(`route`: near-cache, else lookup), `load` (where it is live, else `place`d with a store
reservation, `settle`d on the answer), `new` (`choose` a pod; the pod mints the id, so the
core `adopt`s it on the answer: reserved through the store, confirmed), `fork` (the source's
pod; the new id learned from the answer), `status` (the core's `lookup`, answered by the
router), `session_or_any` (the core's `lookup`, else any pod) and `any`.

Invariants:
- A session is never loaded where it might already be live: `session/load` / `session/resume`
  go to the pod where it is live; only when every pod answered not_found is the sid reserved
  (atomically, in the store) and placed; if any pod did not answer, the client gets a retryable
  error naming those pods and nothing is loaded.
- A load's reservation is released only on the pod's own refusal or when nothing was sent.
"""

from __future__ import annotations

from router.acp import jsonrpc as rpc
from router.acp import routes
from router.acp.connection import VirtualConnection
from router.acp.forwarding import AcpForwarding, OnReply
from router.acp.jsonrpc import Message
from router.acp.upstream import UpstreamClosed
from router.core.call import Call
from router.core.errors import Abort
from router.core.session_router import NotLocated, StartOutcome
from router.locator import SOURCE_PROBE, Located
from router.reservation import NoPlaceablePod
from router.store import OPEN


class AcpSessionRoutes(AcpForwarding):
    """The session-scoped and any-pod routes of the ACP front door."""

    # -- route classes -------------------------------------------------------------------------
    async def _locate_live(self, call: Call, sid: str) -> tuple[str | None, bool]:
        """(pod, from_cache) of a live session (the core's `route`), or (None, _) after
        answering why not."""
        try:
            located = await self.core.route(call, sid)
        except NotLocated as exc:
            await self._not_located(call, sid, exc.located)
            return None, False
        if located.pod is None:
            await self._not_located(call, sid, located)
            return None, False
        return located.pod, located.source != SOURCE_PROBE

    async def _lookup(self, call: Call, sid: str, *, use_negative: bool = True) -> Located | None:
        """The core's lookup (LIVE or NOT_FOUND); None after answering why it is unknown."""
        try:
            return await self.core.lookup(call, sid, use_negative=use_negative)
        except NotLocated as exc:
            await self._not_located(call, sid, exc.located)
            return None

    async def _session_call(
        self, connection: VirtualConnection, request: Message, sid: str | None, route: str
    ) -> Call | None:
        """The `Call` of a message that must name a session; None once one that does not is
        rejected (INVALID_PARAMS)."""
        call = self._call(connection, request, route)
        if sid is None:
            await self._reject(call, rpc.INVALID_PARAMS,
                               f"Invalid params: {request['method']} needs params.sessionId")
            return None
        return call

    def _learn_new_session(
        self, connection: VirtualConnection, call: Call, pod: str, *, placed: bool = False
    ) -> OnReply:
        """An on_reply that learns the session a `session/new` or `fork` answer names: a new
        session is adopted by the core (reserved for its pod in the store, confirmed); a fork,
        on its source's pod, is the pod's own word (`observe`)."""

        async def on_reply(reply: Message) -> None:
            result = reply.get("result")
            new_sid = result.get("sessionId") if isinstance(result, dict) else None
            if isinstance(new_sid, str):
                connection.register(new_sid)
                if placed:
                    await self.core.adopt(call, new_sid, pod)
                else:
                    self.locator.observe(pod, new_sid, OPEN)

        return on_reply

    async def _route_session(
        self, connection: VirtualConnection, request: Message, sid: str | None
    ) -> None:
        call = await self._session_call(connection, request, sid, routes.SESSION)
        if call is None or sid is None:
            return
        connection.register(sid)
        pod, cached = await self._locate_live(call, sid)
        if pod is None:
            return
        on_reply = None
        if request["method"] in routes.ENDING:
            async def on_reply(reply: Message, pod: str = pod, sid: str = sid) -> None:
                if "result" in reply:
                    await self.locator.invalidate(sid, pod)

        await self._forward(call, pod, sid=sid, on_reply=on_reply, check_stale=cached)

    async def _route_load(
        self, connection: VirtualConnection, request: Message, sid: str | None
    ) -> None:
        call = await self._session_call(connection, request, sid, routes.LOAD)
        if call is None or sid is None:
            return
        # Register before the pod replays history: the client opens the session stream on the
        # first replayed message, before the load's answer (which carries no sessionId).
        connection.register(sid)
        located = await self._lookup(call, sid, use_negative=False)
        if located is None:
            return
        placed = False
        if located.pod is not None:
            pod = located.pod
        else:  # not found on any pod: reserve it and load it there
            try:
                pod, placed = await self.core.place(call, sid, request["method"])
            except Abort as exc:
                await self._answer(call, rpc.unavailable(None, exc.details), sid=sid)
                return

        async def on_reply(reply: Message) -> None:
            outcome = self.core.backend.start_outcome(call, reply)
            if outcome is StartOutcome.ACCEPTED:
                self.locator.observe(pod, sid, OPEN)  # the pod's own word: it holds it now
            else:  # released only if the pod itself refused (the connection may have died)
                await self.core.settle(sid, pod, placed, outcome)

        async def on_unsent() -> None:
            await self.core.settle(sid, pod, placed, StartOutcome.REFUSED)  # never sent

        await self._forward(call, pod, sid=sid, on_reply=on_reply, on_unsent=on_unsent)

    async def _route_new(
        self, connection: VirtualConnection, request: Message, sid: str | None
    ) -> None:
        call = self._call(connection, request, routes.NEW)
        tried: list[str] = []
        while True:
            try:
                pod = self.core.choose(call, exclude=tried)
            except NoPlaceablePod:
                detail = (f"pods {', '.join(tried)} are unreachable" if tried
                          else "no pod is healthy and accepting sessions")
                await self._answer(call, rpc.unavailable(
                    None, f"no pod can take a new session: {detail} (retry)"))
                return
            try:
                _, future = await self._send(connection, pod, request)
            except UpstreamClosed:
                tried.append(pod)  # nothing was created there: place it elsewhere
                continue
            break

        if future is not None:
            self._relay(call, pod, future, None,
                        self._learn_new_session(connection, call, pod, placed=True), False)

    async def _route_fork(
        self, connection: VirtualConnection, request: Message, sid: str | None
    ) -> None:
        call = await self._session_call(connection, request, sid, routes.FORK)
        if call is None or sid is None:
            return
        pod, _ = await self._locate_live(call, sid)
        if pod is None:
            return

        await self._forward(call, pod, on_reply=self._learn_new_session(connection, call, pod))

    async def _route_status(
        self, connection: VirtualConnection, request: Message, sid: str | None
    ) -> None:
        call = await self._session_call(connection, request, sid, routes.STATUS)
        if call is None or sid is None:
            return
        located = await self._lookup(call, sid)
        if located is not None:
            await self._answer(call, rpc.result(None, {"status": located.status}),
                               pod=located.pod)

    async def _route_session_or_any(
        self, connection: VirtualConnection, request: Message, sid: str | None
    ) -> None:
        if sid is not None:
            call = self._call(connection, request, routes.SESSION_OR_ANY)
            located = await self._lookup(call, sid)
            if located is None:
                return
            if located.pod is not None:
                await self._forward(call, located.pod, sid=sid)
                return
        await self._route_any(connection, request, sid)

    async def _route_any(
        self, connection: VirtualConnection, request: Message, sid: str | None
    ) -> None:
        call = self._call(connection, request, routes.ANY)
        pod = self.roster.any_healthy()
        if pod is None:
            await self._answer(call, rpc.unavailable(None, "no ACP pod is healthy (retry)"))
            return
        await self._forward(call, pod.name)
