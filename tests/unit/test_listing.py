"""`router.macp.listing.Listings`: the bounded, expiring snapshots behind ListSessions paging,
and the page tokens that name them (socket-free; a fake clock drives expiry)."""

from __future__ import annotations

import base64

import grpc
import pytest
from macp.v1 import core_pb2
from prometheus_client import CollectorRegistry

from router.core.errors import Abort
from router.macp.listing import (
    TOKEN_PREFIX,
    Listings,
    caller_digest,
    encode_page,
    frame_session,
)
from router.metrics import Metrics

ALICE = caller_digest((("authorization", "Bearer alice"),))
BOB = caller_digest((("authorization", "Bearer bob"),))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entries(count: int, size: int = 10) -> tuple[bytes, ...]:
    return tuple(frame_session(core_pb2.SessionMetadata(session_id=f"s{i:04d}" + "x" * size)
                               .SerializeToString()) for i in range(count))


def code_of(excinfo: pytest.ExceptionInfo[Abort]) -> grpc.StatusCode:
    return excinfo.value.code


def test_a_page_is_the_bytes_protobuf_serializes() -> None:
    sessions = [core_pb2.SessionMetadata(session_id=f"s{i}", mode="m" * (i * 70),
                                         started_at_unix_ms=i) for i in range(4)]
    framed = [frame_session(s.SerializeToString()) for s in sessions]
    expected = core_pb2.ListSessionsResponse(sessions=sessions, next_page_token="r2.tok")
    assert encode_page(framed, "r2.tok") == expected.SerializeToString()
    assert encode_page([], "") == b""


def test_snapshots_expire_when_not_read_for_the_idle_time() -> None:
    clock = Clock()
    listings = Listings(idle_s=60, clock=clock)
    kept = listings.add(ALICE, entries(5))
    idle = listings.add(ALICE, entries(5))
    clock.now += 40
    listings.get(kept, ALICE)  # reading a page keeps the listing another 60 s
    clock.now += 30
    listings.sweep()
    assert listings.held() == 1
    assert listings.get(kept, ALICE).entries == entries(5)
    with pytest.raises(Abort) as excinfo:
        listings.get(idle, ALICE)
    assert code_of(excinfo) is grpc.StatusCode.INVALID_ARGUMENT
    assert "no longer holds" in excinfo.value.details


def test_the_count_bound_evicts_the_least_recently_read_listing() -> None:
    listings = Listings(max_listings=3, clock=Clock())
    first, second, third = (listings.add(ALICE, entries(2)) for _ in range(3))
    listings.get(first, ALICE)
    fourth = listings.add(ALICE, entries(2))
    assert listings.held() == 3 and listings.evicted == 1
    for listing in (first, third, fourth):
        listings.get(listing, ALICE)
    with pytest.raises(Abort):
        listings.get(second, ALICE)


def test_the_byte_bound_is_respected_and_a_listing_too_big_alone_is_refused() -> None:
    one = entries(10, size=100)
    per_listing = Listings(clock=Clock())
    per_listing.add(ALICE, one)
    size = per_listing.held_bytes()
    listings = Listings(max_bytes=size * 2 + size // 2, clock=Clock())
    for _ in range(5):
        listings.add(ALICE, one)
        assert listings.held_bytes() <= listings.max_bytes
    assert listings.held() == 2 and listings.held_bytes() == 2 * size
    with pytest.raises(Abort) as excinfo:
        listings.add(ALICE, entries(40, size=100))
    assert code_of(excinfo) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--list-snapshot-bytes" in excinfo.value.details
    assert listings.held() == 2  # the refused listing evicted nothing


def test_tokens_round_trip_and_any_altered_byte_is_rejected() -> None:
    listings = Listings(clock=Clock())
    listing = listings.add(ALICE, entries(3))
    token = listings.token(listing, 2)
    assert token.startswith(TOKEN_PREFIX)
    assert listings.parse(token) == (listing, 2)
    raw = bytearray(base64.urlsafe_b64decode(token[3:] + "=" * (-len(token[3:]) % 4)))
    for index in range(len(raw)):
        altered = bytearray(raw)
        altered[index] ^= 0x01
        forged = TOKEN_PREFIX + base64.urlsafe_b64encode(bytes(altered)).decode().rstrip("=")
        with pytest.raises(Abort) as excinfo:
            listings.parse(forged)
        assert code_of(excinfo) is grpc.StatusCode.INVALID_ARGUMENT
    for garbage in ("", "r1.abc", TOKEN_PREFIX, TOKEN_PREFIX + "!!!", token[:-2]):
        with pytest.raises(Abort) as excinfo:
            listings.parse(garbage)
        assert code_of(excinfo) is grpc.StatusCode.INVALID_ARGUMENT


def test_a_token_of_another_process_fails_its_check() -> None:
    mine, theirs = Listings(clock=Clock()), Listings(clock=Clock())
    token = theirs.token(theirs.add(ALICE, entries(3)), 1)
    with pytest.raises(Abort) as excinfo:
        mine.parse(token)
    assert "not issued by this router process" in excinfo.value.details


def test_a_listing_is_read_only_with_the_credentials_that_made_it() -> None:
    listings = Listings(clock=Clock())
    listing = listings.add(ALICE, entries(3))
    with pytest.raises(Abort) as excinfo:
        listings.get(listing, BOB)
    assert "other credentials" in excinfo.value.details
    assert caller_digest(()) != ALICE
    assert caller_digest((("authorization", "Bearer alice"), ("x-trace", "1"))) == ALICE


def test_the_gauges_show_what_is_held() -> None:
    metrics = Metrics(CollectorRegistry())
    clock = Clock()
    listings = Listings(idle_s=10, clock=clock, metrics=metrics)
    listings.add(ALICE, entries(4))
    listings.add(BOB, entries(4))
    sample = metrics.registry.get_sample_value
    assert sample("macp_router_list_snapshots") == 2
    assert sample("macp_router_list_snapshot_bytes") == listings.held_bytes() > 0
    clock.now += 11
    listings.sweep()
    assert sample("macp_router_list_snapshots") == 0
    assert sample("macp_router_list_snapshot_bytes") == 0
