"""JSON-RPC 2.0 messages as the ACP front door handles them: shapes, answers, error codes.

Messages stay plain dicts end to end (nothing is parsed into acp's pydantic models), so fields
the router does not know (`_meta`, newer protocol fields, extension methods) pass through.

Invariants:
- An answer to a client request carries the client's own `id` object, never a copy converted to
  another type: acp's client matches responses by id value *and* type (1 != "1").
- Router-made errors say what happened and what to do next; retryable ones carry
  `data.retryable = true` (and the pods that did not answer, when that is the reason).
"""

from __future__ import annotations

from typing import Any

Message = dict[str, Any]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
AUTH_REQUIRED = -32000
RESOURCE_NOT_FOUND = -32002
REQUEST_CANCELLED = -32800
# Implementation-defined server error (JSON-RPC reserves -32000..-32099; ACP uses -32000 and
# -32002): the router could not reach or locate what the call needs. Retry later.
ROUTER_UNAVAILABLE = -32010

# JSON-RPC error codes -> the status vocabulary of `macp_router_requests_total{code}` (gRPC code
# names), so one dashboard reads both protocols.
_CODE_LABELS = {
    PARSE_ERROR: "INVALID_ARGUMENT",
    INVALID_REQUEST: "INVALID_ARGUMENT",
    METHOD_NOT_FOUND: "UNIMPLEMENTED",
    INVALID_PARAMS: "INVALID_ARGUMENT",
    INTERNAL_ERROR: "INTERNAL",
    AUTH_REQUIRED: "UNAUTHENTICATED",
    RESOURCE_NOT_FOUND: "NOT_FOUND",
    REQUEST_CANCELLED: "CANCELLED",
    ROUTER_UNAVAILABLE: "UNAVAILABLE",
}


_FROM_STATUS = {"INVALID_ARGUMENT": INVALID_PARAMS, "UNIMPLEMENTED": METHOD_NOT_FOUND,
                "UNAUTHENTICATED": AUTH_REQUIRED, "NOT_FOUND": RESOURCE_NOT_FOUND,
                "CANCELLED": REQUEST_CANCELLED, "UNAVAILABLE": ROUTER_UNAVAILABLE}


def code_for_status(status_name: str) -> int:
    """The JSON-RPC error code for a router status (a gRPC code name); INTERNAL_ERROR else."""
    return _FROM_STATUS.get(status_name, INTERNAL_ERROR)


def is_request(message: Message) -> bool:
    return "method" in message and "id" in message


def is_notification(message: Message) -> bool:
    return "method" in message and "id" not in message


def is_response(message: Message) -> bool:
    return "id" in message and "method" not in message


def params_of(message: Message) -> dict[str, Any]:
    params = message.get("params")
    return params if isinstance(params, dict) else {}


def session_id_param(message: Message) -> str | None:
    sid = params_of(message).get("sessionId")
    return sid if isinstance(sid, str) and sid else None


def result(request_id: Any, value: Any) -> Message:
    return {"jsonrpc": "2.0", "id": request_id, "result": value}


def error(request_id: Any, code: int, message: str, data: Any = None) -> Message:
    body: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        body["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": body}


def reply_to(request_id: Any, reply: Message) -> Message:
    """A pod's reply (result or error) re-addressed to the client's original id."""
    answer: Message = {"jsonrpc": "2.0", "id": request_id}
    if "error" in reply:
        answer["error"] = reply["error"]
    else:
        answer["result"] = reply.get("result")
    return answer


def unavailable(request_id: Any, message: str, **data: Any) -> Message:
    return error(request_id, ROUTER_UNAVAILABLE, message, {"retryable": True, **data})


def error_code(reply: Message) -> int | None:
    err = reply.get("error")
    if not isinstance(err, dict):
        return None
    code = err.get("code")
    return code if isinstance(code, int) else INTERNAL_ERROR


def code_label(reply: Message) -> str:
    """`OK` for a result, else the gRPC-style name of the JSON-RPC error code."""
    code = error_code(reply)
    if code is None:
        return "OK"
    return _CODE_LABELS.get(code, "UNKNOWN")
