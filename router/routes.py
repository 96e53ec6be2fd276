"""The routing surface: every method of `macp.v1.MACPRuntimeService` and how it is routed.

The table is data (`ROUTE_CLASSES`); the whole surface reads at a glance and adding a method is
one line. Methods of the installed proto that the table misses are still routed by the rule of
their class, derived from the request message: a request with a `session_id` string field is
session-scoped; anything else goes to one healthy pod.

Route classes:
- session: the request names a session; it goes to the pod that holds it. `Send` and the first
  `StreamSession` frame are classified per request into session / start / ambient by
  `classify_envelope`.
- fanout: sent to every pod, results merged (ListSessions, WatchSessions, WatchSignals).
- broadcast: sent to every healthy pod and remembered for replay (registry mutations).
- any: one healthy pod, round robin.

Invariants: a session id is read from raw bytes by `router.wire` (never by deserializing the
whole request); a frame that does not parse raises `WireError` before anything is forwarded.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from macp.v1 import core_pb2, envelope_pb2, policy_pb2  # noqa: F401  (policy_pb2 registers its messages)

from router import wire

SERVICE = "macp.v1.MACPRuntimeService"
_SERVICE_DESCRIPTOR = core_pb2.DESCRIPTOR.services_by_name["MACPRuntimeService"]

SESSION_START = "SessionStart"
# Envelope fields read as text: session_id and message_type (routing) first, then the other
# string fields, checked too: a pod cannot decode an envelope with a bad string in any of them.
_ENVELOPE_TEXT = (5, 3, *(f.number for f in envelope_pb2.Envelope.DESCRIPTOR.fields
                          if f.type == _descriptor.FieldDescriptor.TYPE_STRING
                          and f.number not in (5, 3)))
AMBIENT_MESSAGE_TYPES = frozenset({"Signal", "Progress"})


class RouteClass(enum.StrEnum):
    SESSION = "session"
    START = "start"
    AMBIENT = "ambient"
    FANOUT = "fanout"
    BROADCAST = "broadcast"
    ANY = "any"


class Shape(enum.StrEnum):
    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    CLIENT_STREAM = "client_stream"
    BIDI = "bidi"


# Declared route class of every method known to this version. Send and StreamSession are
# "session" here and refined per request (start / ambient) by classify_envelope.
ROUTE_CLASSES: dict[str, RouteClass] = {
    "Send": RouteClass.SESSION,
    "StreamSession": RouteClass.SESSION,
    "GetSession": RouteClass.SESSION,
    "CancelSession": RouteClass.SESSION,
    "SuspendSession": RouteClass.SESSION,
    "ResumeSession": RouteClass.SESSION,
    "WhatIfReplay": RouteClass.SESSION,
    "GetDecisionReceipt": RouteClass.SESSION,
    "ListSessions": RouteClass.FANOUT,
    "WatchSessions": RouteClass.FANOUT,
    "WatchSignals": RouteClass.FANOUT,
    "RegisterPolicy": RouteClass.BROADCAST,
    "UnregisterPolicy": RouteClass.BROADCAST,
    "RegisterExtMode": RouteClass.BROADCAST,
    "UnregisterExtMode": RouteClass.BROADCAST,
    "PromoteMode": RouteClass.BROADCAST,
    "Initialize": RouteClass.ANY,
    "GetManifest": RouteClass.ANY,
    "ListModes": RouteClass.ANY,
    "WatchModeRegistry": RouteClass.ANY,
    "ListRoots": RouteClass.ANY,
    "WatchRoots": RouteClass.ANY,
    "ListExtModes": RouteClass.ANY,
    "GetPolicy": RouteClass.ANY,
    "ListPolicies": RouteClass.ANY,
    "WatchPolicies": RouteClass.ANY,
    "GetReceiptKeys": RouteClass.ANY,
}

# Registry mutations remembered for replay: method -> (kind of key, adds or removes the entry).
BROADCAST_REGISTRY: dict[str, tuple[str, bool]] = {
    "RegisterPolicy": ("policy", True),
    "UnregisterPolicy": ("policy", False),
    "RegisterExtMode": ("ext_mode", True),
    "UnregisterExtMode": ("ext_mode", False),
    "PromoteMode": ("promote", True),
}


@dataclass(frozen=True, slots=True)
class EnvelopeKey:
    """What routing needs from an envelope-carrying frame."""

    session_id: str
    message_type: str
    route: RouteClass


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    route_class: RouteClass
    shape: Shape
    session_field: int | None
    """Field number of `session_id` in the request, for plain session-scoped requests."""
    request_class: type
    response_class: type
    other_strings: tuple[int, ...] = ()
    """The request's other top-level string fields, checked as UTF-8 by `session_id`."""
    nested: bool = False
    """The request holds sub-messages: `session_id` validates it with a full parse."""

    def session_id(self, request: bytes) -> str:
        """The session id of a plain session-scoped request ("" when absent).

        Raises `wire.WireError` for a request the pod could not decode, so it is never
        forwarded: any string field that is not UTF-8, or (requests with sub-messages, all rare
        control calls) anything protobuf rejects.
        """
        assert self.session_field is not None
        span, *others = wire.scan(request, (self.session_field, *self.other_strings))
        for other in others:
            wire.text(request, other)
        if self.nested:
            try:
                self.request_class.FromString(request)
            except DecodeError as exc:
                raise wire.WireError(str(exc)) from None
        return wire.text(request, span)


def classify_envelope(envelope_field: int, request: bytes) -> EnvelopeKey | None:
    """Route of a Send request or StreamSession frame carrying an envelope in `envelope_field`.

    Returns None when the frame has no envelope (a StreamSession subscribe frame).
    Raises `wire.WireError` when the frame or its envelope is malformed.
    """
    (span,) = wire.scan(request, (envelope_field,))
    if span is None:
        return None
    sid_span, type_span, *others = wire.scan(request, _ENVELOPE_TEXT, span[0], span[1])
    session_id = wire.text(request, sid_span)
    message_type = wire.text(request, type_span)
    for other in others:
        wire.text(request, other)
    if message_type == SESSION_START:
        route = RouteClass.START
    elif not session_id and message_type in AMBIENT_MESSAGE_TYPES:
        route = RouteClass.AMBIENT
    else:
        route = RouteClass.SESSION
    return EnvelopeKey(session_id, message_type, route)


def stream_session_key(frame: bytes) -> EnvelopeKey:
    """Route of StreamSession's first client frame: an envelope, or a subscription."""
    key = classify_envelope(1, frame)
    (span,) = wire.scan(frame, (2,))
    subscribe = wire.text(frame, span)  # checked even beside an envelope: the pod decodes it
    if key is not None:
        return key
    return EnvelopeKey(subscribe, "", RouteClass.SESSION)


def _shape(method: _descriptor.MethodDescriptor) -> Shape:
    if method.client_streaming and method.server_streaming:
        return Shape.BIDI
    if method.server_streaming:
        return Shape.SERVER_STREAM
    if method.client_streaming:
        return Shape.CLIENT_STREAM
    return Shape.UNARY


def _session_field(message: _descriptor.Descriptor) -> int | None:
    field = message.fields_by_name.get("session_id")
    if field is None or field.type != _descriptor.FieldDescriptor.TYPE_STRING:
        return None
    return field.number


def _derive_class(method: _descriptor.MethodDescriptor) -> RouteClass:
    if _session_field(method.input_type) is not None:
        return RouteClass.SESSION
    return RouteClass.ANY


def build_routes() -> dict[str, Route]:
    """Every method of the installed service, keyed by its full path."""
    routes: dict[str, Route] = {}
    for method in _SERVICE_DESCRIPTOR.methods:
        route_class = ROUTE_CLASSES.get(method.name) or _derive_class(method)
        session_field = _session_field(method.input_type)
        if route_class is RouteClass.SESSION and method.name not in ("Send", "StreamSession"):
            if session_field is None:
                raise RuntimeError(f"{method.name} is session-scoped but has no session_id field")
        path = f"/{SERVICE}/{method.name}"
        routes[path] = Route(
            method=method.name,
            path=path,
            route_class=route_class,
            shape=_shape(method),
            session_field=session_field,
            request_class=message_factory.GetMessageClass(method.input_type),
            response_class=message_factory.GetMessageClass(method.output_type),
            other_strings=tuple(
                f.number for f in method.input_type.fields
                if f.type == _descriptor.FieldDescriptor.TYPE_STRING and f.number != session_field
            ),
            nested=any(f.type == _descriptor.FieldDescriptor.TYPE_MESSAGE
                       for f in method.input_type.fields),
        )
    return routes


def broadcast_key(route: Route, request: bytes) -> tuple[str, bool]:
    """Registry key of a broadcast request and whether the call adds (True) or removes it."""
    kind, adds = BROADCAST_REGISTRY[route.method]
    message = route.request_class.FromString(request)
    if route.method == "RegisterPolicy":
        name = message.policy_descriptor.policy_id
    elif route.method == "UnregisterPolicy":
        name = message.policy_id
    elif route.method == "RegisterExtMode":
        name = message.mode_descriptor.mode
    else:
        name = message.mode
    return f"{kind}:{name}", adds

