"""What an ACP pod's answer means to the session core (`router.acp.backend.AcpBackend`)."""

from __future__ import annotations

from router.acp import jsonrpc as rpc
from router.acp.backend import AcpBackend
from router.acp.config import AcpPodSpec
from router.acp.pods import AcpPodRoster
from router.core.call import Call
from router.core.session_router import StartOutcome

LOAD = Call("acp", "session/load", "load")


def backend() -> AcpBackend:
    return AcpBackend(AcpPodRoster([AcpPodSpec("a", "ws://127.0.0.1:1/acp")]))


def test_a_load_result_accepts_the_start() -> None:
    assert backend().start_outcome(LOAD, rpc.result(1, {})) is StartOutcome.ACCEPTED


def test_the_pods_own_error_refuses_the_start() -> None:
    reply = rpc.error(1, rpc.RESOURCE_NOT_FOUND, "no such session file")
    assert backend().start_outcome(LOAD, reply) is StartOutcome.REFUSED


def test_a_lost_connection_is_unknown_so_the_reservation_stays() -> None:
    reply = rpc.unavailable(1, "pod a closed the connection before answering")
    assert backend().start_outcome(LOAD, reply) is StartOutcome.UNKNOWN


def test_only_resource_not_found_means_not_here() -> None:
    b = backend()
    assert b.not_here(LOAD, rpc.error(1, rpc.RESOURCE_NOT_FOUND, "gone"))
    assert not b.not_here(LOAD, rpc.error(1, rpc.INTERNAL_ERROR, "boom"))
    assert not b.not_here(LOAD, rpc.result(1, {}))


async def test_a_pod_without_a_control_connection_is_probed_unknown() -> None:
    assert await backend().probe("a", "s1") == "unknown"
    assert await backend().probe("nope", "s1") == "unknown"


def test_router_statuses_map_to_json_rpc_codes_and_back() -> None:
    for code in (rpc.INVALID_PARAMS, rpc.METHOD_NOT_FOUND, rpc.AUTH_REQUIRED,
                 rpc.RESOURCE_NOT_FOUND, rpc.REQUEST_CANCELLED, rpc.ROUTER_UNAVAILABLE,
                 rpc.INTERNAL_ERROR):
        label = rpc.code_label(rpc.error(1, code, "x"))
        assert rpc.code_for_status(label) == code, label
    assert rpc.code_for_status("DATA_LOSS") == rpc.INTERNAL_ERROR
