"""The admission gate's counting (`router.admission.Admission`), without sockets: slots per
kind, 0 = unbounded, refusals counted with their pushback, and the values the metrics export."""

from __future__ import annotations

from typing import Any

import pytest

from router.admission import CALL, STREAM, UNBOUNDED, Admission
from router.metrics import Metrics


class Refusals:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def record_refused(self, protocol: str, kind: str) -> None:
        self.seen.append((protocol, kind))


def test_zero_means_unbounded_and_reads_back_as_zero() -> None:
    gate = Admission(max_calls=0, max_streams=0)
    assert gate.call_limit == gate.stream_limit == UNBOUNDED
    assert (gate.max_calls, gate.max_streams) == (0, 0)
    gate.calls = 10_000  # what the front doors count
    assert gate.snapshot() == {CALL: (10_000, 0), STREAM: (0, 0)}


def test_a_refusal_is_counted_with_its_protocol_and_kind_and_returns_the_pushback() -> None:
    refusals = Refusals()
    gate = Admission(max_calls=1, max_streams=1, pushback_ms=250, metrics=refusals)
    assert gate.refuse("macp", CALL) == 250
    assert gate.refuse("acp", STREAM) == 250
    assert refusals.seen == [("macp", CALL), ("acp", STREAM)]
    assert gate.refused == 2
    assert (gate.calls, gate.streams) == (0, 0)  # a refusal takes no slot


def test_retry_after_is_the_pushback_rounded_up_to_whole_seconds() -> None:
    assert Admission(pushback_ms=1).retry_after_s() == 1
    assert Admission(pushback_ms=1000).retry_after_s() == 1
    assert Admission(pushback_ms=1001).retry_after_s() == 2


def test_refusal_details_name_the_flag_the_bound_and_what_to_do() -> None:
    gate = Admission(max_calls=64, max_streams=8, pushback_ms=100)
    call = gate.details(CALL)
    assert "64" in call and "--max-inflight-calls" in call and "retry after 100 ms" in call
    assert "reached no pod" in call
    assert "--max-inflight-streams" in gate.details(STREAM) and "8" in gate.details(STREAM)


@pytest.mark.parametrize("kwargs", [{"max_calls": -1}, {"max_streams": -1},
                                    {"pushback_ms": 0}])
def test_nonsense_limits_are_rejected(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Admission(**kwargs)


def test_metrics_export_in_flight_limits_and_refusals() -> None:
    metrics = Metrics()
    gate = Admission(max_calls=3, max_streams=0, metrics=metrics)
    metrics.watch_admission(gate, ("macp", "acp"))
    registry = metrics.registry
    refused = "macp_router_admission_refused_total"
    assert registry.get_sample_value(refused, {"protocol": "acp", "kind": STREAM}) == 0
    gate.calls, gate.streams = 2, 1  # what the front doors count
    gate.refuse("acp", CALL)
    assert registry.get_sample_value("macp_router_admission_inflight", {"kind": CALL}) == 2
    assert registry.get_sample_value("macp_router_admission_inflight", {"kind": STREAM}) == 1
    assert registry.get_sample_value("macp_router_admission_limit", {"kind": CALL}) == 3
    assert registry.get_sample_value("macp_router_admission_limit", {"kind": STREAM}) == 0
    assert registry.get_sample_value(refused, {"protocol": "acp", "kind": CALL}) == 1
    assert registry.get_sample_value(refused, {"protocol": "macp", "kind": CALL}) == 0


# -- the MACP front door's wrapper (router.macp.handlers), driven without a gRPC server ---------

class AbortCalled(Exception):
    """What the fake context's abort raises (grpc.aio raises AbortError; here: this)."""


class FakeContext:
    """The few `grpc.aio.ServicerContext` calls the unary wrapper makes before a pod."""

    def __init__(self) -> None:
        self.aborted: tuple[object, str, tuple[tuple[str, str], ...]] | None = None

    async def abort(self, code: object, details: str = "",
                    trailing_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.aborted = (code, details, trailing_metadata)
        raise AbortCalled(details)

    def time_remaining(self) -> float | None:
        return None  # no deadline: a cancel is the client's (recorded CANCELLED)


def proxy_with(gate: Admission) -> Any:
    from router.locator import Locator
    from router.macp.handlers import MacpProxy
    from router.placement import RoundRobin
    from router.pods import PodSet
    from router.store import MemoryStore

    pods, metrics, store = PodSet(), Metrics(), MemoryStore()
    locator = Locator(roster=pods, store=store, probe=None, placement=RoundRobin(),  # type: ignore[arg-type]
                      metrics=metrics)
    return MacpProxy(pods=pods, locator=locator, store=store, metrics=metrics, admission=gate)


async def test_the_unary_wrapper_releases_its_slot_on_answer_error_and_cancel() -> None:
    import asyncio

    import grpc

    from router.routes import build_routes

    gate = Admission(max_calls=1, pushback_ms=70)
    proxy = proxy_with(gate)
    route = build_routes()["/macp.v1.MACPRuntimeService/GetSession"]
    release, entered = asyncio.Event(), asyncio.Event()
    seen: list[int] = []

    async def body(call: Any, request: bytes) -> bytes:
        seen.append(gate.calls)
        if request == b"boom":
            raise RuntimeError("an unexpected failure inside the call")
        if request == b"wait":
            entered.set()
            await release.wait()
        return b"answer"

    behavior = proxy._unary(route, body)
    assert await behavior(b"ok", FakeContext()) == b"answer"
    assert (seen, gate.calls) == ([1], 0)

    failing = FakeContext()
    with pytest.raises(AbortCalled):
        await behavior(b"boom", failing)
    assert failing.aborted is not None and failing.aborted[0] is grpc.StatusCode.INTERNAL
    assert gate.calls == 0

    waiting = asyncio.ensure_future(behavior(b"wait", FakeContext()))
    await asyncio.wait_for(entered.wait(), 5)
    assert gate.calls == 1
    refused = FakeContext()
    with pytest.raises(AbortCalled):
        await behavior(b"ok", refused)
    assert refused.aborted is not None
    code, _details, trailing = refused.aborted
    assert (code, trailing) == (grpc.StatusCode.UNAVAILABLE, (("grpc-retry-pushback-ms", "70"),))
    assert len(seen) == 3  # the refused call never reached the body
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert gate.calls == 0


async def test_an_unbounded_unary_wrapper_admits_every_call() -> None:
    import asyncio

    from router.routes import build_routes

    gate = Admission(max_calls=0)
    proxy = proxy_with(gate)
    release = asyncio.Event()
    behavior = proxy._unary(build_routes()["/macp.v1.MACPRuntimeService/GetSession"],
                            lambda _call, _request: release.wait())
    calls = [asyncio.ensure_future(behavior(b"", FakeContext())) for _ in range(500)]
    await asyncio.sleep(0)
    assert gate.calls == 500 and gate.refused == 0
    release.set()
    await asyncio.gather(*calls)
    assert gate.calls == 0
