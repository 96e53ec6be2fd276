"""ACP fan-out routes: `authenticate` to every upstream a client has, `session/list` merged.

Invariants:
- `authenticate` succeeds if any pod accepted it; its parameters are replayed on the client's
  later upstreams.
- `session/list` asks every healthy pod for all its pages, merges by sessionId, and names the
  pods that did not answer (`_meta.macpRouter.unavailablePods`) instead of hiding them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from router.acp import jsonrpc as rpc
from router.acp import routes
from router.acp.connection import VirtualConnection
from router.acp.forwarding import AcpForwarding
from router.acp.jsonrpc import Message
from router.acp.upstream import UpstreamClosed


class AcpFanOutRoutes(AcpForwarding):
    """Broadcast and list routes of the ACP front door."""

    async def _route_broadcast(
        self, connection: VirtualConnection, request: Message, sid: str | None
    ) -> None:
        """authenticate: every upstream the client has (one if none); replayed on later ones."""
        call = self._call(connection, request, routes.BROADCAST)
        targets = sorted(connection.upstreams)
        if not targets:
            pod = self.roster.any_healthy()
            targets = [pod.name] if pod is not None else []
        if not targets:
            await self._answer(call, rpc.unavailable(None, "no ACP pod is healthy (retry)"))
            return
        params = request.get("params")

        async def one(pod: str) -> Message:
            try:
                upstream = await connection.upstream(pod)
                return await upstream.call(request["method"], params,
                                           self.config.fanout_timeout_ms / 1000)
            except (UpstreamClosed, TimeoutError) as exc:
                return rpc.unavailable(None, f"pod {pod} did not answer: {exc!r} (retry)")

        async def run() -> None:
            replies = await asyncio.gather(*(one(pod) for pod in targets))
            errors = [reply for reply in replies if "error" in reply]
            if len(errors) < len(replies) and isinstance(params, dict):
                connection.auth_params = params
            await self._answer(call, errors[0] if errors else replies[0])

        connection.spawn(run(), name="acp-broadcast")

    async def _route_list(
        self, connection: VirtualConnection, request: Message, sid: str | None
    ) -> None:
        """session/list on every healthy pod, all pages; merged, de-duplicated by sessionId."""
        call = self._call(connection, request, routes.LIST)
        params = dict(rpc.params_of(request))
        params.pop("cursor", None)  # the router answers with one merged page
        timeout = self.config.fanout_timeout_ms / 1000

        async def one(pod: str) -> tuple[str, list[Any] | Message]:
            sessions: list[Any] = []
            cursor = None
            try:
                upstream = await connection.upstream(pod)
                for _ in range(self.config.list_max_pages):
                    page_params = {**params, "cursor": cursor} if cursor else params
                    reply = await upstream.call(request["method"], page_params, timeout)
                    if "error" in reply:
                        return pod, reply
                    result = reply.get("result") or {}
                    sessions.extend(result.get("sessions") or [])
                    cursor = result.get("nextCursor")
                    if not cursor:
                        break
            except (UpstreamClosed, TimeoutError) as exc:
                return pod, rpc.unavailable(None, f"pod {pod} did not answer: {exc!r}")
            return pod, sessions

        async def run() -> None:
            pods = self.roster.names()
            healthy = [pod.name for pod in self.roster.healthy()]
            answers = await asyncio.gather(*(one(pod) for pod in healthy))
            merged: list[Any] = []
            seen: set[str] = set()
            failed = [pod for pod in pods if pod not in healthy]
            errors: list[Message] = []
            for pod, answer in answers:
                if isinstance(answer, dict):
                    failed.append(pod)
                    errors.append(answer)
                    continue
                for info in answer:
                    key = info.get("sessionId") if isinstance(info, dict) else None
                    if isinstance(key, str) and key not in seen:
                        seen.add(key)
                        merged.append(info)
            if len(errors) == len(answers):
                reply = errors[0] if errors else rpc.unavailable(
                    None, "no ACP pod is healthy (retry)")
            else:
                result: dict[str, Any] = {"sessions": merged}
                if failed:
                    result["_meta"] = {"macpRouter": {"unavailablePods": sorted(failed)}}
                reply = rpc.result(None, result)
            await self._answer(call, reply)

        connection.spawn(run(), name="acp-list")
