"""Free loopback ports for test and load-test processes (no dependencies beyond the stdlib).

Invariant: `free_port()` never hands out the same port twice in one process. Binding to port 0
and closing gives a port that is free at that instant, and the kernel may give the same one to
the next call; a router's `--listen` and `--metrics-listen` once got one port that way and the
router could not start ("Address already in use").
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"
_handed_out: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` that is free now and was not returned by an earlier call."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no fresh free port on {host} after 1000 tries: is the range exhausted?")
