"""Streaming MACP calls: server streams on a session or any pod, and relayed bidi streams.

A server stream (`WatchSession`-style on one session, or an `any` stream) is routed once and
relayed message by message. A bidi stream (`StreamSession`) is routed by its first frame: a
SessionStart is placed (`router.macp.start`), an ambient frame goes to any pod, a session frame
to the pod holding the session; `_BidiRelay` then relays raw bytes both ways and reads only the
pod's first answer, to settle a start's reservation or to move a stale route once.

Invariants:
- A server stream is never retried (its messages cannot be replayed to the caller).
- Until a bidi stream's first answer, at most STREAM_REPLAY_FRAMES client frames are kept for a
  transparent re-route; after it, nothing is kept or parsed (raw bytes, no lock).
- A stale route moves a stream at most once, only to a pod that says it holds the session.
- A client's half-close is passed upstream at once (no timer on the data path); a client's
  cancel reaches the pod as a cancel of the upstream call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Protocol

import grpc
from google.protobuf.message import DecodeError
from macp.v1 import core_pb2

from router import routes, tracing
from router.core.call import Call
from router.core.errors import Abort
from router.core.session_router import NotLocated, SessionRouter
from router.macp.backend import MacpBackend, forwardable, upstream_abort
from router.macp.start import outcome_of_answer, outcome_of_status, place_for_stream
from router.pods import Pod, PodSet
from router.routes import RouteClass

log = logging.getLogger("macp_router.proxy")


class StreamHost(Protocol):
    """What the stream routes need of the proxy (`router.macp.handlers.MacpProxy`); a
    protocol here so this module does not import the handlers that import it."""

    @property
    def core(self) -> SessionRouter: ...

    @property
    def backend(self) -> MacpBackend: ...

    @property
    def pods(self) -> PodSet: ...

    @property
    def first_answer_warn_s(self) -> float: ...

STREAM_REPLAY_FRAMES = 64
"""Frames kept until a stream's first answer, for a transparent re-route (beyond: no re-route)."""
FIRST_ANSWER_WARN_S = 10.0
EOF_CANCEL_YIELDS = 2
"""Loop turns a client's end-of-stream waits for a cancel grpc delivers with it (no timer)."""
UNKNOWN_SESSION_CODES = frozenset({"UnknownSession", "SESSION_NOT_FOUND"})
"""Inline StreamSession error codes for "this pod does not hold the session" (the runtime puts
its status message in `code`: "UnknownSession"; older sims and the Ack use SESSION_NOT_FOUND)."""


async def relay_server_stream(pod: Pod, call: Call, request: bytes) -> None:
    """Open `call.route` on `pod` and relay its messages, metadata and status to the caller."""
    context: grpc.aio.ServicerContext = call.context
    path = call.route.path
    upstream = pod.unary_stream(path)(
        request,
        metadata=tracing.stream_metadata(pod.name, pod.address, path,
                                         forwardable(context.invocation_metadata())),
        timeout=context.time_remaining(),
    )
    try:
        initial = await upstream.initial_metadata()
        if initial:
            await context.send_initial_metadata(forwardable(initial))
        async for message in upstream:
            await context.write(message)
    except grpc.aio.AioRpcError as exc:
        raise upstream_abort(pod, exc) from None
    finally:
        upstream.cancel()
    trailing = await upstream.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(forwardable(trailing))


class StreamCalls:
    """Server streams on one session, and every bidi stream."""

    def __init__(self, proxy: StreamHost) -> None:
        self.proxy = proxy
        self.core = proxy.core
        self.backend = proxy.backend

    async def session_server_stream(self, call: Call, request: bytes) -> None:
        sid = call.route.session_id(request)
        if not sid:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{call.method}: session_id is required")
        pod, _holds = await self.stream_pod(call, sid)  # no retry: it cannot be replayed
        await relay_server_stream(pod, call, request)

    async def stream_pod(self, call: Call, sid: str) -> tuple[Pod, bool]:
        """The pod for a stream on `sid`, and whether it is believed to hold it.

        False means no pod holds it: any pod gives the runtime's own not-found answer.
        """
        call.sid = sid
        name = self.core.locator.try_cached(sid)
        if name is None:
            name = await self.core.locate(call, sid)
            if name is None:
                pod = self.backend.any_pod(call.method)
                call.pod = pod.name
                return pod, False
        call.pod = name
        return self.backend.pod(name), True

    async def bidi(self, call: Call) -> None:
        context: grpc.aio.ServicerContext = call.context
        first = await context.read()
        if first is grpc.aio.EOF:
            return  # the client half-closed without a frame: nothing to route
        assert isinstance(first, bytes)
        plan = await self._plan(call, first)
        call.pod = plan.pod.name
        relay = _BidiRelay(self.proxy, plan, call, first)
        try:
            await relay.run()
        finally:
            await relay.close()

    async def _plan(self, call: Call, first: bytes) -> _StreamRoute:
        """Where a bidi stream goes, from its first frame."""
        if call.method != "StreamSession":
            return _StreamRoute(self.backend.any_pod(call.method))
        key = routes.stream_session_key(first)
        if key.route is RouteClass.START:
            owner, won = await place_for_stream(self.core, call, key.session_id)
            return _StreamRoute(self.backend.pod(owner), sid=key.session_id, start=True,
                                won=won, expects_answer=True)
        if key.route is RouteClass.AMBIENT:
            return _StreamRoute(self.backend.any_pod(call.method))
        if not key.session_id:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        "StreamSession: the first frame must name a session "
                        "(envelope.session_id or subscribe_session_id)")
        pod, holds = await self.stream_pod(call, key.session_id)
        return _StreamRoute(pod, sid=key.session_id, relocatable=holds,
                            expects_answer=bool(key.message_type))


@dataclass(slots=True)
class _StreamRoute:
    """Where a bidi stream goes and what its first answer must settle."""

    pod: Pod
    sid: str = ""
    start: bool = False
    """The first frame is a SessionStart placed on `pod`."""
    won: bool = False
    """This call made the reservation (it may release it)."""
    relocatable: bool = False
    """`pod` was located as the holder: an "unknown session" first answer means a stale route."""
    expects_answer: bool = False
    """The first frame carries an envelope: the runtime answers it (echo or inline error)."""


class _BidiRelay:
    """One relayed bidi call: client frames up, pod frames down, one re-route at most.

    Its first answer is read to settle the route:
    - a session stream whose pod answers "unknown session" (inline MACPError or NOT_FOUND)
      before anything was accepted: the route was stale. The entry is dropped, the session
      re-located, and the frames sent so far are re-sent on the right pod; the client never
      sees the stale pod's answer.
    - a stream that starts a session: the echoed SessionStart (or ALREADY_EXISTS) confirms
      the reservation, INVALID_ARGUMENT or an inline error releases it.
    Until then the frames sent up are kept (at most STREAM_REPLAY_FRAMES) so they can be
    re-sent on another pod; the upstream call is swapped under `_lock`, which the client pump
    holds while it writes. After the first answer nothing is kept or parsed.
    """

    def __init__(self, proxy: StreamHost, plan: _StreamRoute, call: Call, first: bytes) -> None:
        self.proxy = proxy
        self.core = proxy.core
        self.plan = plan
        self.route = call.route
        self.call_info = call
        self.context: grpc.aio.ServicerContext = call.context
        self.pod = plan.pod
        self.metadata = forwardable(self.context.invocation_metadata())
        self.first = first
        self.kept: list[bytes] | None = [first] if plan.relocatable else None
        """Frames sent before the first answer, kept for a re-route (relocatable streams)."""
        self.settled = False
        self.rerouted = False
        self.client_done = False
        self._lock = asyncio.Lock()
        self.call = self._open(self.pod)
        self._pump: asyncio.Task[None] | None = None
        self._warn: asyncio.TimerHandle | None = None

    def _open(self, pod: Pod) -> grpc.aio.StreamStreamCall:
        return pod.stream_stream(self.route.path)(
            metadata=tracing.stream_metadata(pod.name, pod.address, self.route.path,
                                             self.metadata),
            timeout=self.context.time_remaining(),
        )

    async def _client_to_pod(self) -> None:
        async with self._lock:
            await self.call.write(self.first)
        context = self.context
        while True:
            frame = await context.read()
            if frame is grpc.aio.EOF:
                break
            if self.settled and self.kept is None:
                await self.call.write(frame)  # the hot path: raw bytes, no lock, no copy
                continue
            async with self._lock:
                if self.kept is not None:
                    if len(self.kept) < STREAM_REPLAY_FRAMES:
                        self.kept.append(frame)
                    else:
                        self.kept = None  # too much to re-send: a stale answer passes through
                await self.call.write(frame)
        # grpc.aio ends a cancelled call's request stream with the same EOF as a half-close
        # and cancels the handler task right after, in the same turn of the loop. Yield that
        # turn (no timer: nothing waits on a clock), so a cancel already delivered lands first
        # and the pod sees a plain cancel; then half-close at once. A cancel that arrives
        # later still reaches the pod: the cancelled handler's close() cancels the upstream
        # call, which the pod sees as a cancel unless it already ended the stream.
        for _ in range(EOF_CANCEL_YIELDS):
            await asyncio.sleep(0)
        async with self._lock:
            self.client_done = True
            await self.call.done_writing()

    def _silent_first_answer(self) -> None:
        log.warning(
            "pod %s (%s) has not answered the first frame of a %s stream%s within %.1f s; the "
            "stream stays open (a re-sent message gets no echo), but if this repeats the pod is "
            "overloaded or hung: check its logs and `macp-router pods`",
            self.pod.name, self.pod.address, self.route.method,
            f" for session {self.plan.sid}" if self.plan.sid else "",
            self.proxy.first_answer_warn_s,
        )

    async def run(self) -> None:
        self._pump = asyncio.create_task(self._client_to_pod(), name=f"bidi-up:{self.pod.name}")
        if self.plan.expects_answer:
            self._warn = asyncio.get_running_loop().call_later(
                self.proxy.first_answer_warn_s, self._silent_first_answer)
        try:
            code = await self._relay_down()
        except grpc.aio.AioRpcError as exc:
            raise upstream_abort(self.pod, exc) from None
        trailing = await self.call.trailing_metadata()
        if code is not grpc.StatusCode.OK:
            raise Abort(code, await self.call.details() or "", forwardable(trailing))
        if trailing:
            self.context.set_trailing_metadata(forwardable(trailing))

    async def _relay_down(self) -> grpc.StatusCode:
        """Pod frames to the client until the pod ends the stream; its status code."""
        context = self.context
        initial = await self.call.initial_metadata()
        if initial:
            await context.send_initial_metadata(forwardable(initial))
        while True:
            try:
                message = await self.call.read()
            except grpc.aio.AioRpcError as exc:
                if not self.settled and await self._first_status(exc):
                    continue
                raise upstream_abort(self.pod, exc) from None
            if message is grpc.aio.EOF:
                break
            if not self.settled and await self._first_answer(message):
                continue  # the stale pod's answer: swallowed, the stream moved
            await context.write(message)
        return await self.call.code()

    def _settle(self) -> None:
        self.settled = True
        self.kept = None
        if self._warn is not None:
            self._warn.cancel()

    async def _first_answer(self, message: bytes) -> bool:
        """Read the pod's first answer; True when it was a stale route and the stream moved."""
        plan = self.plan
        if not (plan.start or plan.relocatable):
            self._settle()
            return False
        try:
            answer = core_pb2.StreamSessionResponse.FromString(message)
        except DecodeError:
            self._settle()  # a start's reservation stays to its TTL: nobody knows the outcome
            raise Abort(
                grpc.StatusCode.INTERNAL,
                f"pod {self.pod.name} ({self.pod.address}) answered StreamSession with bytes "
                "that are not a StreamSessionResponse: is it a MACP runtime of a supported "
                "version? (the router ended the stream; retry, and check that pod)",
            ) from None
        if plan.start:
            self._settle()
            await self.core.settle(plan.sid, self.pod.name, plan.won,
                                   outcome_of_answer(answer, plan.sid))
            return False
        if (answer.HasField("error") and answer.error.code in UNKNOWN_SESSION_CODES
                and self.kept is not None and not self.rerouted):
            if await self._reroute(f"inline {answer.error.code}"):
                return True
        self._settle()
        return False

    async def _first_status(self, exc: grpc.aio.AioRpcError) -> bool:
        """The call ended before any answer; True when it was a stale route and moved."""
        plan = self.plan
        if plan.start:
            self._settle()
            await self.core.settle(plan.sid, self.pod.name, plan.won, outcome_of_status(exc))
            return False
        if (plan.relocatable and exc.code() is grpc.StatusCode.NOT_FOUND
                and self.kept is not None and not self.rerouted
                and await self._reroute("NOT_FOUND")):
            return True
        self._settle()
        return False

    async def _reroute(self, answer: str) -> bool:
        """The located pod does not hold the session: locate it again and move the stream."""
        sid, stale = self.plan.sid, self.pod
        try:
            moved = await self.core.relocate(self.call_info, sid, stale.name)
        except NotLocated:
            moved = None  # a pod is silent: the stale pod's answer passes through
        pod = self.proxy.pods.get(moved) if moved is not None else None
        if pod is None or pod is stale:
            self.call_info.pod = stale.name
            return False
        log.info("StreamSession %s: pod %s answered %s (stale route); moved to pod %s",
                 sid, stale.name, answer, pod.name)
        self.rerouted = True
        async with self._lock:
            kept = self.kept or []
            self.call.cancel()
            self.call = self._open(pod)
            self.pod = pod
            self.call_info.pod = pod.name
            for frame in kept:
                await self.call.write(frame)
            if self.client_done:
                await self.call.done_writing()
        return True

    async def close(self) -> None:
        if self._warn is not None:
            self._warn.cancel()
        pump = self._pump
        if pump is not None:
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError,
                                     grpc.aio.UsageError, Exception):
                await pump
        self.call.cancel()


__all__ = ["StreamCalls", "relay_server_stream"]
