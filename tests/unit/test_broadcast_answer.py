"""What a registry call's caller is told about replay (`BroadcastCalls._answer`), socket-free:
the pods' outcomes are given, the answer and its metric are checked."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
from prometheus_client import CollectorRegistry

from router import routes
from router.core.errors import Abort
from router.macp.broadcast import BroadcastCalls
from router.metrics import Metrics
from router.pods import PodSet
from router.store import MemoryStore

KEY = "policy:p.one"
UNRECORDED = ("RegisterPolicy policy:p.one is in effect on the pods that answered, but the redis "
              "store did not record it for replay")


@dataclass
class Named:
    name: str


def calls() -> BroadcastCalls:
    metrics = Metrics(CollectorRegistry())
    metrics.add_methods(["RegisterPolicy"])
    return BroadcastCalls(pods=PodSet(), store=MemoryStore(), metrics=metrics,
                          routes_by_path=routes.build_routes(), router_metadata=(),
                          broadcast_timeout_s=1.0)


def partial(broadcasts: BroadcastCalls, unrecorded: str) -> str:
    held = [(Named("a"), b"", "")]
    failed = [(Named("b"), None, "DEADLINE_EXCEEDED")]
    with pytest.raises(Abort) as excinfo:
        broadcasts._answer("RegisterPolicy", KEY, held, [], failed,  # type: ignore[arg-type]
                           unrecorded)
    assert excinfo.value.code is grpc.StatusCode.UNAVAILABLE
    return excinfo.value.details


def test_a_partial_registration_the_store_recorded_says_it_is_replayed() -> None:
    details = partial(calls(), "")
    assert "applied on a; failed on b (DEADLINE_EXCEEDED)" in details
    assert "remembered and will be replayed" in details


def test_a_partial_registration_the_store_did_not_record_never_claims_a_replay() -> None:
    details = partial(calls(), UNRECORDED)
    assert "NOT remembered for replay" in details and UNRECORDED in details
    assert "will be replayed" not in details


def test_a_registration_every_pod_holds_is_the_pods_answer_whatever_the_store_did() -> None:
    broadcasts = calls()
    held = [(Named("a"), b"\x08\x01", ""), (Named("b"), b"\x08\x01", "")]
    assert broadcasts._answer("RegisterPolicy", KEY, held, [], [],  # type: ignore[arg-type]
                              UNRECORDED) == b"\x08\x01"
    assert broadcasts.metrics.registry.get_sample_value(
        "macp_router_broadcasts_total", {"method": "RegisterPolicy", "result": "ok"}) == 1
