"""ACP forwarding: hand a client's message to a pod, relay the pod's answer, re-route a stale one.

`AcpForwarding` is the part of the ACP front door that talks to pods for a client: a message
goes to the client's own upstream to the pod (`_send`, one retry on a fresh connection if a
reused one died before sending), the pod's answer is relayed by a task under the client's
original JSON-RPC id (`_relay_reply`), and an error on a cached route whose pod's own
`session/status` says not_found is re-routed once through the session core
(`_reroute_if_stale` -> `SessionRouter.relocate`).

Invariants:
- Answers carry the client's original JSON-RPC id (value and type), on the stream the client
  reads for that session.
- Every call records exactly one request metric (`_answer`), also one whose answer's relay
  raised an unexpected exception (the client gets INTERNAL naming it; logged and counted).
- A stale route is re-routed at most once, and only on the pod's own not_found.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from acp.http.protocol import method_requires_session_header

from router.acp import jsonrpc as rpc
from router.acp import routes
from router.acp.config import AcpConfig
from router.acp.connection import VirtualConnection
from router.acp.jsonrpc import Message
from router.acp.pods import AcpPodRoster
from router.acp.upstream import Upstream, UpstreamClosed, UpstreamRefused
from router.core.call import Call
from router.core.errors import outcome_of
from router.core.session_router import NotLocated, SessionRouter
from router.core.status import NOT_FOUND
from router.locator import SOURCE_PROBE, Located, Locator
from router.metrics import Metrics

log = logging.getLogger("macp_router.acp")

PROTOCOL = "acp"
OnReply = Callable[[Message], Awaitable[Message | None]]


class AcpForwarding:
    """Answering and forwarding for the ACP front door (see the module docstring)."""

    config: AcpConfig
    metrics: Metrics
    roster: AcpPodRoster
    locator: Locator
    core: SessionRouter

    # -- one Call per client call -----------------------------------------------------------
    def _call(self, connection: VirtualConnection, request: Message, route: str) -> Call:
        """The `Call` of one client message: metric labels, timing, the chosen pod."""
        method = request["method"]
        label = method if method in routes.ROUTES else (
            "_extension" if method.startswith("_") else method
        )
        call = Call(PROTOCOL, label, route, context=connection)
        call.request = request
        return call

    # -- answering -----------------------------------------------------------------------------
    async def _answer(
        self, call: Call, reply: Message, *, pod: str | None = None, sid: str | None = None
    ) -> None:
        """Give the client `reply` under its own request id, on the stream it reads for sid."""
        call.pod = pod
        call.finish(self.metrics, rpc.code_label(reply))
        request = call.request
        if "id" not in request:
            return
        scoped = sid if method_requires_session_header(request["method"]) else None
        await call.context.deliver(rpc.reply_to(request["id"], reply), scoped)
        if sid is not None and "error" not in reply and request["method"] in routes.ENDS_SESSION:
            call.context.forget(sid)

    async def _reject(self, call: Call, code: int, message: str, data: Any = None) -> None:
        await self._answer(call, rpc.error(None, code, message, data))

    async def _not_located(self, call: Call, sid: str, located: Located) -> None:
        if located.status == NOT_FOUND:
            reply = rpc.error(
                None, rpc.RESOURCE_NOT_FOUND,
                f"session {sid} is not live on any pod: session/load it first",
                {"sessionId": sid, "status": NOT_FOUND},
            )
        else:
            reply = rpc.unavailable(
                None, located.describe_unknown(sid, self.config.probe_timeout_s),
                sessionId=sid, unknownPods=list(located.unknown_pods),
            )
        if "id" not in call.request:
            log.info("ACP %s for %s dropped: %s", call.request["method"], sid,
                     reply["error"]["message"])
        await self._answer(call, reply, sid=sid)

    # -- forwarding ----------------------------------------------------------------------------
    async def _send(
        self, connection: VirtualConnection, pod: str, request: Message
    ) -> tuple[Upstream, asyncio.Future[Message] | None]:
        """Hand `request` to `pod` over the client's upstream; re-open a dead one once."""
        for attempt in (1, 2):
            reused = pod in connection.upstreams
            try:
                upstream = await connection.upstream(pod)
                if "id" not in request:
                    await upstream.send({k: v for k, v in request.items() if k != "id"})
                    return upstream, None
                return upstream, await upstream.request(request["method"], request.get("params"))
            except UpstreamClosed as exc:
                # A reused upstream may have died unnoticed (pod restarted): nothing was sent,
                # so one retry on a fresh connection is safe.
                if attempt == 1 and reused and not exc.sent:
                    continue
                target = self.roster.get(pod)
                if target is not None:
                    target.report_failure(exc.reason)
                raise
        raise AssertionError("unreachable")

    async def _forward(
        self, call: Call, pod: str, *, sid: str | None = None, on_reply: OnReply | None = None,
        on_unsent: Callable[[], Awaitable[None]] | None = None, check_stale: bool = False,
    ) -> None:
        try:
            _, future = await self._send(call.context, pod, call.request)
        except UpstreamClosed as exc:
            if on_unsent is not None:
                await on_unsent()
            reply = rpc.unavailable(None, f"pod {pod} is unreachable: {exc.reason} (retry)",
                                    pod=pod)
            await self._answer(call, reply, pod=pod, sid=sid)
            return
        except UpstreamRefused as exc:
            reply = rpc.error(
                None, rpc.INTERNAL_ERROR,
                f"{exc}: over --acp-upstream http an acp 0.12.1 pod only knows the sessions "
                "created on the same connection (not loaded ones); use --acp-upstream ws",
                {"pod": pod, "httpStatus": exc.status},
            )
            await self._answer(call, reply, pod=pod, sid=sid)
            return
        if future is None:
            call.pod = pod
            call.finish(self.metrics, "OK")
            return
        self._relay(call, pod, future, sid, on_reply, check_stale)

    def _relay(
        self, call: Call, pod: str, future: asyncio.Future[Message], sid: str | None,
        on_reply: OnReply | None, check_stale: bool,
    ) -> None:
        """Relay the pod's answer by a task: the client's next message never waits for it."""
        call.context.spawn(self._relay_reply(call, pod, future, sid, on_reply, check_stale),
                           name=f"acp-reply:{call.request['method']}")

    async def _relay_reply(
        self, call: Call, pod: str, future: asyncio.Future[Message], sid: str | None,
        on_reply: OnReply | None, check_stale: bool,
    ) -> None:
        """Relay one answer (a task of its own); a router bug on the way still answers the
        client and records the call, as the front door's dispatch does for its own steps."""
        try:
            await self._relay_answer(call, pod, future, sid, on_reply, check_stale)
        except Exception as exc:  # one mapping for both front doors: logged and counted
            method = call.request["method"]
            abort = outcome_of(exc, PROTOCOL, method, "the pod's answer does not parse",
                               self.metrics)
            if call.finished:
                return  # the client has its answer: the bug came after it (logged, counted)
            await self._answer(call, rpc.error(None, rpc.code_for_status(abort.code.name),
                                               abort.details, {"details": repr(exc)}),
                               pod=pod, sid=sid)

    async def _relay_answer(
        self, call: Call, pod: str, future: asyncio.Future[Message], sid: str | None,
        on_reply: OnReply | None, check_stale: bool,
    ) -> None:
        try:
            reply = await future
        except UpstreamClosed as exc:
            reply = rpc.unavailable(
                None, f"pod {pod} closed the connection before answering: {exc.reason} (retry)",
                pod=pod,
            )
        if check_stale and sid is not None and "error" in reply:
            if await self._reroute_if_stale(call, pod, sid):
                return
        if on_reply is not None:
            reply = await on_reply(reply) or reply
        await self._answer(call, reply, pod=pod, sid=sid)

    async def _reroute_if_stale(self, call: Call, pod: str, sid: str) -> bool:
        """The pod erred on a cached route: if it says the session is not there, re-route once."""
        try:
            async with asyncio.timeout(self.config.probe_timeout_s):
                status = await self.core.backend.probe(pod, sid)  # UNKNOWN for a pod gone
        except TimeoutError:
            return False
        if status != NOT_FOUND:
            return False
        try:
            moved = await self.core.relocate(call, sid, pod)
        except NotLocated as exc:
            await self._not_located(call, sid, exc.located)
            return True
        if moved is None:
            await self._not_located(call, sid, Located(NOT_FOUND, None, SOURCE_PROBE))
            return True
        await self._forward(call, moved, sid=sid)
        return True
