"""The unit tier: no sockets, so the whole tier runs in seconds and a failure is a logic bug.

Every test here runs with `no_sockets` (autouse): connecting or binding a Python socket, or
creating a gRPC channel or server, raises `SocketOpened` and fails the test at teardown even if
the code under test swallowed the error. Tests that need a network belong in `tests/`, beside
the real servers. (The event loop's own wake-up pair is made by `socketpair`, which neither
connects nor binds, so asyncio itself works.)
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import grpc
import pytest


class SocketOpened(RuntimeError):
    """A unit test tried to use the network."""


class SocketGuard:
    def __init__(self) -> None:
        self.attempts: list[str] = []

    def refuse(self, what: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            shown = ", ".join(repr(a) for a in args[1:] if not isinstance(a, socket.socket))
            self.attempts.append(f"{what}({shown})")
            raise SocketOpened(f"unit tests open no sockets: {what}({shown}); move this test "
                               "to tests/ (integration tier)")
        return refused


@pytest.fixture(autouse=True)
def _collect_grpc_garbage() -> Iterator[None]:
    """Overrides the integration tier's per-test `gc.collect()`: no gRPC object exists here
    (the guard refuses channels and servers), and a full collection per test would cost this
    tier most of its time."""
    yield


@pytest.fixture(autouse=True)
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[SocketGuard]:
    guard = SocketGuard()
    for name in ("connect", "connect_ex", "bind"):
        monkeypatch.setattr(socket.socket, name, guard.refuse(f"socket.{name}"))
    for name in ("insecure_channel", "secure_channel", "server"):
        monkeypatch.setattr(grpc.aio, name, guard.refuse(f"grpc.aio.{name}"))
        monkeypatch.setattr(grpc, name, guard.refuse(f"grpc.{name}"))
    yield guard
    if guard.attempts:
        pytest.fail("a unit test opened a socket: " + "; ".join(guard.attempts), pytrace=False)
