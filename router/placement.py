"""Placement: which pod a new session starts on.

Policies sit behind one tiny interface, `PlacementPolicy.select(candidates, load)`, and are
picked by name (`make_policy`). Candidates are only healthy, non-draining pods; a policy never
sees the others. The atomic reservation that makes a choice final lives in the locator.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol


class PlacementPolicy(Protocol):
    name: str

    def select(self, candidates: Sequence[str], load: Mapping[str, int]) -> str | None:
        """Pick one of `candidates` (names of placeable pods) given their open-session counts."""
        ...


class LeastSessionsP2C:
    """Power of two choices: sample two candidates, take the one holding fewer sessions.

    Nearly as even as a global least-loaded pick, without herding every router replica onto
    the same emptiest pod while their counts lag.
    """

    name = "least-sessions-p2c"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, candidates: Sequence[str], load: Mapping[str, int]) -> str | None:
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        return first if load.get(first, 0) <= load.get(second, 0) else second


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def select(self, candidates: Sequence[str], load: Mapping[str, int]) -> str | None:
        if not candidates:
            return None
        self._next += 1
        return candidates[self._next % len(candidates)]


def rendezvous(sid: str, candidates: Sequence[str]) -> str | None:
    """The candidate every router picks for `sid` (highest-random-weight hashing).

    Used when no shared store can arbitrate a placement: replicas racing one start then agree
    on its pod without talking to each other, and the runtime answers the second start itself.
    """
    if not candidates:
        return None
    return max(candidates, key=lambda pod: hashlib.blake2b(
        f"{pod}\x1f{sid}".encode(), digest_size=8).digest())


POLICIES: dict[str, Callable[[], PlacementPolicy]] = {
    LeastSessionsP2C.name: LeastSessionsP2C,
    RoundRobin.name: RoundRobin,
}


def make_policy(name: str) -> PlacementPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown placement policy {name!r}; choose one of {', '.join(POLICIES)}"
        ) from None
