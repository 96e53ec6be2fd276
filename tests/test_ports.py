"""Ports handed to test processes are never handed out twice."""

from __future__ import annotations

import socket

from loadtest.ports import free_port


def test_free_port_never_repeats_a_port_even_when_the_kernel_does() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as sock:  # each one was bindable when handed out
        sock.bind(("127.0.0.1", ports[-1]))
