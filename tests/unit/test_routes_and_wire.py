"""The route table and the wire reader: what the router learns from request bytes, and nothing else.

Requests are real protobuf messages serialized by the installed `macp.v1` classes, so these
tests hold the router's raw-bytes reading to what a client really sends; malformed frames are
built by hand.
"""

from __future__ import annotations

import pytest
from macp.v1 import core_pb2, envelope_pb2

from router import wire
from router.routes import (
    ROUTE_CLASSES,
    SERVICE,
    EnvelopeKey,
    RouteClass,
    Shape,
    broadcast_key,
    build_routes,
    classify_envelope,
    stream_session_key,
)

ROUTES = build_routes()
SID = "0190a5b4-7c1d-7aaa-8bbb-0123456789ab"


def route(method: str):  # type: ignore[no-untyped-def]
    return ROUTES[f"/{SERVICE}/{method}"]


def send(**envelope: str) -> bytes:
    return core_pb2.SendRequest(envelope=envelope_pb2.Envelope(**envelope)).SerializeToString()


# -- the route table ---------------------------------------------------------------------------
def test_every_method_of_the_service_has_a_route_and_every_declared_class_a_method() -> None:
    methods = {r.method for r in ROUTES.values()}
    assert set(ROUTE_CLASSES) <= methods
    for method, declared in ROUTE_CLASSES.items():
        assert route(method).route_class is declared, method


def test_session_methods_read_their_session_id_field_and_streams_have_their_shape() -> None:
    for r in ROUTES.values():
        if r.route_class is RouteClass.SESSION and r.method not in ("Send", "StreamSession"):
            assert r.session_field is not None, r.method
    assert route("StreamSession").shape is Shape.BIDI
    assert route("WatchSessions").shape is Shape.SERVER_STREAM
    assert route("GetSession").shape is Shape.UNARY


def test_a_session_requests_id_is_read_from_its_bytes() -> None:
    request = core_pb2.GetSessionRequest(session_id=SID).SerializeToString()
    assert route("GetSession").session_id(request) == SID
    assert route("GetSession").session_id(b"") == ""


def test_a_request_whose_other_string_is_not_utf8_is_refused_before_forwarding() -> None:
    cancel = route("CancelSession")
    assert cancel.other_strings, "CancelSession has a reason string"
    (other,) = cancel.other_strings
    request = core_pb2.CancelSessionRequest(session_id=SID).SerializeToString()
    bad = request + bytes([other << 3 | 2, 2, 0xC3, 0x28])
    with pytest.raises(wire.WireError, match="UTF-8"):
        cancel.session_id(bad)


# -- classify_envelope -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("envelope", "expected"),
    [
        ({"session_id": SID, "message_type": "SessionStart"}, RouteClass.START),
        ({"session_id": SID, "message_type": "Proposal"}, RouteClass.SESSION),
        ({"message_type": "Signal"}, RouteClass.AMBIENT),
        ({"message_type": "Progress"}, RouteClass.AMBIENT),
        ({"session_id": SID, "message_type": "Signal"}, RouteClass.SESSION),
        ({"message_type": "Proposal"}, RouteClass.SESSION),
    ],
    ids=["start", "session-message", "ambient-signal", "ambient-progress",
         "signal-in-a-session", "no-session-is-still-session-scoped"],
)
def test_an_envelope_is_classified_by_its_type_and_session(envelope, expected) -> None:
    key = classify_envelope(1, send(**envelope))
    assert key == EnvelopeKey(envelope.get("session_id", ""), envelope["message_type"], expected)


def test_a_frame_without_an_envelope_is_no_route() -> None:
    assert classify_envelope(1, b"") is None


def test_a_malformed_envelope_is_a_wire_error_never_a_route() -> None:
    truncated = send(session_id=SID, message_type="SessionStart")[:-3]
    with pytest.raises(wire.WireError):
        classify_envelope(1, truncated)
    not_utf8 = bytes([0x0A, 4, 0x2A, 2, 0xC3, 0x28])  # envelope{session_id: invalid UTF-8}
    with pytest.raises(wire.WireError, match="UTF-8"):
        classify_envelope(1, not_utf8)


def test_a_stream_frame_is_an_envelope_or_a_subscription() -> None:
    subscribe = core_pb2.StreamSessionRequest(subscribe_session_id=SID).SerializeToString()
    assert stream_session_key(subscribe) == EnvelopeKey(SID, "", RouteClass.SESSION)
    start = core_pb2.StreamSessionRequest(
        envelope=envelope_pb2.Envelope(session_id=SID, message_type="SessionStart"))
    assert stream_session_key(start.SerializeToString()).route is RouteClass.START


def test_a_broadcast_names_its_registry_entry_and_whether_it_adds_it() -> None:
    unregister = route("UnregisterPolicy")
    request = unregister.request_class(policy_id="p1").SerializeToString()
    assert broadcast_key(unregister, request) == ("policy:p1", False)
    promote = route("PromoteMode")
    request = promote.request_class(mode="m1").SerializeToString()
    assert broadcast_key(promote, request) == ("promote:m1", True)


# -- wire.scan / wire.text -----------------------------------------------------------------------
def test_scan_returns_the_last_occurrence_of_each_wanted_field() -> None:
    buf = bytes([0x0A, 1, ord("x"), 0x12, 1, ord("y"), 0x0A, 1, ord("z")])
    first, second, absent = wire.scan(buf, (1, 2, 9))
    assert (wire.text(buf, first), wire.text(buf, second), absent) == ("z", "y", None)
    assert wire.text(buf, absent) == ""


def test_scan_steps_over_varint_and_fixed_width_fields() -> None:
    buf = (bytes([0x08, 0x96, 0x01])  # field 1 varint 150
           + bytes([0x11]) + bytes(8)  # field 2 fixed64
           + bytes([0x1D]) + bytes(4)  # field 3 fixed32
           + bytes([0x22, 2]) + b"ok")  # field 4 string
    (span,) = wire.scan(buf, (4,))
    assert wire.text(buf, span) == "ok"


@pytest.mark.parametrize(
    ("buf", "wanted", "problem"),
    [
        (bytes([0x0A, 5, ord("x")]), (1,), "runs past the end"),
        (bytes([0x08]), (2,), "truncated varint"),
        (bytes([0x08]) + bytes([0xFF] * 10) + bytes([1]), (2,), "longer than 10 bytes"),
        (bytes([0x02, 0]), (1,), "field number 0"),
        (bytes([0x08, 1]), (1,), "expected length-delimited"),
        (bytes([0x0B]), (2,), "unsupported wire type"),
        (bytes([0x11, 0, 0]), (3,), "runs past the end"),
    ],
    ids=["length-past-end", "truncated-varint", "long-varint", "field-zero",
         "wanted-field-not-bytes", "group", "fixed64-past-end"],
)
def test_scan_refuses_a_malformed_message(buf: bytes, wanted: tuple[int, ...],
                                          problem: str) -> None:
    with pytest.raises(wire.WireError, match=problem):
        wire.scan(buf, wanted)


def test_scan_reads_only_inside_the_span_it_is_given() -> None:
    inner = bytes([0x2A, 2]) + b"id"
    outer = bytes([0x0A, len(inner)]) + inner + bytes([0x2A, 3]) + b"out"
    (span,) = wire.scan(outer, (1,))
    (sid,) = wire.scan(outer, (5,), span[0], span[1])
    assert wire.text(outer, sid) == "id"
