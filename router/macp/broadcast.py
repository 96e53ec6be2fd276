"""Broadcast-class MACP calls: registry changes every pod must hold, and their replay.

A registry call (RegisterPolicy, RegisterExtMode, PromoteMode, and their removals) goes to every
healthy pod; each pod's answer is read (`registry_outcome`): held, refused or failed. It is
remembered in the store for replay only when some pod holds it and none refused it. A pod
that (re)connects gets every remembered call it does not hold, once per incarnation
(`replay_broadcasts`), before it takes new sessions.

Invariants:
- The caller is told exactly which pods hold, refused or missed the call; pods that disagree
  are named, and a call some pod refused is never remembered.
- A pod that missed a call (no answer) is marked `registry_synced = False` and gets it on
  its next (re)connect; a pod that lists its registry is replayed only what it lacks.
- A store outage never stops placement: the replay is deferred until the store is back.
- A registry call the pods hold whose store write (record or forget) failed is never reported
  as remembered: one warning line names the store and what to do,
  `macp_router_broadcast_record_failures_total{method}` counts it, and the caller is told.
  When every pod holds it, the caller still gets the pods' own OK (the call is in effect on
  every pod now; an error would read as "not applied", and the retry it invites is answered
  "already registered") with trailing metadata ``macp-router-replay: unconfirmed`` and
  ``macp-router-warning: <why and what to do>``; when some pods missed it, the UNAVAILABLE
  detail says so. "Unconfirmed", not "lost": a write that timed out may still land when a
  hung server wakes up; one that was refused (or never sent) did not. Either way the caller's
  remedy is the same: call again once the store answers (pods that hold it answer "already
  registered", which counts as held, and the router records it then).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import grpc
from google.protobuf.message import DecodeError
from macp.v1 import core_pb2, policy_pb2

from router import routes
from router.core.call import Call
from router.core.errors import Abort
from router.macp.backend import forwardable, no_pod_message
from router.metrics import Metrics, bounded
from router.pods import Pod, PodSet
from router.routes import Route
from router.store import BroadcastRecord, LocationStore, StoreUnavailable
from router.wire import WireError

log = logging.getLogger("macp_router.proxy")

_Outcome = tuple[Pod, object, str]
"""(pod, its answer or exception, why) of one pod's answer to a broadcast."""

REPLAY_HEADER = "macp-router-replay"
"""Trailing metadata of a registry call answered OK whose record for replay the store did not
confirm (value `UNCONFIRMED`); `WARNING_HEADER` says why and what to do."""
UNCONFIRMED = "unconfirmed"
WARNING_HEADER = "macp-router-warning"


class BroadcastCalls:
    """Registry calls to every pod, remembered and replayed (see the module docstring)."""

    def __init__(
        self, *, pods: PodSet, store: LocationStore, metrics: Metrics,
        routes_by_path: dict[str, Route], router_metadata: Sequence[tuple[str, str]],
        broadcast_timeout_s: float,
    ) -> None:
        self.pods = pods
        self.store = store
        self.metrics = metrics
        self.routes = routes_by_path
        self.router_metadata = router_metadata
        self.broadcast_timeout_s = broadcast_timeout_s
        self._replay_locks: dict[str, asyncio.Lock] = {}
        self._deferred_replays: set[str] = set()

    async def broadcast(self, call: Call, request: bytes) -> bytes:
        """A registry call to every healthy pod, remembered for replay only if the pods hold it.

        Each pod's answer is read (`registry_outcome`): held (accepted, or "already
        registered"), refused (in-band ok=false for any other reason, or a status such as
        PERMISSION_DENIED / FAILED_PRECONDITION / INVALID_ARGUMENT) or failed (no answer). It is
        recorded for replay only when some pod holds it and none refused it; when pods
        disagree the caller is told which refused and why.
        """
        route = call.route
        context: grpc.aio.ServicerContext = call.context
        try:
            key, adds = routes.broadcast_key(route, request)
        except Exception as exc:  # protobuf's DecodeError
            raise WireError(str(exc)) from None
        pods = self.pods.healthy()
        if not pods:
            self.metrics.record_broadcast(route.method, "failed")
            raise Abort(grpc.StatusCode.UNAVAILABLE, no_pod_message(self.pods, route.method))
        metadata = forwardable(context.invocation_metadata())
        timeout = context.time_remaining() or self.broadcast_timeout_s
        results = await asyncio.gather(
            *(pod.unary(route.path)(request, metadata=metadata, timeout=timeout) for pod in pods),
            return_exceptions=True,
        )
        outcomes = [(pod, result, registry_outcome(route, adds, result))
                    for pod, result in zip(pods, results, strict=True)]
        held = [(pod, result, why) for pod, result, (kind, why) in outcomes if kind == HELD]
        refused = [(pod, result, why) for pod, result, (kind, why) in outcomes
                   if kind == REFUSED]
        failed = [(pod, result, why) for pod, result, (kind, why) in outcomes if kind == FAILED]
        for pod, _result, why in failed:
            pod.registry_synced = False  # it may have missed this call: replay when it is back
            log.warning("pod %s: %s %s got no answer (%s); it is replayed to the pod when its "
                        "feed reconnects", pod.name, route.method, key, why)
        unrecorded = ""
        if held and not refused:
            unrecorded = await self._remember(route.method, key, adds, request)
        if unrecorded and not failed:
            context.set_trailing_metadata(
                ((REPLAY_HEADER, UNCONFIRMED), (WARNING_HEADER, _header_value(unrecorded))))
        return self._answer(route.method, key, held, refused, failed, unrecorded)

    async def _remember(self, method: str, key: str, adds: bool, request: bytes) -> str:
        """Record (or forget) a call every answering pod holds; "" when the store did, else
        what the caller must be told (logged once and counted here)."""
        try:
            if adds:
                await self.store.record_broadcast(BroadcastRecord(key, method, request))
            else:
                await self.store.forget_broadcast(key)
            return ""
        except StoreUnavailable as exc:
            where = getattr(self.store, "url", "") or "in this router"
            if adds:
                consequence = (f"{method} {key} is in effect on the pods that answered, but the "
                               f"{self.store.name} store ({where}) did not record it for replay "
                               f"({exc}): pods that join or restart will NOT get it unless the "
                               "write landed late; call it again once the store answers (pods "
                               "answer 'already registered', and it is recorded then)")
            else:
                consequence = (f"{method} {key} is in effect on the pods that answered, but the "
                               f"{self.store.name} store ({where}) did not forget the earlier "
                               f"registration ({exc}): pods that join or restart may get it "
                               "again; call it again once the store answers")
            log.warning("%s (macp_router_broadcast_record_failures_total)", consequence)
            self.metrics.broadcast_record_failures.labels(
                bounded(method, self.metrics.known_methods)).inc()
            return consequence

    def _answer(
        self, method: str, key: str, held: list[_Outcome], refused: list[_Outcome],
        failed: list[_Outcome], unrecorded: str = "",
    ) -> bytes:
        """The caller's answer to a broadcast from the pods' outcomes (metric recorded);
        `unrecorded` says why the store did not remember it ("" when it did)."""
        if held and not refused and not failed:
            self.metrics.record_broadcast(method, "ok")
            accepted = [result for _pod, result, why in held if not why]
            return (accepted or [held[0][1]])[0]  # type: ignore[return-value]
        described_failed = ", ".join(f"{pod.name} ({why})" for pod, _r, why in failed)
        if refused:
            self.metrics.record_broadcast(method, "refused")
            reasons = {why for _pod, _r, why in refused}
            if not held and not failed and len(reasons) == 1:
                return _pass_through(refused[0][1])  # every pod gave the same answer
            described = "; ".join(f"{pod.name} refused it ({why})" for pod, _r, why in refused)
            holders = ", ".join(
                f"{pod.name} ({'already held it' if why else 'accepted'})"
                for pod, _r, why in held
            ) or "none"
            raise Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{method} {key}: the pods disagree: {described}; held by {holders}"
                + (f"; no answer from {described_failed}" if failed else "")
                + ". It is not remembered for replay: fix the refusing pods (their "
                "configuration or the caller's registry rights) and call again (pods that "
                "hold it answer 'already registered', which counts as held)",
            )
        self.metrics.record_broadcast(method, "partial" if held else "failed")
        if held:
            done = ", ".join(pod.name for pod, _r, _w in held)
            if unrecorded:
                raise Abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{method} {key}: applied on {done}; failed on {described_failed}. It is "
                    f"NOT remembered for replay to those pods: {unrecorded} (retry is safe)",
                )
            raise Abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{method} {key}: applied on {done}; failed on {described_failed}. It is "
                "remembered and will be replayed to those pods when they reconnect (retry "
                "is safe)",
            )
        raise Abort(grpc.StatusCode.UNAVAILABLE,
                    f"{method} {key}: failed on every pod: {described_failed} (retry)")

    async def replay_broadcasts(self, pod: Pod) -> None:
        """Give a pod every remembered registry call it does not hold, once per incarnation.

        Runs on every feed (re)connect, before the feed is marked up (so before the pod takes
        new sessions). Calls for what the pod lists (ListPolicies, ListExtModes, ListModes)
        are skipped, so a reconnect of a pod that kept its registry replays nothing and a
        restarted pod gets exactly what it lost. For what a pod cannot list, the call is
        replayed only while `pod.registry_synced` is False: it is cleared when the pod goes
        unhealthy (a restart empties the runtime's in-memory registries) and set once a
        replay had no failure.
        """
        lock = self._replay_locks.setdefault(pod.name, asyncio.Lock())
        async with lock:
            await self._replay(pod)
        # One lock per pod present: those of pods that left go (pod names churn with
        # discovery), so the table never grows with every pod the router ever saw.
        for name in [name for name, other in self._replay_locks.items()
                     if not other.locked() and self.pods.get(name) is None]:
            del self._replay_locks[name]

    async def replay_deferred(self) -> None:
        """The store is back: replay to the pods whose replay it prevented."""
        for name in sorted(self._deferred_replays):
            pod = self.pods.get(name)
            if pod is None:
                self._deferred_replays.discard(name)
                continue
            pod.registry_synced = False
            await self.replay_broadcasts(pod)

    async def _replay(self, pod: Pod) -> None:
        try:
            records = await self.store.broadcasts()
        except StoreUnavailable:
            # A store outage must not stop placement (routing never depends on the store):
            # the pod takes sessions now and gets the replay when the store is back.
            if pod.name not in self._deferred_replays:
                log.warning("pod %s: registry replay deferred until the store is back (it "
                            "cannot be read now); the pod takes new sessions meanwhile",
                            pod.name)
            self._deferred_replays.add(pod.name)
            pod.registry_synced = True
            return
        self._deferred_replays.discard(pod.name)
        holds = await self._registry_listing(pod) if records else None
        complete = True
        for record in records:
            route = self.routes[f"/{routes.SERVICE}/{record.method}"]
            listed = holds(record) if holds is not None else None
            if listed or (listed is None and pod.registry_synced):
                continue  # the pod lists it, or (unlistable) this incarnation already got it
            try:
                result: bytes | BaseException = await pod.unary(route.path)(
                    record.request, metadata=self.router_metadata,
                    timeout=self.broadcast_timeout_s)
            except grpc.aio.AioRpcError as exc:
                result = exc
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.PERMISSION_DENIED):
                    pod.report_credentials_rejected(f"{record.method} replay", exc.code(),
                                                    exc.details() or "")
            kind, why = registry_outcome(route, True, result)
            label = {HELD: "ok", REFUSED: "refused", FAILED: "failed"}[kind]
            self.metrics.broadcast_replays.labels(self.metrics.pod_label(pod.name), label).inc()
            if kind == FAILED:
                complete = False
                log.warning("pod %s: replay of %s %s failed (%s); tried again when its feed "
                            "reconnects", pod.name, record.method, record.key, why)
            elif kind == REFUSED:
                log.warning("pod %s refused the replay of %s %s (%s): its configuration differs "
                            "from the pods that hold it (policies directory, or the router "
                            "token's registry rights: can_manage_mode_registry); it is not "
                            "retried", pod.name, record.method, record.key, why)
        pod.registry_synced = complete

    async def _registry_listing(
        self, pod: Pod
    ) -> Callable[[BroadcastRecord], bool | None]:
        """What the pod already holds, as a predicate over records (None: it cannot list
        that kind)."""
        metadata, timeout = self.router_metadata, self.broadcast_timeout_s

        async def names(method: str, response: type, field: str, attr: str) -> set[str] | None:
            try:
                raw = await pod.unary(f"/{routes.SERVICE}/{method}")(
                    b"", metadata=metadata, timeout=timeout)
                return {getattr(item, attr) for item in getattr(response.FromString(raw), field)}
            except (grpc.aio.AioRpcError, DecodeError) as exc:
                log.info("pod %s: %s failed (%s); replaying its registry calls unchecked",
                         pod.name, method, _describe(exc))
                return None

        policies = await names("ListPolicies", policy_pb2.ListPoliciesResponse,
                               "descriptors", "policy_id")
        ext_modes = await names("ListExtModes", core_pb2.ListExtModesResponse, "modes", "mode")
        modes = await names("ListModes", core_pb2.ListModesResponse, "modes", "mode")

        def holds(record: BroadcastRecord) -> bool | None:
            kind, _, name = record.key.partition(":")
            if kind == "policy" and policies is not None:
                return name in policies
            if kind == "ext_mode" and ext_modes is not None:
                return name in ext_modes
            if kind == "promote" and modes is not None:
                request = core_pb2.PromoteModeRequest.FromString(record.request)
                return (request.promoted_mode_name or request.mode) in modes
            return None

        return holds


HELD = "held"
REFUSED = "refused"
FAILED = "failed"
_HELD_MARKS = ("already registered", "already standards-track")
"""In-band errors of a registry call that mean the pod already holds what was asked."""
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.CANCELLED})


def registry_outcome(route: Route, adds: bool, result: object) -> tuple[str, str]:
    """One pod's answer to a registry call: (HELD | REFUSED | FAILED, why).

    `why` is "" for a plain acceptance, else the pod's own words. A removal the pod answers
    "not found" holds too (the pod does not have it, which is what was asked). A reply that
    does not parse, or says neither ok nor why not, is FAILED: its effect is unknown.
    """
    if isinstance(result, grpc.aio.AioRpcError):
        kind = FAILED if result.code() in _TRANSIENT else REFUSED
        return kind, _describe(result)
    if not isinstance(result, bytes):
        return FAILED, repr(result)
    try:
        answer = route.response_class.FromString(result)
    except DecodeError:
        return FAILED, (f"answered bytes that are not a {route.response_class.DESCRIPTOR.name}:"
                        " is it a MACP runtime of a supported version?")
    if answer.ok:
        return HELD, ""
    error = answer.error
    if not error:
        return FAILED, "answered ok=false without an error (not a MACP runtime's answer?)"
    lowered = error.lower()
    if adds and any(mark in lowered for mark in _HELD_MARKS):
        return HELD, error
    if not adds and "not found" in lowered:
        return HELD, error
    return REFUSED, f"ok=false: {error}"


def _pass_through(result: object) -> bytes:
    """A pod's own answer for the caller: its bytes, or its status as an Abort."""
    if isinstance(result, bytes):
        return result
    if isinstance(result, grpc.aio.AioRpcError):
        raise Abort(result.code(), result.details() or "", forwardable(result.trailing_metadata()))
    raise Abort(grpc.StatusCode.INTERNAL, f"unexpected answer {result!r}")


def _header_value(text: str, limit: int = 2048) -> str:
    """`text` as a valid ASCII metadata value: printable characters only, at most `limit`."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _describe(error: object) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details() or ''}".rstrip(": ")
    return repr(error)

