"""`LocateStatus`: what the router knows about where a session lives.

Invariants:
- One enum for every layer that answers "where is session X" (locator, probes, admin, status
  page, ACP `session/status`): a `StrEnum`, so its members equal, hash and print as the wire
  strings "live", "not_found", "unknown" that metrics labels and the admin API carry.
- UNKNOWN means some pod did not answer: never read as NOT_FOUND, never a reason to place.
"""

from __future__ import annotations

from enum import StrEnum


class LocateStatus(StrEnum):
    LIVE = "live"
    """A pod holds the session (it answered for it, or the cache/store says so)."""
    NOT_FOUND = "not_found"
    """Every pod answered and none holds it."""
    UNKNOWN = "unknown"
    """No pod said live and at least one did not answer (or is unhealthy)."""

    @classmethod
    def of(cls, value: object) -> LocateStatus:
        """A probe's answer as a status: anything but live / not_found is UNKNOWN."""
        if value == cls.LIVE:
            return cls.LIVE
        if value == cls.NOT_FOUND:
            return cls.NOT_FOUND
        return cls.UNKNOWN


LIVE = LocateStatus.LIVE
NOT_FOUND = LocateStatus.NOT_FOUND
UNKNOWN = LocateStatus.UNKNOWN
