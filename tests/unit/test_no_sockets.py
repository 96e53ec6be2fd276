"""The unit tier's guard: a test that touches the network is refused and failed.

Each test here trips the guard on purpose, checks what it recorded, then clears the record so
its own teardown passes; a test that did not clear it would fail with the recorded attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import grpc
import pytest

from tests.unit.conftest import SocketGuard, SocketOpened


def test_connect_and_bind_are_refused_and_recorded(no_sockets: SocketGuard) -> None:
    with socket.socket() as sock:
        with pytest.raises(SocketOpened, match="unit tests open no sockets"):
            sock.connect(("127.0.0.1", 9))
        with pytest.raises(SocketOpened):
            sock.bind(("127.0.0.1", 0))
    assert [a.split("(")[0] for a in no_sockets.attempts] == ["socket.connect", "socket.bind"]
    no_sockets.attempts.clear()


def test_an_attempt_the_code_swallowed_is_still_recorded(no_sockets: SocketGuard) -> None:
    with contextlib.suppress(Exception), socket.create_connection(("127.0.0.1", 9), timeout=1):
        pass
    assert no_sockets.attempts, "a swallowed connect must still fail the test at teardown"
    no_sockets.attempts.clear()


async def test_asyncio_and_grpc_cannot_reach_the_network(no_sockets: SocketGuard) -> None:
    with pytest.raises(SocketOpened):
        await asyncio.open_connection("127.0.0.1", 9)
    with pytest.raises(SocketOpened):
        grpc.aio.insecure_channel("127.0.0.1:9")
    assert len(no_sockets.attempts) == 2
    no_sockets.attempts.clear()


async def test_the_event_loop_itself_still_works() -> None:
    """asyncio's wake-up pair is a socketpair: neither connected nor bound."""
    await asyncio.sleep(0)
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, 42)
    assert await done == 42
