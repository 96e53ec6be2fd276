"""The ACP backend of the session core: probes, health and what an ACP answer means.

`AcpBackend` is the `router.core.session_router.Backend` for ACP agent pods. The front door
forwards ACP calls itself (a reply is relayed by a task, so a client's next message never waits
for this one's answer) and asks the core to locate, relocate, place and settle; this backend
gives the core a pod's word: `probe` (`session/status` on the router's control connection),
`answers` (the control connection is up), `not_here` (a JSON-RPC error RESOURCE_NOT_FOUND) and
`start_outcome` (a `session/load` answer: a result accepts, the pod's own error refuses, the
router's "unavailable" (the connection died) is unknown: the pod may have loaded it).

Invariants:
- Only a pod's own answer is read as REFUSED; a lost connection never releases a reservation.
"""

from __future__ import annotations

from typing import Any

from router.acp import jsonrpc as rpc
from router.acp.pods import AcpPod, AcpPodRoster
from router.core.call import Call
from router.core.session_router import StartOutcome
from router.core.status import LocateStatus


class AcpBackend:
    """The session core's `Backend` for ACP pods (see the module docstring)."""

    def __init__(self, roster: AcpPodRoster) -> None:
        self.roster = roster

    async def probe(self, pod: str, sid: str) -> LocateStatus:
        return await self.roster.probe(pod, sid)

    async def answers(self, pod: AcpPod) -> bool:
        return pod.healthy

    def not_here(self, call: Call, answer: Any) -> bool:
        return isinstance(answer, dict) and rpc.error_code(answer) == rpc.RESOURCE_NOT_FOUND

    def start_outcome(self, call: Call, answer: Any) -> StartOutcome:
        if "result" in answer:
            return StartOutcome.ACCEPTED
        if rpc.error_code(answer) == rpc.ROUTER_UNAVAILABLE:
            return StartOutcome.UNKNOWN
        return StartOutcome.REFUSED
