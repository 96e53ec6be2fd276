"""Fault-test harness: real processes on loopback, concurrent traffic, and the report table.

- `Traffic`: closed-loop MACP traffic (Send proposals, GetSession, SessionStarts, racing starts)
  from several workers against one or more routers; every call is recorded with its start and
  end time, the router it went to and its outcome (`OK`, a gRPC code, or `ACK_<registry code>`
  for a Send answered with an Ack error). Starts are retried by the client on UNAVAILABLE /
  DEADLINE_EXCEEDED with the same envelope (a real client's retry), so a start either ends
  acked or is reported as failed.
- `PodProcs`: `macp-router pod --state-file` subprocesses on fixed ports (SIGKILL, restart).
- `start_router`: a `macp-router serve` subprocess with its metrics port.
- `pod_sessions` / `sessions_by_pod`: every pod's real session list (ListSessions on the pod,
  or the in-process SimPod's records), the ground truth the checks compare with.
- `FaultRow` + `report`: one table row per fault test; the rows are printed at the end of the
  run and, with `MACP_FAULTS_REPORT=PATH`, appended to PATH as JSON lines (tests/faults/README.md
  is filled from such runs).

Every wait polls a state with a deadline (`eventually`); the only sleeps hold a fault open while
traffic runs, or pace the traffic workers.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import re
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from macp.v1 import core_pb2, core_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from router.sim import SimPod
from router.v1 import router_pb2, router_pb2_grpc
from tests import macp_calls
from tests.pod_auth import pod_cli_args
from tests.procs import Process, free_port, router_process
from tests.redis_fixture import RedisServer
from tests.waiting import eventually

ROUTER_TOKEN = "router"
LOAD_LIMITS = {"start_limit_per_minute": 1_000_000, "message_limit_per_minute": 1_000_000}
"""Rate limits for in-process pods under fault traffic: one sender starts sessions at volume,
far past the runtime's default 60 starts / 600 messages per minute, so they are raised as an
operator raises them for a load test (pods run as processes get the same, see PodProcs)."""
ROUTER_METADATA = (("authorization", f"Bearer {ROUTER_TOKEN}"),)
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
NOT_FOUND_CODES = frozenset({"NOT_FOUND", "ACK_SESSION_NOT_FOUND"})
# Clients reconnect to a restarted router within ~0.25 s, so a measured recovery is the
# router's, not grpc's default client backoff (1 s growing to 120 s).
CLIENT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                  ("grpc.min_reconnect_backoff_ms", 100),
                  ("grpc.max_reconnect_backoff_ms", 250)]


# -- waiting -----------------------------------------------------------------------------------


def names_pod(details: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", details) is not None


# -- the report table --------------------------------------------------------------------------
@dataclass
class FaultRow:
    fault: str
    traffic: str
    errors: dict[str, int]
    misroutes: str
    duplicates: int
    lost: int
    recovery: str

    def cells(self) -> list[str]:
        errors = ", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())) or "none"
        return [self.fault, self.traffic, errors, self.misroutes, str(self.duplicates),
                str(self.lost), self.recovery]


HEADER = ["fault", "traffic", "errors seen by clients (by code)", "misroutes", "duplicates",
          "lost sessions", "recovery"]
_ROWS: list[FaultRow] = []


def report(row: FaultRow) -> None:
    """Record one row of the fault table (printed at the end; JSON lines to $MACP_FAULTS_REPORT)."""
    _ROWS.append(row)
    path = os.environ.get("MACP_FAULTS_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(row)) + "\n")


def markdown_table(rows: Sequence[FaultRow]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if _ROWS:
        terminalreporter.section("fault table (tests/faults)")
        terminalreporter.write_line(markdown_table(_ROWS))


# -- traffic -----------------------------------------------------------------------------------
@dataclass(slots=True)
class Call:
    op: str  # send | get | start | race
    sid: str
    router: str
    started: float
    ended: float
    code: str  # OK | a gRPC code name | ACK_<registry code>
    details: str = ""

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Traffic:
    """Concurrent MACP traffic; use as `async with Traffic(...) as traffic:`."""

    routers: Sequence[str]
    sessions: Iterable[str]
    workers: int = 6
    starts: float = 0.1
    races: float = 0.0
    gets: float = 0.3
    pace_s: float = 0.01
    timeout_s: float = 3.0
    start_retry_s: float = 8.0
    failover: bool = False
    seed: int = 1
    calls: list[Call] = field(default_factory=list)
    acked_starts: set[str] = field(default_factory=set)
    failed_starts: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.known: list[str] = list(self.sessions)
        self.starts_paused = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._channels: list[tuple[str, grpc.aio.Channel]] = []
        self._starts_in_flight = 0
        self.began = 0.0
        self.finished = 0.0

    async def __aenter__(self) -> Traffic:
        self._channels = [(address, grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS))
                          for address in self.routers]
        self.began = time.monotonic()
        self._tasks = [asyncio.create_task(self._worker(i), name=f"traffic-{i}")
                       for i in range(self.workers)]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        await asyncio.gather(*self._tasks)
        self.finished = time.monotonic()
        for _, channel in self._channels:
            await channel.close()

    async def hold(self, seconds: float) -> None:
        """Let traffic run for `seconds` (holding a fault open); fail fast if a worker died."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for task in self._tasks:
                if task.done():
                    task.result()
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    async def pause_starts(self) -> None:
        """No new starts from now on; returns once every start in flight has ended."""
        self.starts_paused = True
        await eventually(lambda: self._starts_in_flight == 0, 30, "starts in flight ended")

    def resume_starts(self) -> None:
        self.starts_paused = False

    def describe(self) -> str:
        ops = collections.Counter(call.op for call in self.calls)
        seconds = (self.finished or time.monotonic()) - self.began
        parts = ", ".join(f"{n} {op}" for op, n in sorted(ops.items()))
        return (f"{len(self.calls)} calls in {seconds:.1f} s from {self.workers} workers "
                f"via {len(self.routers)} router(s) ({parts})")

    # -- workers --------------------------------------------------------------------------------
    async def _worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        turn = index
        while not self._stop.is_set():
            roll = rng.random()
            if roll < self.starts + self.races and not self.starts_paused:
                sid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                if roll < self.races:
                    await self._race(sid)
                else:
                    await self._start(sid, turn)
            elif self.known:
                sid = rng.choice(self.known)
                if roll < self.starts + self.races + self.gets:
                    await self._call("get", sid, turn, lambda ch, s=sid: self._get(ch, s))
                else:
                    envelope = macp_calls.proposal_envelope(sid)
                    await self._call("send", sid, turn, lambda ch, e=envelope: self._send(ch, e))
            turn += 1
            await asyncio.sleep(self.pace_s)

    async def poll(self, sids: Iterable[str], seconds: float) -> None:
        """GetSession on each of `sids` in turn for `seconds`, recorded like any other call."""
        order = sorted(sids)
        deadline = time.monotonic() + seconds
        turn = 0
        while time.monotonic() < deadline:
            sid = order[turn % len(order)]
            await self._call("get", sid, turn, lambda ch, s=sid: self._get(ch, s))
            turn += 1
            await asyncio.sleep(0.01)

    async def _get(self, channel: grpc.aio.Channel, sid: str) -> Any:
        return await macp_calls.stub(channel).GetSession(
            core_pb2.GetSessionRequest(session_id=sid), metadata=macp_calls.METADATA,
            timeout=self.timeout_s,
        )

    async def _send(self, channel: grpc.aio.Channel, envelope: Any) -> Any:
        reply = await macp_calls.stub(channel).Send(
            core_pb2.SendRequest(envelope=envelope), metadata=macp_calls.METADATA,
            timeout=self.timeout_s,
        )
        return reply.ack

    async def _call(self, op: str, sid: str, turn: int,
                    make: Callable[[grpc.aio.Channel], Awaitable[Any]]) -> Call:
        attempts = len(self._channels) if self.failover else 1
        for attempt in range(attempts):
            address, channel = self._channels[(turn + attempt) % len(self._channels)]
            started = time.monotonic()
            try:
                reply = await make(channel)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code().name, exc.details() or ""
            else:
                code, details = "OK", ""
                ack = getattr(reply, "ok", None)
                if ack is False:
                    code, details = f"ACK_{reply.error.code}", reply.error.message
            call = Call(op, sid, address, started, time.monotonic(), code, details)
            self.calls.append(call)
            if code != "UNAVAILABLE":
                break
        return call

    async def _start(self, sid: str, turn: int) -> None:
        envelope = macp_calls.start_envelope(sid)
        self._starts_in_flight += 1
        try:
            deadline = time.monotonic() + self.start_retry_s
            attempt = 0
            while True:
                call = await self._call("start", sid, turn + attempt,
                                        lambda ch: self._send(ch, envelope))
                if call.ok:
                    self.acked_starts.add(sid)
                    self.known.append(sid)
                    return
                if call.code not in RETRYABLE or time.monotonic() > deadline:
                    self.failed_starts.add(sid)
                    return
                attempt += 1
                await asyncio.sleep(0.05)  # the client's retry backoff
        finally:
            self._starts_in_flight -= 1

    async def _race(self, sid: str) -> None:
        """The same start sent through every router at once (a client retrying elsewhere)."""
        envelope = macp_calls.start_envelope(sid)
        self._starts_in_flight += 1
        try:
            calls = await asyncio.gather(*(
                self._call("race", sid, i, lambda ch: self._send(ch, envelope))
                for i in range(len(self._channels))
            ))
            if any(call.ok for call in calls):
                self.acked_starts.add(sid)
                self.known.append(sid)
            else:
                self.failed_starts.add(sid)
        finally:
            self._starts_in_flight -= 1

    # -- analysis -------------------------------------------------------------------------------
    def errors(self, calls: Iterable[Call] | None = None) -> dict[str, int]:
        return dict(collections.Counter(
            call.code for call in (self.calls if calls is None else calls) if not call.ok))

    def on(self, sids: set[str], *, ops: Iterable[str] = ("send", "get")) -> list[Call]:
        wanted = set(ops)
        return [call for call in self.calls if call.sid in sids and call.op in wanted]


def client_misroutes(traffic: Traffic, held: dict[str, list[str]]) -> list[Call]:
    """Calls answered not-found for a session that some pod holds (a wrong pod answered)."""
    return [call for call in traffic.calls
            if call.code in NOT_FOUND_CODES and held.get(call.sid)]


# -- pods --------------------------------------------------------------------------------------
async def pod_sessions(address: str, timeout: float = 5.0) -> dict[str, int]:
    """sid -> SessionState of every session the pod at `address` lists (asked directly)."""
    sessions: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        token = ""
        while True:
            page = await stub.ListSessions(
                core_pb2.ListSessionsRequest(page_size=1000, page_token=token),
                metadata=ROUTER_METADATA, timeout=timeout,
            )
            sessions.update((s.session_id, s.state) for s in page.sessions)
            token = page.next_page_token
            if not token:
                return sessions


async def sessions_by_pod(pods: dict[str, str] | Sequence[SimPod]) -> dict[str, set[str]]:
    """pod name -> sids it holds: ListSessions on each pod process, or a SimPod's records."""
    if isinstance(pods, dict):
        lists = await asyncio.gather(*(pod_sessions(address) for address in pods.values()))
        return {name: set(found) for name, found in zip(pods, lists, strict=True)}
    return {pod.name: set(pod.sessions) for pod in pods}


def holders(by_pod: dict[str, set[str]]) -> dict[str, list[str]]:
    """sid -> the pods holding it (more than one is a duplicate placement)."""
    held: dict[str, list[str]] = collections.defaultdict(list)
    for name, sids in sorted(by_pod.items()):
        for sid in sids:
            held[sid].append(name)
    return dict(held)


@dataclass
class PodProc:
    name: str
    port: int
    state_file: Path
    process: Process

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class PodProcs:
    """`macp-router pod --state-file` subprocesses on fixed loopback ports."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.pods: dict[str, PodProc] = {}
        self._starts: collections.Counter[str] = collections.Counter()

    def _process(self, name: str, port: int, state_file: Path) -> Process:
        self._starts[name] += 1
        log = self.tmp_path / f"pod-{name}-{self._starts[name]}.log"
        # Configured as an operator configures a runtime (tests.pod_auth), with the rate limits
        # raised as for a load test: the fault runs start sessions from one sender at volume.
        return Process(["pod", "--listen", f"127.0.0.1:{port}", "--name", name,
                        "--state-file", str(state_file), "--log-level", "info",
                        *pod_cli_args(self.tmp_path, start_limit=1_000_000,
                                      message_limit=1_000_000)], log)

    async def start(self, *names: str) -> list[PodProc]:
        started = []
        for name in names:
            port = free_port()
            state_file = self.tmp_path / f"pod-{name}.json"
            pod = PodProc(name, port, state_file, self._process(name, port, state_file))
            self.pods[name] = pod
            started.append(pod)
        await asyncio.gather(*(asyncio.to_thread(pod.process.start) for pod in started))
        return started

    def kill(self, name: str) -> None:
        """SIGKILL: the pod vanishes mid-call, nothing flushed."""
        self.pods[name].process.kill()

    async def restart(self, name: str) -> float:
        """Start the pod again on the same port with the same state file; returns when ready
        (time.monotonic() of the readiness)."""
        pod = self.pods[name]
        pod.process = self._process(name, pod.port, pod.state_file)
        await asyncio.to_thread(pod.process.start)
        return time.monotonic()

    def addresses(self) -> dict[str, str]:
        return {name: pod.address for name, pod in self.pods.items()}

    def pod_list(self) -> str:
        return ",".join(f"{name}={pod.address}" for name, pod in self.pods.items())

    def close(self) -> None:
        for pod in self.pods.values():
            pod.process.kill()


def state_file_sessions(path: Path) -> set[str]:
    """Sessions a pod's state file holds (what a restart replays)."""
    try:
        doc = json.loads(path.read_bytes())
    except (FileNotFoundError, json.JSONDecodeError):
        return set()
    return {item["session_id"] for item in doc.get("sessions", [])}


@pytest.fixture
def pod_procs(tmp_path: Path):  # type: ignore[no-untyped-def]
    procs = PodProcs(tmp_path)
    try:
        yield procs
    finally:
        procs.close()


# -- Redis -------------------------------------------------------------------------------------
@pytest.fixture
def redis_proc(redis_executable: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A private Redis the test may kill, restart (same port, empty) and flush."""
    server = RedisServer(redis_executable, tmp_path, password=None)
    try:
        yield server.start()
    finally:
        server.kill()


# -- routers -----------------------------------------------------------------------------------
@dataclass
class RouterProc:
    process: Process
    address: str
    metrics_port: int
    args: list[str]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of the router's /metrics, keyed by (name, sorted labels)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for (sample, sample_labels), value in self.metrics().items():
            if sample == name and set(labels.items()) <= set(sample_labels):
                total += value
        return total

    def stale_relocations(self) -> int:
        return int(self.metric("macp_router_locate_total", result="stale"))

    async def pods(self) -> router_pb2.ListPodsResponse:
        async with grpc.aio.insecure_channel(self.address) as channel:
            return await admin_stub(channel).ListPods(router_pb2.ListPodsRequest(), timeout=5)

    async def wait_pods_up(self, timeout: float = 10.0) -> None:
        """Until every pod is healthy and its watch feed has reconciled (admin ListPods)."""
        async def up() -> bool:
            reply = await self.pods()
            return bool(reply.pods) and all(p.healthy and p.feed_up for p in reply.pods)

        await eventually(up, timeout, f"router {self.address}: every pod healthy, feeds up")


class Routers:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[RouterProc] = []

    async def start(self, pods: str, *extra: str, name: str = "router",
                    port: int | None = None, wait: bool = True) -> RouterProc:
        metrics_port = free_port()
        process, address = router_process(
            self.tmp_path, pods, "--metrics-listen", f"127.0.0.1:{metrics_port}", *extra,
            port=port, name=f"{name}-{len(self.started)}",
        )
        router = RouterProc(process, address, metrics_port, list(extra))
        self.started.append(router)
        await asyncio.to_thread(process.start)
        if wait:
            await router.wait_pods_up()
        return router

    async def restart(self, router: RouterProc, pods: str, wait: bool = True) -> RouterProc:
        """The same router (address, flags) started again after it exited."""
        port = int(router.address.rpartition(":")[2])
        return await self.start(pods, *router.args, port=port, wait=wait)

    def close(self) -> None:
        for router in self.started:
            router.process.kill()


@pytest.fixture
def routers(tmp_path: Path):  # type: ignore[no-untyped-def]
    started = Routers(tmp_path)
    try:
        yield started
    finally:
        started.close()


def admin_stub(channel: grpc.aio.Channel) -> router_pb2_grpc.RouterAdminStub:
    return router_pb2_grpc.RouterAdminStub(channel)


async def session_status(address: str, sid: str) -> router_pb2.SessionStatusResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await admin_stub(channel).SessionStatus(
            router_pb2.SessionStatusRequest(session_id=sid), timeout=5)


@dataclass(slots=True)
class Outcome:
    """What the pods hold after a run under traffic, with the shared checks already asserted:
    no session on two pods, no acked session lost, no client call misrouted, and every held
    session answered through every router still running."""

    held: dict[str, list[str]]
    duplicates: list[str]
    lost: list[str]
    misroutes: str
    """"N (router stale relocations M)": the table's misroutes cell."""

    def row(self, traffic: Traffic, fault: str, recovery: str, traffic_note: str = "") -> FaultRow:
        return FaultRow(fault=fault, traffic=traffic.describe() + traffic_note,
                        errors=traffic.errors(), misroutes=self.misroutes,
                        duplicates=len(self.duplicates), lost=len(self.lost), recovery=recovery)


async def checked_outcome(pods: Any, traffic: Traffic, routers: Sequence[RouterProc],
                          initial: Iterable[str]) -> Outcome:
    """The run's `Outcome`; routers that were killed and not restarted are left out."""
    held = holders(await sessions_by_pod(pods))
    duplicates = sorted(sid for sid, where in held.items() if len(where) > 1)
    lost = sorted((set(initial) | traffic.acked_starts) - set(held))
    misrouted = client_misroutes(traffic, held)
    running = [router for router in routers if router.process.proc.poll() is None]
    stale = sum(router.stale_relocations() for router in running)
    assert not duplicates, {sid: held[sid] for sid in duplicates}
    assert not lost, lost
    assert not misrouted, misrouted[:3]
    for router in running:
        failures = await final_sweep(router.address, held)
        assert not failures, dict(list(failures.items())[:3])
    return Outcome(held, duplicates, lost, f"{len(misrouted)} (router stale relocations {stale})")


async def final_sweep(address: str, sids: Iterable[str]) -> dict[str, str]:
    """GetSession for every sid through the router; sid -> code of each that did not answer OK."""
    failures: dict[str, str] = {}
    # Stay under the router's per-connection stream limit (--max-concurrent-streams).
    limit = asyncio.Semaphore(32)
    async with grpc.aio.insecure_channel(address) as channel:
        async def one(sid: str) -> None:
            async with limit:
                try:
                    await macp_calls.get_session(channel, sid)
                except grpc.aio.AioRpcError as exc:
                    failures[sid] = f"{exc.code().name}: {exc.details()}"

        await asyncio.gather(*(one(sid) for sid in sids))
    return failures


async def start_sessions(address: str, count: int) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        return list(await asyncio.gather(*(macp_calls.start(channel) for _ in range(count))))
