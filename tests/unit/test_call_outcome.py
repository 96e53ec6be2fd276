"""One call object per call, and the one place an exception becomes a status and a metric."""

from __future__ import annotations

import logging

import grpc

from router.core.call import Call
from router.core.errors import Abort, outcome_of
from router.core.status import LocateStatus
from router.metrics import Metrics
from router.wire import WireError


def _count(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_an_abort_is_answered_as_it_says_and_not_counted_as_unexpected() -> None:
    metrics = Metrics()
    abort = Abort(grpc.StatusCode.NOT_FOUND, "gone", (("k", "v"),))
    assert outcome_of(abort, "macp", "GetSession", "request", metrics) is abort
    assert _count(metrics, "macp_router_unexpected_errors_total",
                  protocol="macp", method="unknown") == 0


def test_a_frame_that_does_not_parse_is_invalid_argument_naming_it() -> None:
    abort = outcome_of(WireError("truncated varint"), "macp", "Send",
                       "request is not a valid SendRequest", Metrics())
    assert abort.code is grpc.StatusCode.INVALID_ARGUMENT
    assert abort.details == "Send: request is not a valid SendRequest: truncated varint"


def test_an_unexpected_exception_is_internal_logged_with_traceback_and_counted(caplog) -> None:
    metrics = Metrics()
    metrics.add_methods(["GetSession"])
    with caplog.at_level(logging.ERROR, logger="macp_router.core"):
        abort = outcome_of(KeyError("pod-7"), "macp", "GetSession", "request", metrics)
    assert abort.code is grpc.StatusCode.INTERNAL
    assert "KeyError" in abort.details and "report it" in abort.details
    assert caplog.records[-1].exc_info is not None  # the traceback is in the log
    assert _count(metrics, "macp_router_unexpected_errors_total",
                  protocol="macp", method="GetSession") == 1


def test_a_call_records_one_request_metric_with_its_last_pod_and_code() -> None:
    metrics = Metrics()
    metrics.add_methods(["GetSession"])
    metrics.known_pods.add("b")
    call = Call("macp", "GetSession", "session")
    call.pod = "b"
    call.finish(metrics, "NOT_FOUND")
    call.finish(metrics)  # a second finish records nothing
    assert _count(metrics, "macp_router_requests_total", protocol="macp", method="GetSession",
                  route="session", pod="b", code="NOT_FOUND") == 1
    assert _count(metrics, "macp_router_requests_total", protocol="macp", method="GetSession",
                  route="session", pod="b", code="OK") == 0


def test_locate_status_is_one_enum_that_reads_as_its_wire_strings() -> None:
    assert LocateStatus.LIVE == "live" and f"{LocateStatus.NOT_FOUND}" == "not_found"
    assert LocateStatus.of("live") is LocateStatus.LIVE
    assert LocateStatus.of("not_found") is LocateStatus.NOT_FOUND
    assert LocateStatus.of("garbage") is LocateStatus.UNKNOWN
    assert LocateStatus.of(None) is LocateStatus.UNKNOWN
