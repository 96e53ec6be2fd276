"""The MACP backend of the session core: one unary call to one pod, and what its answer means.

`MacpBackend` is the `router.core.session_router.Backend` for gRPC runtime pods: it forwards a
client's bytes with the client's own metadata and deadline (`forward`), probes a pod with the
router's credentials (`probe`: GetSession), checks that a pod answers calls at all
(`answers`), and reads an answer for the core: "not here" (NOT_FOUND, or a Send Ack
SESSION_NOT_FOUND) and a start's outcome (Ack ok / SESSION_ALREADY_EXISTS accepted, another
error refused, an Ack with neither unknown).

Invariants:
- Client calls carry the client's own credentials upstream; the router's token is used only
  for its own probes and checks (`probe`, `answers`).
- A client's GetSession on a session the router does not know is its own probe
  (`answering_probe`): its bytes and credentials go to every pod, and the holder's answer
  (OK, or PERMISSION_DENIED: here, not yours) is the client's reply. An answer that says
  nothing about where the session is (UNAUTHENTICATED: the client's token) is asked again
  with the router's token, and is never a reply.
- A pod's status, details and trailing metadata reach the caller unchanged; a transport
  failure names the pod, marks it failed, and says retry.
- A connect failure (nothing was sent) is tried once more on the next pooled channel, and is
  the only failure after which a start's reservation may be released (`Abort.never_sent`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from google.protobuf.message import DecodeError
from macp.v1 import core_pb2

from router import routes, tracing
from router.core.call import Call
from router.core.errors import Abort
from router.core.session_router import StartOutcome
from router.core.status import LIVE, NOT_FOUND, UNKNOWN, LocateStatus
from router.locator import SOURCE_PROBE, Located, Locator
from router.pods import Pod, PodSet

log = logging.getLogger("macp_router.proxy")

_DROPPED_HEADERS = frozenset({"user-agent", "content-type", "te", "host", "connection"})
_NOT_FOUND_MARK = b"SESSION_NOT_FOUND"
_CONNECT_FAILURE_MARKS = ("failed to connect", "connection refused", "connect failed",
                          "dns resolution failed", "name resolution")
GET_SESSION_PATH = f"/{routes.SERVICE}/GetSession"
ANSWER_CHECK_SID = "macp-router-answer-check"  # no pod holds it: any answer is NOT_FOUND
ACK_WITHOUT_OK = "ACK_WITHOUT_OK"
"""What `ack_error_code` calls an Ack that neither says ok nor names an error."""


def forwardable(metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple:
    """Client metadata minus transport headers (`:authority`, `grpc-*`, user-agent, ...)."""
    if not metadata:
        return ()
    return tuple(
        (key, value)
        for key, value in metadata
        if key[0] != ":" and not key.startswith("grpc-") and key not in _DROPPED_HEADERS
    )


def is_connect_failure(exc: grpc.aio.AioRpcError) -> bool:
    if exc.code() is not grpc.StatusCode.UNAVAILABLE:
        return False
    details = (exc.details() or "").lower()
    return any(mark in details for mark in _CONNECT_FAILURE_MARKS)


def upstream_abort(pod: Pod, exc: grpc.aio.AioRpcError) -> Abort:
    """The pod's own status, unchanged; transport failures name the pod and say retry."""
    code = exc.code()
    trailing = forwardable(exc.trailing_metadata())
    if code is grpc.StatusCode.UNAVAILABLE:
        pod.report_failure(f"{exc.details() or 'unavailable'}")
        abort = Abort(
            code,
            f"pod {pod.name} ({pod.address}) unavailable: {exc.details() or 'no details'} (retry)",
            trailing,
        )
        abort.never_sent = is_connect_failure(exc)
        return abort
    return Abort(code, exc.details() or "", trailing)


async def unary_call(
    pod: Pod, path: str, request: bytes, metadata: Sequence[tuple[str, str | bytes]],
    timeout: float | None, span: str = "forward",
) -> tuple[grpc.aio.UnaryUnaryCall, bytes]:
    """One unary call to `pod`; a connect failure is tried once more on the next channel.

    After a pod restarts, one pooled channel can still sit in reconnect backoff (failing fast
    with "connection refused") while another is connected again. A connect failure means the
    request was never sent, so trying the next channel is safe.
    """
    if tracing.enabled:
        with tracing.forward_span(pod.name, pod.address, path, metadata, span) as metadata:
            return await _unary_call_retrying(pod, path, request, metadata, timeout)
    return await _unary_call_retrying(pod, path, request, metadata, timeout)


async def _unary_call_retrying(
    pod: Pod, path: str, request: bytes, metadata: Sequence[tuple[str, str | bytes]],
    timeout: float | None,
) -> tuple[grpc.aio.UnaryUnaryCall, bytes]:
    call = pod.unary(path)(request, metadata=metadata, timeout=timeout)
    try:
        return call, await call
    except grpc.aio.AioRpcError as exc:
        if not is_connect_failure(exc):
            raise
    call = pod.unary(path)(request, metadata=metadata, timeout=timeout)
    return call, await call


def ack_error_code(response: bytes) -> str:
    """The Ack error code of a SendResponse: "" when ok, ACK_WITHOUT_OK when the Ack is
    missing or has neither `ok` nor an error code (never read as success)."""
    ack = core_pb2.SendResponse.FromString(response).ack
    if ack.ok:
        return ""
    return ack.error.code or ACK_WITHOUT_OK


def send_error_code(pod: Pod, response: bytes, sid: str) -> str:
    """`ack_error_code`, with a pod's unparsable answer turned into an error naming it."""
    try:
        return ack_error_code(response)
    except DecodeError:
        log.warning("pod %s (%s) answered Send for session %s with bytes that are not a "
                    "SendResponse", pod.name, pod.address, sid)
        raise Abort(grpc.StatusCode.INTERNAL,
                    f"pod {pod.name} ({pod.address}) answered Send with bytes that are not a "
                    "SendResponse: is it a MACP runtime of a supported version? (check that "
                    "pod; whether it applied the message is unknown)") from None


def no_pod_message(pods: PodSet, method: str) -> str:
    if not len(pods):
        return f"{method}: no pods configured (start the router with --pods)"
    down = ", ".join(f"{pod.name} ({pod.last_error or 'not answering'})" for pod in pods)
    return f"{method}: no healthy pod: {down} (retry)"


class MacpBackend:
    """The session core's `Backend` for MACP runtime pods (see the module docstring)."""

    def __init__(
        self, pods: PodSet, router_metadata: Sequence[tuple[str, str]], locator: Locator
    ) -> None:
        self.pods = pods
        self.router_metadata = router_metadata  # a live view: a re-read token applies at once
        self.locator = locator

    @property
    def probe_timeout_s(self) -> float:
        return self.locator.probe_timeout_s

    def pod(self, name: str) -> Pod:
        pod = self.pods.get(name)
        if pod is None:
            raise Abort(grpc.StatusCode.UNAVAILABLE,
                        f"pod {name} is no longer in the pod set (retry)")
        return pod

    def any_pod(self, method: str) -> Pod:
        pod = self.pods.any_healthy()
        if pod is None:
            raise Abort(grpc.StatusCode.UNAVAILABLE, no_pod_message(self.pods, method))
        return pod

    async def forward(self, call: Call, name: str, request: bytes) -> bytes:
        """`call.route` to pod `name` with the client's bytes, metadata and deadline (taken
        from `call.context`); the pod's trailing metadata is passed back. One await below the
        route handler: this is the hot path's only frame between the core and the channel."""
        pod = self.pod(name)
        context: grpc.aio.ServicerContext = call.context
        try:
            upstream, response = await unary_call(
                pod, call.route.path, request,
                forwardable(context.invocation_metadata()), context.time_remaining(),
            )
        except grpc.aio.AioRpcError as exc:
            raise upstream_abort(pod, exc) from None
        trailing = await upstream.trailing_metadata()
        if trailing:
            context.set_trailing_metadata(forwardable(trailing))
        return response

    def not_here(self, call: Call, answer: bytes | Abort) -> bool:
        if answer.__class__ is bytes:
            return (_NOT_FOUND_MARK in answer and call.method == "Send"  # type: ignore[operator]
                    and send_error_code(self.pod(call.pod or ""), answer,  # type: ignore[arg-type]
                                        call.sid) == "SESSION_NOT_FOUND")
        return isinstance(answer, Abort) and answer.code is grpc.StatusCode.NOT_FOUND

    def start_outcome(self, call: Call, answer: bytes) -> StartOutcome:
        pod = self.pod(call.pod or "")
        error_code = send_error_code(pod, answer, call.sid)
        if error_code == ACK_WITHOUT_OK:
            # Accepted or not, nobody can tell: the reservation stays until its TTL.
            log.warning("pod %s (%s) answered SessionStart %s with an Ack that has neither ok "
                        "nor an error code; is it a MACP runtime of a supported version?",
                        pod.name, pod.address, call.sid)
            raise Abort(grpc.StatusCode.INTERNAL,
                        f"SessionStart {call.sid}: pod {pod.name} answered with an Ack that "
                        "has neither ok nor an error code, so whether it started the session "
                        "is unknown; check the session with GetSession before retrying, and "
                        f"check that pod {pod.name} runs a supported MACP runtime")
        if not error_code or error_code == "SESSION_ALREADY_EXISTS":
            return StartOutcome.ACCEPTED
        return StartOutcome.REFUSED

    async def not_found(self, call: Call, sid: str, request: bytes) -> bytes:
        """The runtime's own not-found answer: any pod gives it (nothing is created)."""
        pod = self.any_pod(call.method)
        call.pod = pod.name
        return await self.forward(call, pod.name, request)

    def answering_probe(self, call: Call, request: bytes) -> CallerProbe | None:
        """A GetSession miss probes with the client's own request and credentials, so the
        holder's answer is its reply (one pod call and one round trip less than probe, then
        forward); other methods are not probes (None)."""
        if call.route.path != GET_SESSION_PATH:
            return None
        return CallerProbe(self, request, forwardable(call.context.invocation_metadata()))

    async def probe(self, pod_name: str, sid: str) -> LocateStatus:
        """GetSession with the router's credentials: OK/PERMISSION_DENIED live, NOT_FOUND not."""
        pod = self.pods.get(pod_name)
        if pod is None:
            return UNKNOWN
        request = core_pb2.GetSessionRequest(session_id=sid).SerializeToString()
        try:
            await unary_call(pod, GET_SESSION_PATH, request, self.router_metadata,
                             self.probe_timeout_s, span="probe")
        except grpc.aio.AioRpcError as exc:
            return self._probe_status(pod, exc)
        return LIVE

    def _probe_status(self, pod: Pod, exc: grpc.aio.AioRpcError) -> LocateStatus:
        code = exc.code()
        if code is grpc.StatusCode.NOT_FOUND:
            return NOT_FOUND
        if code is grpc.StatusCode.PERMISSION_DENIED:
            # The runtime checks membership after authentication and lookup: the session
            # is here and the router's identity is not an observer of it.
            return LIVE
        if code is grpc.StatusCode.UNAUTHENTICATED:
            # Authentication comes before the lookup: nothing is known about the session,
            # and the router's token is what is wrong.
            pod.report_credentials_rejected("GetSession probe", code, exc.details() or "")
            return UNKNOWN
        if code is grpc.StatusCode.UNAVAILABLE:
            pod.report_failure(f"probe: {exc.details() or 'unavailable'}")
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
            pod.report_silent(f"probe: no answer within {self.probe_timeout_s * 1000:.0f} ms")
        return UNKNOWN

    async def answers(self, pod: Pod) -> bool:
        """Does `pod` answer a MACP call at all? (Any status but no answer or no connection.)"""
        request = core_pb2.GetSessionRequest(session_id=ANSWER_CHECK_SID).SerializeToString()
        try:
            await pod.unary(GET_SESSION_PATH)(
                request, metadata=self.router_metadata, timeout=self.probe_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.UNAVAILABLE)
        return True


class CallerProbe:
    """One client's GetSession as the locator's probe function (`MacpBackend.answering_probe`).

    Each pod gets the client's request bytes with the client's metadata, under the probe
    deadline. OK and PERMISSION_DENIED mean live, NOT_FOUND not found: those answers are kept
    per pod and one of them becomes the client's reply (`reply`). Any other answer says nothing
    about the session for this client (UNAUTHENTICATED: its token; RESOURCE_EXHAUSTED: its
    rate): the pod is asked again with the router's own probe, whose answer is never a reply.
    A pod that is down or silent is read as the router's probe reads it (no second call).
    """

    __slots__ = ("answers", "backend", "metadata", "request")

    def __init__(self, backend: MacpBackend, request: bytes,
                 metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self.backend = backend
        self.request = request
        self.metadata = metadata
        self.answers: dict[str, tuple[bytes, tuple] | Abort] = {}
        """pod -> (response, trailing metadata) for OK, or the pod's status as an `Abort`."""

    async def __call__(self, pod_name: str, sid: str) -> LocateStatus:
        backend = self.backend
        pod = backend.pods.get(pod_name)
        if pod is None:
            return UNKNOWN
        try:
            upstream, response = await unary_call(pod, GET_SESSION_PATH, self.request,
                                                  self.metadata, backend.probe_timeout_s,
                                                  span="probe")
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.NOT_FOUND or code is grpc.StatusCode.PERMISSION_DENIED:
                self.answers[pod_name] = upstream_abort(pod, exc)
                return NOT_FOUND if code is grpc.StatusCode.NOT_FOUND else LIVE
            if code is grpc.StatusCode.UNAVAILABLE or code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return backend._probe_status(pod, exc)  # the pod's trouble, not the client's
            return await backend.probe(pod_name, sid)
        self.answers[pod_name] = (response, forwardable(await upstream.trailing_metadata()))
        return LIVE

    def reply(self, call: Call, located: Located) -> bytes | None:
        """The pod's own answer to this client for `located`, set on `call` (an `Abort` is
        raised); None when this probe did not hear the pod that decided it."""
        if located.source != SOURCE_PROBE:
            return None
        if located.status == LIVE:
            assert located.pod is not None
            answer = self.answers.get(located.pod)
            pod = located.pod
        elif located.status == NOT_FOUND:
            pod, answer = next(((name, a) for name, a in self.answers.items()
                                if isinstance(a, Abort)
                                and a.code is grpc.StatusCode.NOT_FOUND), ("", None))
        else:
            return None
        if answer is None:
            return None
        call.pod = pod
        if isinstance(answer, Abort):
            raise answer
        response, trailing = answer
        if trailing:
            call.context.set_trailing_metadata(trailing)
        return response
