"""Scenarios: what each one sends, to which targets, and which derived figures it computes.

Every scenario measures the same traffic against up to four targets in one run:
`direct` (the pod itself: the baseline), `passthrough` (the bare raw-bytes hop of
`loadtest.passthrough`, upstream pod0), `nginx` (nginx `grpc_pass` to pod0, `loadtest.nginx`;
when nginx is installed, else reported as not run) and `router` (`macp-router serve`); on
request also `passthrough-sync` (the bare hop on grpc's sync API, `--sync-passthrough`) and
`router-b` (a second router with other flags, `--compare-router-args`). Traffic
for the hop comparison goes to sessions on pod0, so the legs share the same upstream process.

Scenarios (`SCENARIOS`): hit, stream, miss, start, mixed, pod-kill, scale, workers (1 vs N
workers, pinned with CPU affinity where the machine has the cores), memory, overload (1x/2x/4x
the router's saturation rate, open loop: `loadtest.overload`), acp (ACP agents direct vs
through the router's ACP front door: `loadtest.acpscenario`; a run of `acp` alone starts one
MACP pod and nothing else of the MACP set-up). All processes (generator, pods, proxy, nginx,
router, Valkey) share one machine; CPU seconds per process group are
recorded for every saturation phase so the split can be reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from macp.v1 import core_pb2

from loadtest import payloads
from loadtest.cluster import (
    CALL_TIMEOUT_S,
    Client,
    Cluster,
    Pod,
    Router,
    cpu_delta,
    cpu_snapshot,
    metric_delta,
    metric_sum,
    router_support,
)
from loadtest.gen import Op, PhaseResult, merge, run_closed, run_open

SCENARIOS = ("hit", "stream", "miss", "start", "mixed", "pod-kill", "scale", "workers", "memory",
             "acp", "store", "overload")
# Scenarios that bring their own pods and router: they need one MACP pod (for `serve --pods`)
# and none of the MACP sessions, passthrough or router of the others. (`store` starts its own
# Redis topology, pods and router: `loadtest.storebench`.)
OWN_SETUP = frozenset({"acp", "store"})
MD = payloads.METADATA
T = CALL_TIMEOUT_S
MISROUTE_CODES = frozenset({"ACK_SESSION_NOT_FOUND", "NOT_FOUND", "STREAM_SESSION_NOT_FOUND"})
MISS_RETENTION_S = 1.0
RETRYABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "TIMEOUT", "RESOURCE_EXHAUSTED"})


@dataclass
class Settings:
    """One run's knobs (see `python -m loadtest run --help`)."""

    scenarios: list[str]
    duration: float = 10.0
    concurrency: int = 32
    rate: float | None = None
    pods: int = 3
    pod_addresses: list[str] | None = None
    sessions: int = 200
    miss_sessions: int = 300
    mem_sessions: int = 10_000
    stream_messages: int = 5
    workers: int = 2
    scale_pods: int = 32
    cache_sizes: tuple[int, int] = (1_000, 1_000_000)
    kill_rate: float = 300.0
    acp_pods: int = 3
    acp_connections: int = 16
    acp_sessions: int = 4
    acp_miss_sessions: int = 200
    acp_transport: str = "ws"
    acp_client: str = "lean"
    rounds: int = 3
    redis: str | None = None
    store_topology: str | None = None  # `store`: standalone | cluster | sentinel
    router: bool = True
    require_router: bool = False
    nginx: bool = True  # the nginx grpc_pass leg, when nginx is installed (loadtest.nginx)
    sync_passthrough: bool = False  # the `passthrough-sync` leg (grpc's sync API, issue 16)
    router_args: list[str] = field(default_factory=list)  # extra `serve` flags (--router-args)
    compare_router_args: list[str] | None = None  # leg `router-b`: flags instead of router_args
    step_seconds: float = 10.0  # `overload`: seconds per step (per leg)
    overload_steps: tuple[float, ...] = (1.0, 2.0, 4.0)  # `overload`: multipliers of saturation
    max_in_flight: int = 1024  # open loop: the generator's own bound on calls in flight
    quick: bool = False
    quiet: bool = False
    out: Path = Path("loadtest/out")

    @classmethod
    def quick_defaults(cls, scenarios: list[str]) -> Settings:
        return cls(
            scenarios=scenarios, duration=1.0, concurrency=8, pods=2, sessions=40,
            miss_sessions=40, mem_sessions=300, stream_messages=3, scale_pods=4,
            cache_sizes=(1_000, 100_000), kill_rate=150.0, rounds=1, quick=True,
            acp_pods=2, acp_connections=4, acp_miss_sessions=40, step_seconds=1.0,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def log(msg: str) -> None:
    print(f"== {msg}", file=sys.stderr, flush=True)


# ── ops ─────────────────────────────────────────────────────────────────
def send_op(client: Client, requests: Sequence[bytes]) -> Op:
    """Unary Send of pre-serialized requests, round robin; Ack errors count as failures."""
    send, n = client.send, len(requests)

    async def op(i: int) -> str | None:
        return payloads.ack_error(await send(requests[i % n], metadata=MD, timeout=T))

    return op


def get_op(client: Client, requests: Sequence[bytes]) -> Op:
    call, n = client.get_session, len(requests)

    async def op(i: int) -> str | None:
        await call(requests[i % n], metadata=MD, timeout=T)
        return None

    return op


def start_op(clients: Sequence[Client]) -> Op:
    """SessionStart of a fresh session id per op (round robin over `clients`)."""
    sends, n = [c.send for c in clients], len(clients)

    async def op(i: int) -> str | None:
        request = payloads.send_start(payloads.new_id())
        return payloads.ack_error(await sends[i % n](request, metadata=MD, timeout=T))

    return op


def per_owner_send_op(clients: dict[str, Client], sids: Sequence[tuple[str, str]],
                      requests: dict[str, bytes]) -> Op:
    """Send to the pod owning each session (direct baseline over several pods)."""
    n = len(sids)

    async def op(i: int) -> str | None:
        sid, pod = sids[i % n]
        return payloads.ack_error(
            await clients[pod].send(requests[sid], metadata=MD, timeout=T)
        )

    return op


def stream_op(client: Client, sids: Sequence[str], messages: int, per_message: PhaseResult) -> Op:
    """One StreamSession: open, `messages` x (write a Proposal, read until its echo), close.

    The op's latency is the whole stream; each message round trip goes to `per_message`.
    """
    n = len(sids)
    perf = time.perf_counter

    async def op(i: int) -> str | None:
        sid = sids[i % n]
        call = client.stream(metadata=MD, timeout=T)
        try:
            for _ in range(messages):
                mid = payloads.new_id()
                t0 = perf()
                await call.write(payloads.stream_proposal(sid, mid))
                while True:
                    frame = await call.read()
                    if frame is grpc.aio.EOF:
                        return "STREAM_EOF"
                    msg = core_pb2.StreamSessionResponse.FromString(frame)
                    if msg.HasField("error") and msg.error.code:
                        return f"STREAM_{msg.error.code}"
                    if msg.envelope.message_id == mid:
                        break
                per_message.hist.record(perf() - t0)
                per_message.ok += 1
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
            return None
        finally:
            call.cancel()

    return op


def mixed_op(client: Client, hit_requests: Sequence[bytes], get_requests: Sequence[bytes]) -> Op:
    """80 % hit Send, 10 % GetSession, 10 % SessionStart (decided by op index)."""
    send, get = client.send, client.get_session
    nh, ng = len(hit_requests), len(get_requests)

    async def op(i: int) -> str | None:
        kind = i % 10
        if kind == 8:
            await get(get_requests[i % ng], metadata=MD, timeout=T)
            return None
        if kind == 9:
            request = payloads.send_start(payloads.new_id())
            return payloads.ack_error(await send(request, metadata=MD, timeout=T))
        return payloads.ack_error(await send(hit_requests[i % nh], metadata=MD, timeout=T))

    return op


# ── the run ─────────────────────────────────────────────────────────────
@dataclass
class Run:
    """State shared by the scenarios of one run: cluster, sessions, results."""

    settings: Settings
    cluster: Cluster
    router: Router | None = None
    hit_sids: list[str] = field(default_factory=list)  # on pod0, known to the router
    spread: list[tuple[str, str]] = field(default_factory=list)  # (sid, pod name), all pods
    miss_sids: list[tuple[str, str]] = field(default_factory=list)  # never seen by the router
    results: dict[str, Any] = field(default_factory=dict)
    phases: list[PhaseResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    _hit_mids: dict[str, str] = field(default_factory=dict)
    router_b: Router | None = None  # --compare-router-args: a second router, its own flags
    router_started: float = 0.0

    # ── helpers ─────────────────────────────────────────────────────────
    @property
    def pod0(self) -> Pod:
        return self.cluster.pods[0]

    def legs(self) -> dict[str, Client]:
        """Target name -> client for the hop comparison (sessions on pod0)."""
        legs: dict[str, Client] = {"direct": self._client(self.pod0)}
        if self.cluster.passthrough_client is not None:
            legs["passthrough"] = self.cluster.passthrough_client
        if self.cluster.sync_passthrough_client is not None:
            legs["passthrough-sync"] = self.cluster.sync_passthrough_client
        if self.cluster.nginx_client is not None:
            legs["nginx"] = self.cluster.nginx_client
        if self.router is not None and self.router.client is not None:
            legs["router"] = self.router.client
        if self.router_b is not None and self.router_b.client is not None:
            legs["router-b"] = self.router_b.client
        return legs

    @staticmethod
    def _client(pod: Pod) -> Client:
        assert pod.client is not None
        return pod.client

    def pod_clients(self) -> dict[str, Client]:
        return {p.name: self._client(p) for p in self.cluster.pods}

    async def phase(
        self,
        scenario: str,
        target: str,
        phase: str,
        op: Op,
        *,
        concurrency: int | None = None,
        rate: float | None = None,
        duration: float | None = None,
        max_ops: int | None = None,
        bin_s: float = 1.0,
        record: bool = True,
        max_in_flight: int | None = None,
    ) -> PhaseResult:
        """Run one closed-loop (`concurrency`) or open-loop (`rate`) phase with CPU accounting."""
        duration = duration if duration is not None else self.settings.duration
        cpu0 = cpu_snapshot(self.cluster)
        if rate is not None:
            result = await run_open(target, phase, op, rate=rate, duration=duration,
                                    bin_s=bin_s, quiet=self.settings.quiet,
                                    max_in_flight=max_in_flight or self.settings.max_in_flight)
        else:
            result = await run_closed(target, phase, op, concurrency=concurrency or 1,
                                      duration=duration, max_ops=max_ops,
                                      quiet=self.settings.quiet)
        result.cpu_s = cpu_delta(cpu0, cpu_snapshot(self.cluster))
        result.extra["scenario"] = scenario
        if record:
            self.phases.append(result)
        return result

    async def interleaved(
        self,
        scenario: str,
        phase: str,
        ops: dict[str, Op],
        *,
        duration: float | None = None,
        around: Callable[[str], Any] | None = None,
        **load: Any,
    ) -> dict[str, PhaseResult]:
        """The same phase for every target, split into `rounds` chunks run A, B, C, A, B, C...

        On a machine whose background load drifts, alternating legs spreads the drift over
        all of them instead of charging it to whichever leg ran during a busy minute.
        `around(target)` is an async context manager wrapped around each chunk (e.g. Redis
        command counting).
        """
        rounds = max(1, self.settings.rounds)
        chunk = (duration if duration is not None else self.settings.duration) / rounds
        parts: dict[str, list[PhaseResult]] = {t: [] for t in ops}
        for _ in range(rounds):
            for target, op in ops.items():
                ctx = around(target) if around is not None else contextlib.nullcontext()
                async with ctx:
                    parts[target].append(await self.phase(
                        scenario, target, phase, op, duration=chunk, record=False, **load))
        merged = {t: merge(p) for t, p in parts.items()}
        self.phases.extend(merged.values())
        return merged

    # ── setup ───────────────────────────────────────────────────────────
    async def setup(self) -> None:
        s, cluster = self.settings, self.cluster
        own_only = all(name in OWN_SETUP for name in s.scenarios)
        if s.pod_addresses:
            cluster.use_external_pods(s.pod_addresses)
            log(f"using {len(cluster.pods)} external pods")
        else:
            count = 1 if own_only else s.pods
            log(f"starting {count} pods")
            await cluster.start_pods(count)
        await asyncio.gather(*(self._client(p).ready() for p in cluster.pods))
        if own_only:
            return
        if s.redis:
            await cluster.start_redis(s.redis)
        log(f"creating {s.sessions} sessions on {self.pod0.name} and {s.sessions} spread")
        self.hit_sids = await self.create_sessions([self.pod0] * s.sessions)
        spread_pods = [cluster.pods[i % len(cluster.pods)] for i in range(s.sessions)]
        spread_sids = await self.create_sessions(spread_pods)
        self.spread = [(sid, pod.name) for sid, pod in zip(spread_sids, spread_pods, strict=True)]
        if "miss" in s.scenarios:
            # Created and resolved before the router starts: a pod's WatchSessions snapshot
            # leaves terminal sessions out, so the router has never seen them, yet GetSession
            # still answers them (terminal sessions stay readable).
            miss_pods = [cluster.pods[i % len(cluster.pods)] for i in range(s.miss_sessions)]
            sids = await self.create_sessions(miss_pods, resolve=True)
            self.miss_sids = [(sid, p.name) for sid, p in zip(sids, miss_pods, strict=True)]
        await cluster.start_passthrough(self.pod0)
        assert cluster.passthrough_client is not None
        await cluster.passthrough_client.ready()
        if s.sync_passthrough:
            await (await cluster.start_passthrough(self.pod0, mode="sync")).ready()
        await self.start_nginx()
        if s.router:
            support = router_support()
            if support.available:
                log("starting router")
                extra: list[str] = []
                if self.miss_sids and support.has_flag("--retention-s"):
                    # The router learns the resolved miss sessions at start-up (ListSessions);
                    # a short retention makes it forget them again, so they are true misses
                    # (near-cache and store empty for them) by the time `miss` runs.
                    extra = ["--retention-s", str(MISS_RETENTION_S)]
                redis_url = cluster.redis.url if cluster.redis else None
                self.router = await cluster.start_router(
                    workers=1, redis_url=redis_url, extra_args=[*extra, *s.router_args])
                self.router_started = time.monotonic()
                assert self.router.client is not None
                await self.router.client.ready()
                await self.warm(self.router)
                if s.compare_router_args is not None:
                    log("starting router-b: " + (" ".join(s.compare_router_args) or "(no flags)"))
                    self.router_b = await cluster.start_router(
                        workers=1, redis_url=redis_url, name="router-b",
                        extra_args=[*extra, *s.compare_router_args])
                    assert self.router_b.client is not None
                    await self.router_b.client.ready()
                    await self.warm(self.router_b)
            elif s.require_router:
                raise RuntimeError(support.reason)
            else:
                self.skipped["router"] = support.reason
                log(f"router leg skipped: {support.reason}")
        else:
            self.skipped["router"] = "--no-router"

    async def start_nginx(self) -> None:
        """The nginx leg (grpc_pass to pod0), or the reason it is not run in `skipped`."""
        if not self.settings.nginx:
            self.skipped["nginx"] = "not run: --no-nginx"
            return
        try:
            client = await self.cluster.start_nginx(self.pod0)
            await client.ready()
        except RuntimeError as exc:
            self.skipped["nginx"] = f"not run: {exc}".splitlines()[0]
            log(f"nginx leg {self.skipped['nginx']}")

    async def create_sessions(self, pods: Sequence[Pod], *, resolve: bool = False,
                              concurrency: int = 32) -> list[str]:
        """Start one session per entry of `pods` directly on that pod; return the ids.

        Each session also gets its hit Proposal once, so later hit Sends are duplicates (a
        full routed call, no growth of the pod's message log). With `resolve`, a Commitment
        ends the session.
        """
        sids = [payloads.new_id() for _ in pods]
        queue = list(range(len(pods)))

        async def worker() -> None:
            while queue:
                i = queue.pop()
                client = self._client(pods[i])
                requests = [payloads.send_start(sids[i]), self.hit_request(sids[i])]
                if resolve:
                    requests.append(payloads.send_commitment(sids[i]))
                for request in requests:
                    err = payloads.ack_error(await client.send(request, metadata=MD, timeout=T))
                    if err is not None:
                        raise RuntimeError(f"setup send to {pods[i].name} failed: {err}")

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(pods)) or 1)))
        return sids

    def hit_request(self, sid: str) -> bytes:
        """The Send(Proposal) used for hits on `sid`; fixed message id per session."""
        mid = self._hit_mids.setdefault(sid, payloads.new_id())
        return payloads.send_proposal(sid, mid)

    async def warm(self, router: Router) -> None:
        """Make every hit/spread session a cache hit: one GetSession each through `router`."""
        assert router.client is not None
        sids = self.hit_sids + [sid for sid, _ in self.spread]
        requests = [payloads.get_session(sid) for sid in sids]
        result = await run_closed("router", "warm-up", get_op(router.client, requests),
                                  concurrency=16, duration=60.0, max_ops=len(requests),
                                  quiet=True)
        if result.error_count:
            raise RuntimeError(f"router warm-up failed: {dict(result.errors)}")

    # ── scenarios ───────────────────────────────────────────────────────
    async def run(self) -> None:
        for name in self.settings.scenarios:
            fn: Callable[[], Any] = getattr(self, "scenario_" + name.replace("-", "_"))
            log(f"scenario {name}")
            started = time.perf_counter()
            await fn()
            self.results.setdefault(name, {})["wall_s"] = round(time.perf_counter() - started, 2)

    def _sub_rate(self, sat: dict[str, PhaseResult]) -> float:
        """The fixed sub-saturation rate: --rate, else half the router's (or the hop's) sat."""
        if self.settings.rate:
            return self.settings.rate
        ref = sat.get("router") or sat.get("passthrough") or sat["direct"]
        return max(10.0, round(ref.throughput / 2.0, -1))

    async def _hop_phases(self, scenario: str, ops: dict[str, Op], *, c1: bool = True,
                          open_loop: bool = True) -> dict[str, Any]:
        """sat (closed, --concurrency), c1 (closed, 1) and rate (open, half sat) per leg."""
        s = self.settings
        redis_calls: dict[str, int] = {}
        redis = self.cluster.redis

        @contextlib.asynccontextmanager
        async def count_redis(target: str) -> AsyncIterator[None]:
            if target != "router" or redis is None:
                yield
                return
            before = await redis.command_calls()
            yield
            after = await redis.command_calls()
            for k, v in after.items():
                if v - before.get(k, 0):
                    redis_calls[k] = redis_calls.get(k, 0) + v - before.get(k, 0)

        sat = await self.interleaved(scenario, "sat", ops, around=count_redis,
                                     concurrency=s.concurrency)
        summary: dict[str, Any] = {
            "throughput_rps": {t: round(r.throughput, 1) for t, r in sat.items()},
            "errors": {t: dict(r.errors) for t, r in sat.items() if r.errors},
        }
        d = sat["direct"].throughput or 1.0
        for t, r in sat.items():
            if t != "direct":
                summary[f"ratio_{t}_direct"] = round(r.throughput / d, 4)
        if "passthrough" in sat and sat["passthrough"].throughput:
            for t in ("router", "router-b", "passthrough-sync", "nginx"):
                if t in sat:  # every hop over the bare aio hop (ratio_router_passthrough, ...)
                    summary[f"ratio_{t}_passthrough"] = round(
                        sat[t].throughput / sat["passthrough"].throughput, 4)
        summary["cpu_ms_per_request"] = cpu_per_request(sat)
        summary["generator_cpu_ms_per_request"] = {
            t: round(r.cpu_s.get("generator", 0.0) * 1000.0 / r.ok, 4)
            for t, r in sat.items() if r.ok}
        if "nginx" not in sat and "nginx" in self.skipped:
            summary["not_run"] = {"nginx": self.skipped["nginx"]}
        if "nginx" in sat and sat["nginx"].throughput:
            for t in ("router", "passthrough"):
                if t in sat:
                    summary[f"ratio_{t}_nginx"] = round(
                        sat[t].throughput / sat["nginx"].throughput, 4)
        summary["cpu_split"] = {t: cpu_split(r) for t, r in sat.items()}
        if "router" in sat and self.cluster.redis is not None:
            summary["redis_commands"] = redis_calls
            summary["redis_commands_per_request"] = round(
                sum(redis_calls.values()) / max(1, sat["router"].ok), 6)
        if c1:
            one = await self.interleaved(scenario, "c1", ops, concurrency=1,
                                         duration=max(0.5, s.duration / 2))
            summary["c1_p50_ms"] = {t: r.hist.summary()["p50_ms"] for t, r in one.items()}
            if "router" in one and "passthrough" in one:
                summary["c1_p50_router_minus_passthrough_ms"] = round(
                    one["router"].hist.percentile_ms(50)
                    - one["passthrough"].hist.percentile_ms(50), 4)
        if open_loop:
            rate = self._sub_rate(sat)
            summary["rate_rps"] = rate
            opened = await self.interleaved(scenario, "rate", ops, rate=rate)
            base = opened["direct"].hist
            summary["rate_latency_ms"] = {t: r.hist.summary() for t, r in opened.items()}
            summary["rate_errors"] = {t: dict(r.errors) for t, r in opened.items() if r.errors}
            summary["added_ms"] = {
                t: {f"p{p}": round(r.hist.percentile_ms(p) - base.percentile_ms(p), 4)
                    for p in (50, 90, 99)}
                for t, r in opened.items() if t != "direct"
            }
        return summary

    async def scenario_hit(self) -> None:
        requests = [self.hit_request(sid) for sid in self.hit_sids]
        ops = {t: send_op(c, requests) for t, c in self.legs().items()}
        before = await self.router.metrics() if self.router else {}
        summary = await self._hop_phases("hit", ops)
        if "redis_commands_per_request" in summary:
            summary["redis_commands_per_hit"] = summary["redis_commands_per_request"]
        if self.router is not None:
            after = await self.router.metrics()
            # near-cache hits are not counted by the router (hot path); anything else is slow
            summary["router_slow_locates"] = {
                r: metric_delta(before, after, "macp_router_locate_total", result=r)
                for r in ("store_hit", "probe_hit", "not_found", "unknown", "stale")
            }
            summary["router_requests"] = metric_delta(before, after, "macp_router_requests_total")
        self.results["hit"] = summary

    async def scenario_stream(self) -> None:
        s = self.settings
        summary: dict[str, Any] = {"messages_per_stream": s.stream_messages}
        per_msg: dict[str, PhaseResult] = {}
        ops: dict[str, Op] = {}
        for target, client in self.legs().items():
            per_msg[target] = PhaseResult(target=target, phase="stream-msg", mode="closed")
            ops[target] = stream_op(client, self.hit_sids, s.stream_messages, per_msg[target])
        sat = await self.interleaved("stream", "sat", ops, concurrency=s.concurrency)
        for target, result in sat.items():
            per_msg[target].duration_s = result.duration_s
        summary["streams_per_s"] = {t: round(r.throughput, 1) for t, r in sat.items()}
        summary["messages_per_s"] = {t: round(r.throughput, 1) for t, r in per_msg.items()}
        summary["message_rtt_ms"] = {t: r.hist.summary() for t, r in per_msg.items()}
        summary["errors"] = {t: dict(r.errors) for t, r in sat.items() if r.errors}
        d = per_msg["direct"].throughput or 1.0
        for t, r in per_msg.items():
            if t != "direct":
                summary[f"ratio_{t}_direct"] = round(r.throughput / d, 4)
        summary["cpu_split"] = {t: cpu_split(r) for t, r in sat.items()}
        # Whole-stream latency (open, round trips, half-close, end) at c=1 and c=--concurrency:
        # what a relayed stream costs over the bare hop, the router's goal (<= 2 ms at p50).
        one = await self.interleaved("stream", "c1", ops, concurrency=1,
                                     duration=max(0.5, s.duration / 2))
        summary["stream_ms"] = {
            "c1": {t: r.hist.summary() for t, r in one.items()},
            f"c{s.concurrency}": {t: r.hist.summary() for t, r in sat.items()},
        }
        if "router" in sat and "passthrough" in sat:
            summary["stream_router_minus_passthrough_ms"] = {
                level: {f"p{p}": round(legs["router"].hist.percentile_ms(p)
                                       - legs["passthrough"].hist.percentile_ms(p), 4)
                        for p in (50, 99)}
                for level, legs in (("c1", one), (f"c{s.concurrency}", sat))
            }
        self.results["stream"] = summary

    async def scenario_start(self) -> None:
        legs = self.legs()
        ops = {t: start_op([c]) for t, c in legs.items()}
        self.results["start"] = await self._hop_phases("start", ops, open_loop=False)

    async def scenario_mixed(self) -> None:
        hits = [self.hit_request(sid) for sid in self.hit_sids]
        gets = [payloads.get_session(sid) for sid in self.hit_sids]
        ops = {t: mixed_op(c, hits, gets) for t, c in self.legs().items()}
        summary = await self._hop_phases("mixed", ops, c1=False)
        summary["mix"] = {"send_hit": 0.8, "get_session": 0.1, "session_start": 0.1}
        self.results["mixed"] = summary

    async def scenario_miss(self) -> None:
        """Probe RTT (direct GetSession, c=1) vs router GetSession on never-seen sessions."""
        summary: dict[str, Any] = {"sessions": len(self.miss_sids)}
        self.results["miss"] = summary
        if not self.miss_sids:
            summary["skipped"] = "no miss sessions (setup ran without the miss scenario)"
            return
        clients = self.pod_clients()
        direct_requests = [(payloads.get_session(sid), pod) for sid, pod in self.miss_sids]

        async def direct(i: int) -> str | None:
            request, pod = direct_requests[i % len(direct_requests)]
            await clients[pod].get_session(request, metadata=MD, timeout=T)
            return None

        budget = max(2.0, self.settings.duration)
        rtt = await self.phase("miss", "direct", "probe-rtt", direct, concurrency=1,
                               duration=budget)
        summary["probe_rtt_ms"] = rtt.hist.summary()
        pt_sids = [payloads.get_session(sid) for sid in self.hit_sids]
        assert self.cluster.passthrough_client is not None
        hop = await self.phase("miss", "passthrough", "hop-rtt",
                               get_op(self.cluster.passthrough_client, pt_sids), concurrency=1,
                               duration=budget)
        summary["passthrough_get_ms"] = hop.hist.summary()
        if self.router is None:
            summary["router"] = "skipped: " + self.skipped.get("router", "")
            return
        assert self.router.client is not None
        # the router forgets ended sessions MISS_RETENTION_S after learning them (see setup)
        await asyncio.sleep(max(0.0, self.router_started + MISS_RETENTION_S + 1.0
                                - time.monotonic()))
        fresh = self.miss_sids
        coalesce_n = min(20, max(1, len(fresh) // 5))
        measured, coalesce = fresh[:-coalesce_n] or fresh, fresh[-coalesce_n:]
        hit = await self.phase("miss", "router", "hit-rtt", get_op(self.router.client, pt_sids),
                               concurrency=1, duration=budget)
        summary["router_hit_get_ms"] = hit.hist.summary()
        calls0, m0 = await self.cluster.pod_calls(), await self.router.metrics()
        requests = [payloads.get_session(sid) for sid, _ in measured]
        miss = await self.phase("miss", "router", "miss", get_op(self.router.client, requests),
                                concurrency=1, duration=max(budget, 30.0),
                                max_ops=len(requests))
        calls1, m1 = await self.cluster.pod_calls(), await self.router.metrics()
        n = miss.ok + miss.error_count
        summary["miss_ms"] = miss.hist.summary()
        summary["errors"] = dict(miss.errors)
        for p in (50, 99):
            summary[f"miss_minus_probe_rtt_p{p}_ms"] = round(
                miss.hist.percentile_ms(p) - rtt.hist.percentile_ms(p), 4)
            # what the probe adds on top of the same call as a cache hit
            summary[f"miss_minus_router_hit_p{p}_ms"] = round(
                miss.hist.percentile_ms(p) - hit.hist.percentile_ms(p), 4)
        get_calls = calls1.get("GetSession", 0) - calls0.get("GetSession", 0)
        summary["pod_getsession_calls_per_request"] = round(get_calls / max(1, n), 3)
        locate = {r: metric_delta(m0, m1, "macp_router_locate_total", result=r)
                  for r in ("hit", "store_hit", "probe_hit", "not_found", "negative_hit",
                            "unknown", "stale")}
        summary["router_locate"] = locate
        real_misses = sum(v for k, v in locate.items() if k not in ("hit", "negative_hit"))
        probes = metric_delta(m0, m1, "macp_router_probes_total")
        summary["real_miss_fraction"] = round(real_misses / max(1, n), 4) if m1 else None
        if m1 and real_misses:
            summary["probes_per_miss"] = round(probes / real_misses, 3)
            summary["probes_per_miss_source"] = "router /metrics macp_router_probes_total"
        elif get_calls:
            # a GetSession miss is its own probes (the holder's answer is the reply, no forward)
            summary["probes_per_miss"] = round(get_calls / max(1, n), 3)
            summary["probes_per_miss_source"] = "pod GetSession counters"
        summary["pods"] = len(self.cluster.pods)
        summary["coalescing"] = await self._coalescing(coalesce)

    async def _coalescing(self, sids: Sequence[tuple[str, str]], callers: int = 8
                          ) -> dict[str, Any]:
        """`callers` concurrent GetSessions per never-seen sid -> probe fan-outs per sid."""
        assert self.router is not None and self.router.client is not None
        get = self.router.client.get_session
        m0, calls0 = await self.router.metrics(), await self.cluster.pod_calls()
        errors: Counter[str] = Counter()
        for sid, _ in sids:
            request = payloads.get_session(sid)
            results = await asyncio.gather(
                *(get(request, metadata=MD, timeout=T) for _ in range(callers)),
                return_exceptions=True)
            for r in results:
                if isinstance(r, grpc.aio.AioRpcError):
                    errors[r.code().name] += 1
        m1, calls1 = await self.router.metrics(), await self.cluster.pod_calls()
        fanouts = metric_delta(m0, m1, "macp_router_probe_fanouts_total")
        get_calls = calls1.get("GetSession", 0) - calls0.get("GetSession", 0)
        return {
            "sessions": len(sids),
            "concurrent_callers": callers,
            "fanouts_per_session": round(fanouts / max(1, len(sids)), 3) if m1 else None,
            "pod_getsession_calls_per_session": round(get_calls / max(1, len(sids)), 2),
            "errors": dict(errors),
        }

    async def scenario_pod_kill(self) -> None:
        """Open loop over sessions on all pods; the last pod is SIGKILLed at 1/3, back at 2/3."""
        s = self.settings
        cluster = self.cluster
        summary: dict[str, Any] = {"rate_rps": s.kill_rate}
        self.results["pod-kill"] = summary
        victims = [p for p in cluster.pods[1:] if p.proc is not None]
        if not victims:
            summary["skipped"] = "needs >= 2 pods started by the load test (pod0 stays up)"
            return
        victim = victims[-1]
        summary["victim"] = victim.name
        duration = max(3.0, s.duration)
        requests = {sid: self.hit_request(sid) for sid, _ in self.spread}
        legs: dict[str, Op] = {"direct": per_owner_send_op(self.pod_clients(), self.spread,
                                                          requests)}
        if self.router is not None and self.router.client is not None:
            legs["router"] = send_op(self.router.client, [requests[sid] for sid, _ in
                                                         self.spread])
        for target, op in legs.items():
            events: dict[str, float] = {}

            async def chaos(events: dict[str, float] = events) -> None:
                t0 = time.perf_counter()
                await asyncio.sleep(duration / 3)
                events["killed_at_s"] = round(time.perf_counter() - t0, 3)
                await cluster.kill_pod(victim)
                await asyncio.sleep(max(0.0, 2 * duration / 3 - (time.perf_counter() - t0)))
                t1 = time.perf_counter()
                await cluster.restart_pod(victim)
                events["restarted_at_s"] = round(time.perf_counter() - t0, 3)
                events["restart_to_ready_s"] = round(time.perf_counter() - t1, 3)

            chaos_task = asyncio.create_task(chaos())
            try:
                result = await self.phase("pod-kill", target, "kill", op, rate=s.kill_rate,
                                          duration=duration, bin_s=0.1)
            finally:
                with contextlib.suppress(asyncio.CancelledError):
                    await chaos_task
            misroutes = sum(v for k, v in result.errors.items() if k in MISROUTE_CODES)
            result.extra.update(events)
            if "restarted_at_s" in events and "last_error_at_s" in result.extra:
                events["errors_end_after_restart_s"] = round(
                    max(0.0, result.extra["last_error_at_s"] - events["restarted_at_s"]), 3)
            summary[target] = {
                "ok": result.ok,
                "errors": dict(result.errors),
                "misroutes": misroutes,
                "non_retryable_errors": sum(v for k, v in result.errors.items()
                                            if k not in RETRYABLE_CODES),
                "latency": result.hist.summary(),
                **events,
                "bin_s": result.bin_s,
                "ok_per_bin": result.ok_per_s,
                "err_per_bin": result.err_per_s,
            }
            # the restarted pod must be serving before the next leg
            await self._client(victim).ready(timeout=10.0)

    async def scenario_acp(self) -> None:
        """ACP prompts / status / misses, direct vs the router's ACP front door."""
        from loadtest.acpscenario import scenario_acp

        await scenario_acp(self)

    async def scenario_scale(self) -> None:
        """Hit cost with 1 vs K pods, and with 1k vs 1M cached sessions (preloaded in-process)."""
        from loadtest.benchcache import bench_near_cache

        s = self.settings
        summary: dict[str, Any] = {}
        self.results["scale"] = summary
        summary["near_cache"] = await asyncio.to_thread(
            bench_near_cache, s.cache_sizes, 200_000 if not s.quick else 50_000)
        if self.router is None:
            summary["router"] = "skipped: " + self.skipped.get("router", "")
            return
        extra_n = max(0, s.scale_pods - len(self.cluster.pods))
        log(f"scale: starting {extra_n} extra pods ({s.scale_pods} total)")
        extra = await self.cluster.start_pods(extra_n, prefix="xpod", state=False,
                                              first_index=len(self.cluster.pods))
        try:
            all_pods = self.cluster.pods[: s.scale_pods]
            out = await self._compare_routers(
                "scale", {"1_pod": {"pods": [self.pod0]},
                          f"{len(all_pods)}_pods": {"pods": all_pods}})
        finally:
            for pod in extra:
                if pod.proc is not None:
                    await self.cluster.procs.stop(pod.proc)
                if pod.client is not None:
                    await pod.client.close()
                self.cluster.pods.remove(pod)
        summary["pods"] = out
        a, b = list(out.values())
        summary["throughput_ratio_many_vs_1"] = round(
            b["throughput_rps"] / max(1e-9, a["throughput_rps"]), 4)
        summary["c1_p50_many_minus_1_ms"] = round(b["c1_p50_ms"] - a["c1_p50_ms"], 4)

        small, large = s.cache_sizes[0], s.cache_sizes[-1]
        log(f"scale: routers with {small} vs {large} cached sessions (preloaded in process)")
        cached = await self._compare_routers(
            "scale", {f"{small}_cached": {"preload": small}, f"{large}_cached": {"preload": large}})
        summary["cached"] = cached
        summary["cached_method"] = (
            "loadtest.routerhost: the router built as `serve` builds it, near-cache preloaded "
            "with N synthetic sessions before serving; hit traffic on real sessions of pod0")
        a, b = list(cached.values())
        summary["throughput_ratio_large_vs_small_cache"] = round(
            b["throughput_rps"] / max(1e-9, a["throughput_rps"]), 4)
        summary["c1_p50_large_minus_small_cache_ms"] = round(b["c1_p50_ms"] - a["c1_p50_ms"], 4)
        summary["rss_bytes_per_cached_session"] = round(
            (b["rss_bytes"] - a["rss_bytes"]) / max(1, large - small), 1)

    async def _compare_routers(self, scenario: str, variants: dict[str, dict[str, Any]], *,
                               concurrency: int | None = None, c1: bool = True,
                               affinity: dict[str, set[int]] | None = None
                               ) -> dict[str, Any]:
        """Start one router per variant (all at once), then hit sat (+ c1) through each,
        interleaved in rounds; stop them all. `affinity[label]`: CPUs that variant's router
        process tree (workers included) is pinned to."""
        s = self.settings
        requests = [self.hit_request(sid) for sid in self.hit_sids]
        routers: dict[str, Router] = {}
        out: dict[str, Any] = {}
        try:
            for label, kw in variants.items():
                routers[label] = await self.cluster.start_router(name=f"router-{label}", **kw)
                if affinity and label in affinity:
                    pin_tree(routers[label].proc.pid, affinity[label])
            ops: dict[str, Op] = {}
            for label, router in routers.items():
                assert router.client is not None
                await router.client.ready()
                await self.warm_hits(router)
                ops[f"router-{label}"] = send_op(router.client, requests)
            sat = await self.interleaved(scenario, "sat", ops,
                                         concurrency=concurrency or s.concurrency)
            one = (await self.interleaved(scenario, "c1", ops, concurrency=1,
                                          duration=max(0.5, s.duration / 2)) if c1 else {})
            for label, router in routers.items():
                target = f"router-{label}"
                r = sat[target]
                router_cpu = sum(v for k, v in r.cpu_s.items()
                                 if k == f"router:{router.proc.name}")
                out[label] = {"throughput_rps": round(r.throughput, 1),
                              "router_cpu_ms_per_request": round(
                                  router_cpu * 1000.0 / max(1, r.ok), 4),
                              "rps_per_router_core": round(r.ok / max(1e-9, router_cpu), 1),
                              "rss_bytes": router.proc.rss_bytes(),
                              "cpu_split": cpu_split(r),
                              "errors": dict(r.errors)}
                if c1:
                    out[label]["c1_p50_ms"] = one[target].hist.summary()["p50_ms"]
        finally:
            for router in routers.values():
                await self.cluster.stop_router(router)
        return out

    async def warm_hits(self, router: Router) -> None:
        assert router.client is not None
        requests = [payloads.get_session(sid) for sid in self.hit_sids]
        await run_closed("router", "warm-up", get_op(router.client, requests), concurrency=16,
                         duration=60.0, max_ops=len(requests), quiet=True)

    async def scenario_workers(self) -> None:
        """Hit saturation with `--workers 1` vs `--workers N` (N = --workers, default 2)."""
        s = self.settings
        summary: dict[str, Any] = {}
        self.results["workers"] = summary
        support = router_support()
        if self.router is None:
            summary["skipped"] = "router: " + self.skipped.get("router", "")
            return
        if not support.has_flag("--workers"):
            summary["skipped"] = "macp-router serve has no --workers flag"
            return
        n = max(2, s.workers)
        # More in flight than the hop runs: N workers need N x the work queued to show scaling.
        concurrency = s.concurrency * n
        redis_url = self.cluster.redis.url if self.cluster.redis else None
        plan = pinning_plan(n)
        summary["pinning"] = plan
        if plan["router"]:
            log(f"workers: pinning {plan['note']}")
        load_procs = [os.getpid()] + [p.proc.pid for p in self.cluster.pods if p.proc]
        saved = {pid: affinity_of(pid) for pid in load_procs}
        try:
            for pid in load_procs:
                if plan["load"] is not None:
                    pin_tree(pid, set(plan["load"]))
            out = await self._compare_routers(
                "workers",
                {"w1": {"workers": 1, "redis_url": redis_url},
                 f"w{n}": {"workers": n, "redis_url": redis_url}},
                concurrency=concurrency, c1=False,
                affinity={k: set(v) for k, v in plan["router"].items()})
        finally:
            for pid, cpus in saved.items():
                if cpus:
                    pin_tree(pid, cpus)
        out = {"1": out["w1"], str(n): out[f"w{n}"]}
        for k, cores in (("1", plan["router"].get("w1")), (str(n), plan["router"].get(f"w{n}"))):
            out[k]["router_cores"] = sorted(cores) if cores else "unpinned (all)"
            if cores:
                out[k]["rps_per_pinned_router_core"] = round(
                    out[k]["throughput_rps"] / len(cores), 1)
        summary["concurrency"] = concurrency
        summary["workers"] = out
        summary["speedup"] = round(out[str(n)]["throughput_rps"]
                                   / max(1e-9, out["1"]["throughput_rps"]), 4)
        # CPU efficiency per router core: ~1.0 means N workers would scale ~N x given N free
        # cores; on a 2-core machine shared with generator and pods they do not get them.
        summary["efficiency_ratio"] = round(out[str(n)]["rps_per_router_core"]
                                            / max(1e-9, out["1"]["rps_per_router_core"]), 4)
        summary["machine_cpus"] = _cpus()
        # per-core efficiency: throughput per router core actually used (CPU seconds) of N
        # workers vs 1 (1.0 = N workers do N x the work of one on N cores)
        summary["per_core_efficiency"] = summary["efficiency_ratio"]
        summary["note"] = ("generator, pods and router share one machine; the speedup is "
                           "bounded by the cores left over for the router; " + plan["note"])

    async def scenario_overload(self) -> None:
        """1x / 2x / 4x the router's saturation rate, open loop (`loadtest.overload`)."""
        from loadtest.overload import scenario_overload

        await scenario_overload(self)

    async def scenario_store(self) -> None:
        """The location store on one Redis topology (`loadtest.storebench`)."""
        from loadtest.storebench import run_store_scenario

        self.results["store"] = await run_store_scenario(self)

    async def scenario_memory(self) -> None:
        """Router RSS and Redis used_memory before/after the router learns N new sessions."""
        s = self.settings
        summary: dict[str, Any] = {"sessions": s.mem_sessions}
        self.results["memory"] = summary
        from loadtest.benchcache import bench_memory

        summary["near_cache_tracemalloc"] = await asyncio.to_thread(
            bench_memory, min(s.mem_sessions * 10, 100_000))
        if self.router is None:
            summary["router"] = "skipped: " + self.skipped.get("router", "")
            return
        redis = self.cluster.redis
        m0 = await self.router.metrics()
        cached0 = metric_sum(m0, "macp_router_cached_sessions")
        rss0 = self.router.proc.rss_bytes()
        mem0 = int((await redis.info("memory"))["used_memory"]) if redis else 0
        keys0 = await redis.dbsize() if redis else 0
        pods = [self.cluster.pods[i % len(self.cluster.pods)] for i in range(s.mem_sessions)]
        t0 = time.perf_counter()
        await self.create_sessions(pods)
        summary["create_s"] = round(time.perf_counter() - t0, 3)
        learned = await self._wait_cached(cached0 + s.mem_sessions, timeout=60.0)
        summary["learned_via"] = learned
        rss1 = self.router.proc.rss_bytes()
        summary["router_rss_delta_bytes"] = rss1 - rss0
        summary["router_rss_bytes_per_session"] = round((rss1 - rss0) / s.mem_sessions, 1)
        if redis is not None:
            keys1 = await self._wait_redis_keys(redis, keys0 + s.mem_sessions, timeout=30.0)
            mem1 = int((await redis.info("memory"))["used_memory"])
            summary["redis_keys_added"] = keys1 - keys0
            summary["redis_bytes_per_session"] = round((mem1 - mem0) / s.mem_sessions, 1)

    async def _wait_cached(self, target: float, timeout: float) -> str:
        """Wait until the router's `macp_router_cached_sessions` reaches `target`."""
        assert self.router is not None
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            m = await self.router.metrics()
            if not any(k.startswith("macp_router_cached_sessions") for k in m):
                return "unknown: the router exposes no macp_router_cached_sessions"
            if metric_sum(m, "macp_router_cached_sessions") >= target:
                return "watch feed (macp_router_cached_sessions reached the target)"
            await asyncio.sleep(0.1)
        return "timeout: macp_router_cached_sessions did not reach the target"

    @staticmethod
    async def _wait_redis_keys(redis: Any, target: int, timeout: float) -> int:
        deadline = time.perf_counter() + timeout
        keys = await redis.dbsize()
        while keys < target and time.perf_counter() < deadline:
            await asyncio.sleep(0.1)
            keys = await redis.dbsize()
        return int(keys)


def affinity_of(pid: int) -> set[int]:
    try:
        return set(os.sched_getaffinity(pid))
    except OSError:
        return set()


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Pin every thread of `pid` and of its children (router workers) to `cpus` (best
    effort: a process or thread that exited meanwhile is skipped). Threads started later
    inherit the affinity of the thread that starts them."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for thread in proc.threads():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(thread.id, cpus)


def pinning_plan(n: int) -> dict[str, Any]:
    """Which CPUs the load (generator + pods) and each router variant get.

    Load on the first allowed CPU, routers on the others: 1 worker on one CPU, N workers on N
    CPUs when there are N + 1; with fewer, N workers cannot be pinned away from the load and
    run unpinned (said in `note`)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {"load": None, "router": {}, "note": f"impossible: {len(cpus)} CPU"}
    load, rest = cpus[:1], cpus[1:]
    plan: dict[str, Any] = {"load": load, "router": {"w1": rest[:1]}}
    if len(rest) >= n:
        plan["router"][f"w{n}"] = rest[:n]
        plan["note"] = f"generator + pods on CPU {load}, routers on {rest[:n]}"
    else:
        plan["note"] = (f"generator + pods on CPU {load}; w1 router on {rest[:1]}; "
                        f"pinning {n} workers away from the load is impossible with "
                        f"{len(cpus)} CPUs (needs {n + 1}): w{n} runs unpinned on all CPUs")
    return plan


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def cpu_per_request(phases: dict[str, PhaseResult]) -> dict[str, float]:
    """CPU ms per OK request of the process that is the target's own hop."""
    out = {}
    for target, r in phases.items():
        if not r.ok:
            continue
        if target in ("router", "router-b"):  # the leg's own router process (and its workers)
            cpu, name = r.cpu_s.get(f"router:{target}", 0.0), target
        elif target.startswith("router"):
            cpu = sum(v for k, v in r.cpu_s.items() if k.startswith("router:"))
            name = target
        elif target in ("passthrough", "passthrough-sync", "nginx"):
            cpu, name = r.cpu_s.get(target, 0.0), target
        else:
            cpu, name = r.cpu_s.get("pods", 0.0), "pods(direct)"
        out[name] = round(cpu * 1000.0 / r.ok, 4)
    return out


def cpu_split(r: PhaseResult) -> dict[str, float]:
    """Share of the machine's busy CPU time per process group during a phase."""
    busy = r.cpu_s.get("machine_busy", 0.0)
    groups: dict[str, float] = {}
    for k, v in r.cpu_s.items():
        if k == "machine_busy":
            continue
        group = "router" if k.startswith("router:") else k
        groups[group] = groups.get(group, 0.0) + v
    out = {k: round(v, 3) for k, v in groups.items()}
    # everything else on the machine (other users' processes, kernel) in the same window
    out["other"] = round(max(0.0, busy - sum(groups.values())), 3)
    out["machine_busy_s"] = round(busy, 3)
    out["wall_s"] = round(r.duration_s, 3)
    out["cores_busy"] = round(busy / r.duration_s, 3) if r.duration_s else 0.0
    return out
