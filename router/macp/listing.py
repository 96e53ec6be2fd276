"""ListSessions pages from one snapshot per listing: what the router keeps between the pages of
one client's listing, and the page tokens that name it.

A listing starts with a ListSessions without a page token: the router fans out to every pod
once, merges, sorts, and, when the answer does not fit in one page, keeps the sorted result
as an immutable snapshot under a random listing id. Every later page is a slice of that
snapshot: a client that reads 10 pages costs one fan-out, not 10, and sees one consistent
list (no session skipped or repeated because the pods changed between pages).

A page token is ``r2.`` + base64url(listing id (16 bytes) | offset (8 bytes) | MAC (16 bytes)),
the MAC an HMAC-SHA256 under a key drawn at random when the process starts. A token is
opaque to the client and cannot be altered (offset or id) without failing the MAC.

Invariants:
- A snapshot is never changed after it is stored; a page is a slice of it.
- At most `max_listings` snapshots and `max_bytes` bytes are held; adding one past either bound
  evicts the least recently read ones first. A snapshot not read for `idle_s` is dropped (on
  the next listing call, and by a timer set for the earliest expiry, so an idle router frees
  it too). The gauges are read at scrape time on the ops thread: they only read two numbers.
- A listing that fits in one page stores nothing.
- A snapshot is bound to the caller's credentials (a digest of its ``authorization`` and
  ``x-macp-agent-id`` headers): the pods authenticated them on the fan-out, so a token is
  only honoured for the same credentials (a leaked token does not list sessions to others;
  credentials that change mid-listing, e.g. a refreshed JWT, must start a new listing).
- A token this process cannot honour is INVALID_ARGUMENT, never a silent restart: a token from
  another router process (another replica or ``--workers`` sibling behind one address, or
  a router that restarted) fails its MAC; an expired or evicted listing is unknown. Restarting
  the listing silently would hand the client page 1 as if it were page k (duplicates and
  gaps it cannot detect); the error tells it to list again without a page token, which is
  the only correct recovery. A client's pages go to one process as long as it keeps one
  channel (gRPC load balancers pick per connection; ``SO_REUSEPORT`` workers too).
- A snapshot larger than `max_bytes` alone is refused with RESOURCE_EXHAUSTED naming the flag
  (paging it would need more memory than the router may hold).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from router.core.errors import Abort
from router.metrics import Metrics

TOKEN_PREFIX = "r2."
DEFAULT_IDLE_S = 60.0
DEFAULT_MAX_LISTINGS = 256
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_ID_BYTES = 16
_MAC_BYTES = 16
_CREDENTIAL_HEADERS = ("authorization", "x-macp-agent-id")
_SESSIONS_TAG = b"\x0a"  # ListSessionsResponse.sessions: field 1, length-delimited
_TOKEN_TAG = b"\x12"  # ListSessionsResponse.next_page_token: field 2, length-delimited
_ENTRY_OVERHEAD = 64
"""Bytes counted per snapshot entry on top of its encoding (the tuple slot, the bytes object)."""


def caller_digest(metadata: Sequence[tuple[str, str | bytes]] | None) -> bytes:
    """What binds a listing to its caller: a digest of the caller's credential headers."""
    digest = hashlib.sha256()
    for key, value in metadata or ():
        if key in _CREDENTIAL_HEADERS:
            digest.update(key.encode() + b"\0")
            digest.update((value if isinstance(value, bytes) else value.encode()) + b"\0")
    return digest.digest()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def frame_session(encoded: bytes) -> bytes:
    """One SessionMetadata's bytes framed as an element of ListSessionsResponse.sessions."""
    return _SESSIONS_TAG + _varint(len(encoded)) + encoded


def encode_page(entries: Sequence[bytes], next_token: str) -> bytes:
    """A serialized ListSessionsResponse of framed `entries` and `next_token` (the bytes
    `ListSessionsResponse(sessions=..., next_page_token=...)` serializes to)."""
    tail = b""
    if next_token:
        token = next_token.encode()
        tail = _TOKEN_TAG + _varint(len(token)) + token
    return b"".join(entries) + tail


@dataclass(slots=True)
class Snapshot:
    """One listing: the framed sessions in page order, who may read them, until when."""

    caller: bytes
    entries: tuple[bytes, ...]
    nbytes: int
    expires_at: float


class Listings:
    """The snapshots of the listings in progress (see the module docstring)."""

    def __init__(
        self, *, idle_s: float = DEFAULT_IDLE_S, max_listings: int = DEFAULT_MAX_LISTINGS,
        max_bytes: int = DEFAULT_MAX_BYTES, metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if idle_s <= 0 or max_listings < 1 or max_bytes < 1:
            raise ValueError(f"listing bounds must be positive: idle_s={idle_s!r}, "
                             f"max_listings={max_listings!r}, max_bytes={max_bytes!r}")
        self.idle_s = idle_s
        self.max_listings = max_listings
        self.max_bytes = max_bytes
        self.clock = clock
        self.evicted = 0
        """Snapshots dropped to make room (not by expiry)."""
        self._key = secrets.token_bytes(32)
        self._snapshots: collections.OrderedDict[bytes, Snapshot] = collections.OrderedDict()
        self._bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        if metrics is not None:
            metrics.list_snapshots.set_function(lambda: float(self.held()))
            metrics.list_snapshot_bytes.set_function(lambda: float(self.held_bytes()))

    # -- what is held ------------------------------------------------------------------------
    def held(self) -> int:
        """Snapshots held now (safe from another thread: it only reads)."""
        return len(self._snapshots)

    def held_bytes(self) -> int:
        """Bytes of the snapshots held now (safe from another thread: it only reads)."""
        return self._bytes

    def sweep(self) -> None:
        """Drop every snapshot not read for `idle_s` (least recently read first)."""
        now = self.clock()
        while self._snapshots:
            listing, snapshot = next(iter(self._snapshots.items()))
            if snapshot.expires_at > now:
                return
            self._drop(listing)

    def _drop(self, listing: bytes) -> None:
        snapshot = self._snapshots.pop(listing)
        self._bytes -= snapshot.nbytes

    # -- a listing's life --------------------------------------------------------------------
    def add(self, caller: bytes, entries: tuple[bytes, ...]) -> bytes:
        """Keep a new snapshot; returns its listing id. Evicts the least recently read
        snapshots past the bounds; RESOURCE_EXHAUSTED when this one alone is too big."""
        nbytes = sum(len(entry) for entry in entries) + _ENTRY_OVERHEAD * len(entries)
        if nbytes > self.max_bytes:
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"ListSessions: this listing ({len(entries)} sessions, about {nbytes} bytes) is "
                f"larger than the router keeps for paging ({self.max_bytes} bytes): raise "
                "--list-snapshot-bytes, or ask for one page holding every session "
                "(page_size at least the session count)",
            )
        self.sweep()
        while self._snapshots and (len(self._snapshots) >= self.max_listings
                                   or self._bytes + nbytes > self.max_bytes):
            self._drop(next(iter(self._snapshots)))
            self.evicted += 1
        listing = secrets.token_bytes(_ID_BYTES)
        self._snapshots[listing] = Snapshot(caller, entries, nbytes, self.clock() + self.idle_s)
        self._bytes += nbytes
        self._schedule_sweep()
        return listing

    def get(self, listing: bytes, caller: bytes) -> Snapshot:
        """The snapshot of `listing` for `caller`, marked read now; INVALID_ARGUMENT when it
        expired, was evicted or belongs to other credentials."""
        self.sweep()
        snapshot = self._snapshots.get(listing)
        if snapshot is None:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"ListSessions: page_token names a listing this router no longer holds (not "
                f"read for {self.idle_s:g} s, or evicted: at most {self.max_listings} listings "
                f"and {self.max_bytes} bytes are kept): list again without a page_token",
            )
        if not hmac.compare_digest(snapshot.caller, caller):
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "ListSessions: page_token belongs to a listing made with other credentials: "
                "list again without a page_token",
            )
        snapshot.expires_at = self.clock() + self.idle_s
        self._snapshots.move_to_end(listing)
        return snapshot

    def _schedule_sweep(self) -> None:
        """Free expired snapshots even when no call comes: one timer, at the earliest expiry
        (the least recently read snapshot's), re-armed while snapshots remain."""
        if self._timer is not None or not self._snapshots:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (unit use): sweeps happen on calls

        def fire() -> None:
            self._timer = None
            self.sweep()
            self._schedule_sweep()

        first = next(iter(self._snapshots.values()))
        self._timer = loop.call_later(max(0.0, first.expires_at - self.clock()) + 0.01, fire)

    def close(self) -> None:
        """Drop every snapshot and the timer (the router is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._snapshots.clear()
        self._bytes = 0

    # -- tokens ------------------------------------------------------------------------------
    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]

    def token(self, listing: bytes, offset: int) -> str:
        """The opaque page token for `offset` in `listing`."""
        body = listing + offset.to_bytes(8, "big")
        raw = body + self._mac(body)
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def parse(self, token: str) -> tuple[bytes, int]:
        """(listing id, offset) of a token this process issued; INVALID_ARGUMENT otherwise."""
        if not token.startswith(TOKEN_PREFIX):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        "ListSessions: page_token was not issued by this router (a pod's own "
                        "token, or an older router's): list again without a page_token")
        text = token[len(TOKEN_PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (ValueError, UnicodeEncodeError):
            raw = b""
        if len(raw) != _ID_BYTES + 8 + _MAC_BYTES:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        "ListSessions: page_token is malformed: pass next_page_token unchanged, "
                        "or list again without a page_token")
        body, mac = raw[: _ID_BYTES + 8], raw[_ID_BYTES + 8 :]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "ListSessions: page_token was not issued by this router process (another "
                "router replica or worker behind the same address, a router that restarted, "
                "or an altered token): list again without a page_token, and keep one "
                "listing's pages on one channel",
            )
        return body[:_ID_BYTES], int.from_bytes(body[_ID_BYTES:], "big")
