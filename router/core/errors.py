"""`Abort` and `outcome_of`: the one place where an exception becomes a status and a metric.

A handler anywhere in a front door or the core raises `Abort(code, details)` to answer the
caller with that status. `outcome_of` turns whatever a call ended with into (code, details,
trailing): an `Abort` as it says, a `WireError` (a frame the router routes on does not parse)
as INVALID_ARGUMENT, and any other exception, a router bug, as INTERNAL: logged with its
traceback and counted in `macp_router_unexpected_errors_total{protocol,method}` so it never
fails silently.

Invariants:
- Every exception a call ends with maps to exactly one status; an unexpected one is logged
  with its traceback and counted once, and the caller is told it is a router error.
- `asyncio.CancelledError` is not an outcome: callers handle cancellation themselves, and
  label it with `cancelled_code` (DEADLINE_EXCEEDED when the call's deadline had run out,
  else CANCELLED) so a call that ended by its deadline is never counted as cancelled.
- Status codes are gRPC's (`grpc.StatusCode`): the router's common status vocabulary (the ACP
  front door labels its JSON-RPC errors with the same names).
"""

from __future__ import annotations

import logging
from typing import Protocol

import grpc

from router.wire import WireError

log = logging.getLogger("macp_router.core")


class Abort(Exception):
    """Answer the caller with this status (raised inside handlers, turned into an abort)."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: tuple = ()
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing = trailing
        self.never_sent = False
        """The request provably never reached the pod (a connect failure)."""


DEADLINE_SLACK_S = 0.05
"""A cancel this close to the call's deadline is the deadline's. The client cancels at its own
deadline, which comes a hop earlier than the server's copy of it (the server's clock starts
when the request arrives), and the handler sees the cancel a loop turn or two later."""


def cancelled_code(time_remaining: float | None) -> str:
    """The status name a cancelled call is recorded with: DEADLINE_EXCEEDED when its deadline
    had (all but) run out (`time_remaining`: seconds left, None for no deadline), else
    CANCELLED (the client cancelled, or the router is ending the call)."""
    if time_remaining is not None and time_remaining <= DEADLINE_SLACK_S:
        return "DEADLINE_EXCEEDED"
    return "CANCELLED"


class _UnexpectedCounter(Protocol):
    def record_unexpected(self, protocol: str, method: str) -> None: ...


def outcome_of(
    exc: Exception, protocol: str, method: str, what: str, metrics: _UnexpectedCounter | None
) -> Abort:
    """The status a call that raised `exc` answers with (see the module docstring).

    `what` names what did not parse for a `WireError` ("request is not a valid
    SendRequest", ...).
    """
    if isinstance(exc, Abort):
        return exc
    if isinstance(exc, WireError):
        return Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: {what}: {exc}")
    log.error("%s %s failed with an unexpected %s: %s (a macp-router bug: report it with this "
              "traceback)", protocol, method, type(exc).__name__, exc, exc_info=exc)
    if metrics is not None:
        metrics.record_unexpected(protocol, method)
    return Abort(grpc.StatusCode.INTERNAL,
                 f"{method}: macp-router internal error ({type(exc).__name__}: {exc}); the "
                 "router logged it with a traceback: report it (retrying may not help)")
