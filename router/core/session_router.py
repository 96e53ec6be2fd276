"""`SessionRouter`: locate, place, forward with one stale retry, confirm, release.

The session flow both front doors share, written once. A front door parses what routes (a
session id, a start), makes a `Call`, and asks the router; the router talks to pods only through
the front door's `Backend` (forward a request, read whether an answer means "not here" or
whether a start was accepted) and to the `Locator` (near-cache, store, probes, reservations).

Hit:   `session`: near-cache -> `Backend.forward` -> answer (one dict lookup, no extra await).
Miss:  `locate`: store, then a single-flight probe fan-out; LIVE -> forward; NOT_FOUND -> the
       backend's `not_found` answer; UNKNOWN -> `NotLocated` (UNAVAILABLE naming the pods).
       A call that is itself a probe (MACP GetSession: `ForwardingBackend.answering_probe`)
       probes with its own request and credentials, and the deciding pod's answer to that
       probe is its reply: no forward after the fan-out.
Stale: the cached pod answers "not here" -> `relocate`: invalidate (sid, pod), locate again
       bypassing the negative cache, forward once more to a *different* pod, else the first
       answer stands (a GetSession's re-locate is its own probe, as for a miss).
Start: `place` (reserve) -> forward -> `settle`: ACCEPTED confirms, REFUSED releases (only a
       reservation this call made), UNKNOWN keeps it until its TTL.
Minted: a start whose session id the pod mints (ACP `session/new`): `choose` a pod (nothing to
       reserve yet) -> forward -> `adopt` the id of the answer: reserved for that pod through
       the store, then confirmed.

Invariants:
- A session is forwarded only to a pod that holds it (cache, store or its own probe answer);
  UNKNOWN is never placed and never guessed (`NotLocated`).
- A probe's answer is a caller's reply only when the probe carried that caller's own request
  and credentials; a caller that joined another's fan-out is forwarded with its own.
- A stale route is retried at most once per call, and never on the pod that said "not here".
- A reservation is released only when the pod provably did not accept the start
  (`StartOutcome.REFUSED`, or the request never left the router), and only by the call that
  made it (`won`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

import grpc

from router.core.call import Call
from router.core.errors import Abort
from router.core.status import LIVE, NOT_FOUND, LocateStatus
from router.locator import SOURCE_CACHE, SOURCE_PROBE, Located, Locator
from router.reservation import NoPlaceablePod


class StartOutcome(enum.Enum):
    ACCEPTED = "accepted"
    """The pod created the session (or already had it)."""
    REFUSED = "refused"
    """The pod answered and provably did not create it."""
    UNKNOWN = "unknown"
    """Nobody can tell (no answer, an unreadable answer): the reservation runs to its TTL."""


class Backend(Protocol):
    """What a front door does for the core: probe and check pods, read their answers."""

    async def probe(self, pod: str, sid: str) -> LocateStatus:
        """Does `pod` hold `sid`? UNKNOWN when it did not answer."""
        ...

    async def answers(self, pod: Any) -> bool:
        """Does the pod answer a call at all (its health, beyond a health endpoint)?"""
        ...

    def not_here(self, call: Call, answer: Any) -> bool:
        """Does `answer` (a returned answer or a raised `Abort`) mean "no such session here"?"""
        ...

    def start_outcome(self, call: Call, answer: Any) -> StartOutcome:
        """What the pod's answer to a start says (may raise `Abort` for an unreadable one)."""
        ...



class ForwardingBackend(Backend, Protocol):
    """A backend whose calls the core forwards itself, one awaited answer per request
    (MACP). ACP relays answers asynchronously, so its front door forwards and asks the core
    only to locate, relocate, place and settle."""

    async def forward(self, call: Call, pod: str, request: Any) -> Any:
        """Send `request` to `pod`, return its answer; raise `Abort` with the pod's status."""
        ...

    async def not_found(self, call: Call, sid: str, request: Any) -> Any:
        """The caller's answer when no pod holds `sid`."""
        ...

    def answering_probe(self, call: Call, request: Any) -> AnsweringProbe | None:
        """A probe that asks with `request` itself, when the call is one (else None)."""
        ...


class AnsweringProbe(Protocol):
    """A probe sent with one caller's own request and credentials (see `_miss`): the locator
    calls it as its probe function, and what the pods answered it can be that caller's reply."""

    async def __call__(self, pod: str, sid: str) -> LocateStatus: ...

    def reply(self, call: Call, located: Located) -> Any | None:
        """The caller's answer from the answer of the pod that decided `located` (LIVE: the
        holder's, NOT_FOUND: a pod's own not-found, raised as `Abort`); None when this probe
        did not hear it (a store hit, a joined fan-out, a pod asked with the router's token)."""
        ...


class NotLocated(Abort):
    """No pod said live and some did not answer: UNAVAILABLE naming them (never a guess)."""

    def __init__(self, sid: str, located: Located, details: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, details)
        self.sid = sid
        self.located = located


class SessionRouter:
    """The shared session flow; see the module docstring."""

    def __init__(
        self,
        locator: Locator,
        backend: ForwardingBackend | Backend,
        *,
        unknown_causes: Callable[[], Mapping[str, str]] = dict,
        why_not_placeable: Callable[[], str] = str,
    ) -> None:
        self.locator = locator
        self.backend = backend
        self.unknown_causes = unknown_causes
        """Pods whose silence has a known cause (e.g. they reject the router's credentials)."""
        self.why_not_placeable = why_not_placeable
        """" (pod: reason; ...)" for a refused placement, or ""."""
        self._try_cached = locator.near.get
        self._cache_hits = locator.metrics.locate.labels(locator.protocol, "hit")

    # -- the hot path ------------------------------------------------------------------------
    async def session(self, call: Call, sid: str, request: Any) -> Any:
        """Forward a call on session `sid` to the pod holding it (one stale retry)."""
        call.sid = sid
        pod = self._try_cached(sid)
        if pod is None:
            return await self._miss(call, sid, request)
        self._cache_hits.inc()
        call.pod = pod
        backend: ForwardingBackend = self.backend  # type: ignore[assignment]
        try:
            answer = await backend.forward(call, pod, request)
        except Abort as abort:
            if not backend.not_here(call, abort):
                raise
            return await self._stale(call, sid, pod, request, abort)
        if backend.not_here(call, answer):
            return await self._stale(call, sid, pod, request, answer)
        return answer

    async def route(self, call: Call, sid: str) -> Located:
        """Where a call on `sid` goes when the front door forwards it itself (ACP relays each
        answer by a task): the near-cache (one dict lookup, counted as a hit, as `session`
        does), else `lookup`. LIVE (pod set on `call`) or NOT_FOUND; `NotLocated` for UNKNOWN.
        A route not from a probe came from a cache: a "not here" answer is worth `relocate`."""
        call.sid = sid
        pod = self._try_cached(sid)
        if pod is None:
            return await self.lookup(call, sid)
        self._cache_hits.inc()
        call.pod = pod
        return Located(LIVE, pod, SOURCE_CACHE)

    # -- slow paths --------------------------------------------------------------------------
    async def _miss(self, call: Call, sid: str, request: Any) -> Any:
        backend: ForwardingBackend = self.backend  # type: ignore[assignment]
        probe = backend.answering_probe(call, request)
        located = await self.lookup(call, sid, probe=probe)
        if probe is not None:
            reply = probe.reply(call, located)  # the deciding pod's answer to this very call
            if reply is not None:
                return reply
        if located.status != LIVE:
            return await backend.not_found(call, sid, request)
        return await backend.forward(call, located.pod, request)  # type: ignore[arg-type]

    async def locate(self, call: Call, sid: str, *, use_negative: bool = True) -> str | None:
        """The pod holding `sid` (set on `call`), None when no pod holds it; `NotLocated` when
        a pod did not answer."""
        located = await self.lookup(call, sid, use_negative=use_negative)
        return located.pod if located.status == LIVE else None

    async def lookup(self, call: Call, sid: str, *, use_negative: bool = True,
                     probe: AnsweringProbe | None = None) -> Located:
        """`Locator.lookup` for a call: LIVE (pod set on `call`) or NOT_FOUND; `NotLocated`
        (UNAVAILABLE naming the silent pods) for UNKNOWN. `probe` is used for a fan-out this
        call starts."""
        call.sid = sid
        located = await self.locator.lookup(sid, use_negative=use_negative, probe=probe)
        if located.status == LIVE:
            call.pod = located.pod
            return located
        if located.status == NOT_FOUND:
            return located
        raise self.not_located(sid, located)

    def not_located(self, sid: str, located: Located) -> NotLocated:
        return NotLocated(sid, located, located.describe_unknown(
            sid, self.locator.probe_timeout_s, self.unknown_causes()))

    async def relocate(self, call: Call, sid: str, stale: str, *,
                       probe: AnsweringProbe | None = None) -> str | None:
        """`stale` said it does not hold `sid`: forget that route and locate once more
        (`probe`: the fan-out's probe, as for a miss).

        Returns another pod that holds it (set on `call`), or None when no other pod does;
        `NotLocated` when a pod did not answer.
        """
        await self.locator.invalidate(sid, stale)
        located = await self.locator.lookup(sid, use_negative=False, probe=probe)
        if located.status == LIVE:
            if located.pod == stale:
                return None
            call.pod = located.pod
            return located.pod
        if located.status == NOT_FOUND:
            return None
        raise self.not_located(sid, located)

    async def _stale(self, call: Call, sid: str, pod: str, request: Any, answer: Any) -> Any:
        backend: ForwardingBackend = self.backend  # type: ignore[assignment]
        probe = backend.answering_probe(call, request)  # a GetSession: as for a miss
        moved = await self.relocate(call, sid, pod, probe=probe)
        if moved is not None:
            if probe is not None:
                reply = probe.reply(call, Located(LIVE, moved, SOURCE_PROBE))
                if reply is not None:  # the new holder's answer to this call's own probe
                    return reply
            return await backend.forward(call, moved, request)
        if isinstance(answer, Abort):
            raise answer
        return answer

    # -- starts ------------------------------------------------------------------------------
    async def place(self, call: Call, sid: str, what: str = "SessionStart") -> tuple[str, bool]:
        """Reserve `sid` on a pod: (owner, won); UNAVAILABLE naming why when none can take it."""
        if not sid:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: session_id is required")
        try:
            owner, won = await self.locator.place(sid)
        except NoPlaceablePod as exc:
            raise Abort(grpc.StatusCode.UNAVAILABLE,
                        f"{what} {sid}: {exc}{self.why_not_placeable()} (retry)") from None
        call.pod = owner
        return owner, won

    def choose(self, call: Call, exclude: Collection[str] = ()) -> str:
        """A pod for a start whose session id the pod mints (ACP `session/new`): the placement
        policy's choice among placeable pods not in `exclude`; `NoPlaceablePod` when none.
        Nothing is reserved: there is no id yet (`adopt` reserves it on the answer)."""
        candidates = [p for p in self.locator.roster.placeable_names() if p not in exclude]
        call.pod = self.locator.choose(candidates)
        return call.pod

    async def adopt(self, call: Call, sid: str, pod: str) -> str:
        """`pod` answered a start with the id it minted, `sid`: reserve it for `pod` through
        the store (atomically, as `place` does) and confirm it open. Returns the owner."""
        call.sid = sid
        owner, _won = await self.locator.adopt(sid, pod)
        return owner

    async def settle(
        self, sid: str, pod: str, won: bool, outcome: StartOutcome
    ) -> None:
        """Confirm or release a reservation from what the pod answered."""
        if outcome is StartOutcome.ACCEPTED:
            self.locator.confirm(sid, pod)
        elif outcome is StartOutcome.REFUSED and won:
            await self.locator.release(sid, pod)

    async def start(self, call: Call, sid: str, request: Any) -> Any:
        """Place `sid`, forward the start to its pod, and settle the reservation."""
        call.sid = sid
        owner, won = await self.place(call, sid)
        backend: ForwardingBackend = self.backend  # type: ignore[assignment]
        try:
            answer = await backend.forward(call, owner, request)
        except Abort as abort:
            if won and abort.never_sent:
                await self.locator.release(sid, owner)
            raise
        await self.settle(sid, owner, won, backend.start_outcome(call, answer))
        return answer
