"""The router's answer to ACP `initialize`: what every healthy pod supports.

A client initializes once with the router as if it were one agent; the router answers from the
`initialize` results its control connections got from the pods, merged (`merge_capabilities`),
waiting up to the connect timeout for a first healthy pod.

Invariants:
- The answer never claims a capability some healthy pod lacks; `protocolVersion` is the lowest
  a pod speaks, capped by the client's.
- With no healthy pod the answer is a retryable error naming every pod and its last error.
- The router adds `sessionCapabilities.status` (it answers `session/status` itself) and
  `_meta.macpRouter`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from router import __version__
from router.acp import jsonrpc as rpc
from router.acp.jsonrpc import Message
from router.acp.pods import AcpPodRoster

_DROP = object()


async def initialize_answer(roster: AcpPodRoster, message: Message,
                            timeout_s: float) -> Message:
    """The JSON-RPC answer to a client's `initialize` `message`."""
    pods = [pod for pod in roster if pod.healthy and pod.init_result]
    if not pods:
        await _wait_any_healthy(roster, timeout_s)
        pods = [pod for pod in roster if pod.healthy and pod.init_result]
    if not pods:
        return rpc.unavailable(
            message.get("id"),
            "no ACP pod answers: " + ", ".join(
                f"{pod.name} ({pod.last_error or 'down'})" for pod in roster
            ) + " (retry)",
        )
    client_version = rpc.params_of(message).get("protocolVersion")
    merged = merge_capabilities([pod.init_result for pod in pods], client_version)
    return rpc.result(message.get("id"), merged)


async def _wait_any_healthy(roster: AcpPodRoster, timeout: float) -> None:
    waits = [asyncio.ensure_future(pod.wait_healthy(timeout)) for pod in roster]
    try:
        pending = set(waits)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(task.result() for task in done):
                return
    finally:
        for task in waits:
            task.cancel()


def merge_capabilities(results: list[dict[str, Any]], client_version: Any) -> dict[str, Any]:
    """What every pod supports: the intersection of their `initialize` results.

    Dicts keep the keys all pods have (ACP capabilities are "present = supported"), booleans
    are AND-ed, other values survive only when equal; `protocolVersion` is the lowest, capped
    by the client's. The router adds `sessionCapabilities.status`: it answers it itself.
    """

    def intersect(values: list[Any]) -> Any:
        first = values[0]
        if all(isinstance(v, dict) for v in values):
            merged = {}
            for key in first:
                if all(key in v for v in values):
                    value = intersect([v[key] for v in values])
                    if value is not _DROP:
                        merged[key] = value
            return merged
        if all(isinstance(v, bool) for v in values):
            return all(values)
        return first if all(v == first for v in values) else _DROP

    merged = intersect(results) if results else {}
    versions = [r.get("protocolVersion") for r in results]
    ints = [v for v in versions if isinstance(v, int)]
    if isinstance(client_version, int):
        ints.append(client_version)
    merged["protocolVersion"] = min(ints) if ints else 1
    caps = merged.setdefault("agentCapabilities", {})
    session_caps = caps.get("sessionCapabilities")
    if not isinstance(session_caps, dict):
        session_caps = caps["sessionCapabilities"] = {}
    session_caps["status"] = {}
    meta = merged.get("_meta") if isinstance(merged.get("_meta"), dict) else {}
    merged["_meta"] = {**meta, "macpRouter": {"version": __version__, "pods": len(results)}}
    return merged
