"""Session-class MACP calls: the hot path.

A call on one session (`GetSession`, `CancelSession`, `Send` of a session envelope, ...) is
routed by its session id alone. The cache-hit path reads in one screen:

    sid = route.session_id(request)          # the one field the router reads (router.wire)
    core.session(call, sid, request)         # near-cache -> forward the bytes to that pod

`Send` is classified first (`routes.classify_envelope`): a session envelope takes the path
above, a SessionStart is placed (`router.macp.start`), an ambient Signal/Progress goes to any
healthy pod.

Invariants:
- A session call that does not name a session is INVALID_ARGUMENT and never forwarded.
- A session call goes only to the pod holding the session (`SessionRouter.session`).
"""

from __future__ import annotations

import grpc

from router import routes
from router.core.call import Call
from router.core.errors import Abort
from router.core.session_router import SessionRouter
from router.macp.backend import MacpBackend
from router.macp.start import start_unary
from router.routes import RouteClass


class SessionCalls:
    """Unary calls on one session, and `Send` (which may also start or be ambient)."""

    def __init__(self, core: SessionRouter, backend: MacpBackend) -> None:
        self.core = core
        self.backend = backend

    async def session_unary(self, call: Call, request: bytes) -> bytes:
        """The hot path: extract the sid, near-cache, forward the bytes."""
        sid = call.route.session_id(request)
        if not sid:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{call.method}: session_id is required")
        return await self.core.session(call, sid, request)

    async def send(self, call: Call, request: bytes) -> bytes:
        key = routes.classify_envelope(1, request)
        if key is None:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "Send: envelope is required")
        if key.route is RouteClass.SESSION:
            if not key.session_id:
                raise Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Send: session_id is required for a {key.message_type or 'untyped'} "
                    "envelope (only Signal and Progress may omit it)",
                )
            return await self.core.session(call, key.session_id, request)
        if key.route is RouteClass.START:
            return await start_unary(self.core, call, key.session_id, request)
        pod = self.backend.any_pod("Send")
        call.pod = pod.name
        return await self.backend.forward(call, pod.name, request)
