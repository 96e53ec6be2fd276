"""The ACP `initialize` answer the router gives: what every pod supports, plus what it adds.

A client is told a capability only when every pod has it (a session may land on any pod), the
lowest protocol version wins (capped by the client's), and the router advertises
`sessionCapabilities.status`, which it answers itself.
"""

from __future__ import annotations

from typing import Any

from router import __version__
from router.acp.initialize import merge_capabilities


def pod(**caps: Any) -> dict[str, Any]:
    return {"protocolVersion": caps.pop("version", 1), "agentCapabilities": caps}


def test_a_capability_survives_only_when_every_pod_has_it() -> None:
    merged = merge_capabilities([
        pod(loadSession=True, sessionCapabilities={"resume": {}, "list": {}}),
        pod(loadSession=True, sessionCapabilities={"resume": {}}),
    ], client_version=1)
    caps = merged["agentCapabilities"]
    assert caps["loadSession"] is True
    assert caps["sessionCapabilities"] == {"resume": {}, "status": {}}


def test_booleans_are_and_ed_and_unequal_values_are_dropped() -> None:
    merged = merge_capabilities([
        pod(loadSession=True, promptCapabilities={"image": True, "audio": False}, tier="gold"),
        pod(loadSession=False, promptCapabilities={"image": True, "audio": True}, tier="silver"),
    ], client_version=1)
    caps = merged["agentCapabilities"]
    assert caps["loadSession"] is False
    assert caps["promptCapabilities"] == {"image": True, "audio": False}
    assert "tier" not in caps


def test_the_lowest_protocol_version_wins_capped_by_the_clients() -> None:
    assert merge_capabilities([pod(version=3), pod(version=2)], 5)["protocolVersion"] == 2
    assert merge_capabilities([pod(version=3), pod(version=4)], 1)["protocolVersion"] == 1
    assert merge_capabilities([pod(version=3)], "not-a-number")["protocolVersion"] == 3


def test_the_router_adds_session_status_and_names_itself() -> None:
    merged = merge_capabilities([{"protocolVersion": 1}], client_version=1)
    assert merged["agentCapabilities"]["sessionCapabilities"] == {"status": {}}
    assert merged["_meta"]["macpRouter"] == {"version": __version__, "pods": 1}


def test_a_pods_own_meta_is_kept_beside_the_routers() -> None:
    merged = merge_capabilities([{"protocolVersion": 1, "_meta": {"vendor": "x"}}] * 2, 1)
    assert merged["_meta"]["vendor"] == "x"
    assert merged["_meta"]["macpRouter"]["pods"] == 2


def test_no_pod_answer_still_gives_a_usable_answer() -> None:
    merged = merge_capabilities([], client_version=2)
    assert merged["protocolVersion"] == 2
    assert merged["agentCapabilities"]["sessionCapabilities"] == {"status": {}}
