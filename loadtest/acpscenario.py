"""The `acp` scenario: ACP agents direct-to-pod vs through the router's ACP front door.

Processes (all loopback, all killed at the end of the scenario, and by the run's `finally`):
`--acp-pods` (3) `macp-router acp-pod` sharing one temporary sessions directory, and one
`macp-router serve --acp-listen ... --acp-pods ... --metrics-listen ...` whose MACP side gets
the run's first MACP pod (`serve` requires `--pods`).

Traffic (the lean client of `loadtest.acpclient` by default, `--acp-client acp` for the stock
one; acp's WebSocket transport by default, `--acp-transport http` for Streamable HTTP):
- `sat`: prompt round trips (session/prompt -> its streamed session/update chunks ->
  `end_turn`), closed loop over K client connections (`--acp-connections`, 16), one prompt in
  flight per connection; `c1`: the same with one connection. Direct: connection i talks to
  pod i mod N, on sessions created there; router: K connections to the router, on sessions
  the router placed. Each leg chunk (the legs alternate in `--rounds`) opens fresh
  connections and sessions, so the pods' per-session history (rewritten to disk after every
  prompt) is as long for both legs.
- `status`: `session/status` at concurrency 1: asked of the pod that holds the session
  (direct), answered by the router from its near-cache (router).
- `miss`: `session/status` through the router, once each, for sessions created directly on
  the pods (the router has never seen them): every call is a probe fan-out. Probes per miss
  come from the router's `/metrics`.
Every op has a deadline (`loadtest.cluster.CALL_TIMEOUT_S`); failures are counted by label
(`loadtest.acpclient`), and a clean run has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.acpclient import (
    CLIENTS,
    AcpLoadConn,
    AcpStockConn,
    check_with_acp_client,
    error_label,
)
from loadtest.cluster import CALL_TIMEOUT_S, Router, acp_support, metric_delta, metric_sum
from loadtest.gen import Op, PhaseResult

if TYPE_CHECKING:
    from loadtest.scenarios import Run

T = CALL_TIMEOUT_S
PROMPT = "hello from the load test"
DEFAULT_CHUNKS = 3  # AcpSimPod's default; the acp-client check reads the real count
Conn = AcpLoadConn | AcpStockConn
NOTE = ("generator, ACP pods, the router (and an idle MACP pod) all run on this machine and "
        "compete for its cores (2 on the reference VM)")


def log(msg: str) -> None:
    from loadtest.scenarios import log as run_log

    run_log(msg)


@dataclass
class ConnPool:
    """K connections (connection i to urls[i mod len]), each with its own sessions."""

    urls: Sequence[str]
    transport: str
    connections: int
    sessions: int
    client: str = "lean"
    conns: list[Conn] = field(default_factory=list)
    free: list[tuple[Conn, list[str]]] = field(default_factory=list)

    async def open(self) -> None:
        async def one(i: int) -> tuple[Conn, list[str]]:
            conn = await CLIENTS[self.client].connect(self.urls[i % len(self.urls)],
                                                      self.transport, timeout=T, name=str(i))
            self.conns.append(conn)
            return conn, [await conn.new_session(T) for _ in range(self.sessions)]

        results = await asyncio.gather(*(one(i) for i in range(self.connections)),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise RuntimeError(f"ACP set-up failed on {self.urls}: {error_label(r)}: {r}")
        self.free = [r for r in results if not isinstance(r, BaseException)]

    def sids(self) -> list[str]:
        return [sid for _, sids in self.free for sid in sids]

    async def close(self) -> None:
        conns, self.conns, self.free = self.conns, [], []
        await asyncio.gather(*(conn.close() for conn in conns))


def prompt_op(pools: dict[str, ConnPool], target: str, chunks: int) -> Op:
    """One prompt on a free connection of the target's current pool (one in flight each)."""

    async def op(i: int) -> str | None:
        free = pools[target].free
        if not free:
            return "NO_FREE_CONNECTION"
        conn, sids = entry = free.pop()
        try:
            await conn.prompt(sids[i % len(sids)], PROMPT, T, chunks)
        except Exception as exc:
            return error_label(exc)
        finally:
            free.append(entry)
        return None

    return op


def status_op(pools: dict[str, ConnPool], target: str) -> Op:
    async def op(i: int) -> str | None:
        conn, sids = pools[target].free[0]
        try:
            status = await conn.status(sids[i % len(sids)], T)
        except Exception as exc:
            return error_label(exc)
        return None if status == "live" else f"STATUS_{status}"

    return op


def _lat(r: PhaseResult) -> dict[str, float]:
    s = r.hist.summary()
    return {k: s[k] for k in ("count", "p50_ms", "p90_ms", "p99_ms", "max_ms")}


def _added(r: PhaseResult, base: PhaseResult) -> dict[str, float]:
    return {f"p{p}": round(r.hist.percentile_ms(p) - base.hist.percentile_ms(p), 4)
            for p in (50, 90, 99)}


def _cpu_ms_per_op(r: PhaseResult, key: Callable[[str], bool]) -> float | None:
    if not r.ok:
        return None
    return round(sum(v for k, v in r.cpu_s.items() if key(k)) * 1000.0 / r.ok, 4)


def _by_label(before: dict[str, float], after: dict[str, float], name: str, label: str,
              **labels: str) -> dict[str, float]:
    """Delta of `name` (filtered by `labels`) grouped by the value of `label`."""
    values: set[str] = set()
    for key in after:
        base, _, rest = key.partition("{")
        if base == name and f'{label}="' in rest:
            values.add(rest.split(f'{label}="', 1)[1].split('"', 1)[0])
    out = {v: metric_delta(before, after, name, **labels, **{label: v}) for v in sorted(values)}
    return {k: v for k, v in out.items() if v}


async def _wait_acp_pods_up(router: Router, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    up = 0.0
    while time.monotonic() < deadline:
        up = metric_sum(await router.metrics(), "macp_router_pod_up", protocol="acp")
        if up >= count:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the router's ACP pods were not all up within {timeout:g}s "
                       f"({up:.0f} of {count})")


async def _settled_probes(router: Router, m0: dict[str, float], pods: int,
                          timeout: float = 3.0) -> dict[str, float]:
    """/metrics once the fan-outs' background probes (first live answer wins) are counted."""
    deadline = time.monotonic() + timeout
    while True:
        m1 = await router.metrics()
        fanouts = metric_delta(m0, m1, "macp_router_probe_fanouts_total", protocol="acp")
        probes = metric_delta(m0, m1, "macp_router_probes_total", protocol="acp")
        if probes >= fanouts * pods or time.monotonic() >= deadline:
            return m1
        await asyncio.sleep(0.05)


async def scenario_acp(run: Run) -> None:
    s, cluster = run.settings, run.cluster
    k = s.acp_connections
    summary: dict[str, Any] = {
        "pods": s.acp_pods, "connections": k, "sessions_per_connection": s.acp_sessions,
        "transport": s.acp_transport,
        "client": ("loadtest.acpclient.AcpLoadConn (lean JSON-RPC)" if s.acp_client == "lean"
                   else "acp.connect_to_agent (the stock acp client)")
        + f" over acp's {'WebSocket' if s.acp_transport == 'ws' else 'Streamable HTTP'} "
        "transport",
        "note": NOTE,
    }
    run.results["acp"] = summary
    reason = acp_support()
    if reason is not None:
        if s.require_router:
            raise RuntimeError(reason)
        summary["skipped"] = reason
        run.skipped["acp"] = reason
        log(f"acp skipped: {reason}")
        return
    errors: dict[str, Counter[str]] = {"direct": Counter(), "router": Counter()}
    router: Router | None = None
    with tempfile.TemporaryDirectory(prefix="macp-loadtest-acp-") as sessions_dir:
        try:
            log(f"acp: starting {s.acp_pods} ACP pods")
            pods = await cluster.start_acp_pods(s.acp_pods, Path(sessions_dir))
            if s.router:
                log("acp: starting a router with --acp-listen (MACP side: "
                    f"{cluster.pods[0].name})")
                router = await cluster.start_router([cluster.pods[0]], name="acp-router",
                                                    acp_pods=pods)
                await _wait_acp_pods_up(router, len(pods))
            else:
                summary["router"] = "skipped: --no-router"
            await _measure(run, summary, errors, [p.url for p in pods], router)
        finally:
            if router is not None:
                await cluster.stop_router(router)
            await cluster.stop_acp_pods()
    summary["errors"] = {t: dict(c) for t, c in errors.items() if c}
    summary["errors_total"] = sum(sum(c.values()) for c in errors.values())


async def _measure(run: Run, summary: dict[str, Any], errors: dict[str, Counter[str]],
                   pod_urls: list[str], router: Router | None) -> None:
    s = run.settings
    targets: dict[str, list[str]] = {"direct": pod_urls}
    if router is not None and router.acp_url:
        targets["router"] = [router.acp_url]
    m_start = await router.metrics() if router is not None else {}

    # A stock acp client, once per target: what is measured below is what it gets.
    check = {t: await check_with_acp_client(urls[0], s.acp_transport, T)
             for t, urls in targets.items()}
    summary["acp_client_check"] = check
    chunks = int(check["direct"]["chunks"]) or DEFAULT_CHUNKS
    summary["chunks_per_prompt"] = chunks
    for t, c in check.items():
        if c["stop_reason"] != "end_turn" or c["chunks"] != chunks or c["status"] != "live":
            raise RuntimeError(f"acp client check via {t} failed: {c}")

    pools: dict[str, ConnPool] = {}
    rotation = {t: 0 for t in targets}

    def fresh(connections: int, sessions: int) -> Callable[[str], Any]:
        @contextlib.asynccontextmanager
        async def around(target: str) -> AsyncIterator[None]:
            urls = targets[target]
            if connections == 1:  # c=1 direct: a different pod each chunk
                urls = [urls[rotation[target] % len(urls)]]
                rotation[target] += 1
            pool = ConnPool(urls, s.acp_transport, connections, sessions, s.acp_client)
            pools[target] = pool
            try:
                await pool.open()
                yield
            finally:
                await pool.close()

        return around

    # -- prompt round trips: saturation (K connections), then concurrency 1 ---------------
    log(f"acp: prompts, {s.acp_connections} connections x {s.acp_sessions} sessions each")
    ops = {t: prompt_op(pools, t, chunks) for t in targets}
    sat = await run.interleaved("acp", "sat", ops, concurrency=s.acp_connections,
                                around=fresh(s.acp_connections, s.acp_sessions))
    one = await run.interleaved("acp", "c1", ops, concurrency=1,
                                duration=max(0.5, s.duration / 2),
                                around=fresh(1, s.acp_sessions))
    prompt: dict[str, Any] = {
        "throughput_rps": {t: round(r.throughput, 1) for t, r in sat.items()},
        "sat_latency_ms": {t: _lat(r) for t, r in sat.items()},
        "c1_latency_ms": {t: _lat(r) for t, r in one.items()},
        "c1_throughput_rps": {t: round(r.throughput, 1) for t, r in one.items()},
        "cpu_split": {t: run_cpu_split(r) for t, r in sat.items()},
        "generator_cpu_ms_per_prompt": {
            t: _cpu_ms_per_op(r, lambda k: k == "generator") for t, r in sat.items()},
        "pods_cpu_ms_per_prompt": {
            t: _cpu_ms_per_op(r, lambda k: k == "acp_pods") for t, r in sat.items()},
    }
    if router is not None:
        key = f"router:{router.proc.name}"
        prompt["router_cpu_ms_per_prompt"] = _cpu_ms_per_op(sat["router"], lambda k: k == key)
        prompt["ratio_router_direct"] = round(
            sat["router"].throughput / max(1e-9, sat["direct"].throughput), 4)
        prompt["added_sat_ms"] = _added(sat["router"], sat["direct"])
        prompt["added_c1_ms"] = _added(one["router"], one["direct"])
    summary["prompt"] = prompt
    for phases in (sat, one):
        for t, r in phases.items():
            errors[t].update(r.errors)

    # -- session/status: the pod's own answer vs the router's near-cache -------------------
    log("acp: session/status at concurrency 1")
    status = await run.interleaved("acp", "status", {t: status_op(pools, t) for t in targets},
                                   concurrency=1, duration=max(0.5, s.duration / 2),
                                   around=fresh(1, 8))
    st: dict[str, Any] = {"latency_ms": {t: _lat(r) for t, r in status.items()}}
    if router is not None:
        st["added_ms"] = _added(status["router"], status["direct"])
    summary["status"] = st
    for t, r in status.items():
        errors[t].update(r.errors)

    if router is not None:
        summary["miss"] = await _miss(run, router, pod_urls, status["direct"], status["router"],
                                      errors)
        m_end = await router.metrics()
        summary["router_requests_by_code"] = _by_label(
            m_start, m_end, "macp_router_requests_total", "code", protocol="acp")


async def _miss(run: Run, router: Router, pod_urls: list[str], direct_status: PhaseResult,
                hit_status: PhaseResult, errors: dict[str, Counter[str]]) -> dict[str, Any]:
    """session/status through the router for sessions only the pods know: probe fan-outs."""
    s = run.settings
    n = s.acp_miss_sessions
    log(f"acp: {n} sessions created directly on the pods, then session/status via the router")
    creators = ConnPool(pod_urls, s.acp_transport, len(pod_urls), 0, s.acp_client)
    reader = ConnPool([router.acp_url or ""], s.acp_transport, 1, 0, s.acp_client)
    try:
        await creators.open()
        await reader.open()
        sids: list[str] = []
        for i in range(n):
            conn = creators.free[i % len(creators.free)][0]
            sids.append(await conn.new_session(T))
        reader.free = [(reader.free[0][0], sids)]
        pools = {"router": reader}
        m0 = await router.metrics()
        miss = await run.phase("acp", "router", "miss", status_op(pools, "router"),
                               concurrency=1, duration=max(30.0, s.duration), max_ops=n)
        m1 = await _settled_probes(router, m0, len(pod_urls))
    finally:
        await creators.close()
        await reader.close()
    errors["router"].update(miss.errors)
    fanouts = metric_delta(m0, m1, "macp_router_probe_fanouts_total", protocol="acp")
    probes = metric_delta(m0, m1, "macp_router_probes_total", protocol="acp")
    locate = {r: metric_delta(m0, m1, "macp_router_locate_total", protocol="acp", result=r)
              for r in ("hit", "store_hit", "probe_hit", "not_found", "negative_hit",
                        "unknown", "stale")}
    calls = miss.ok + miss.error_count
    out: dict[str, Any] = {
        "sessions": n,
        "latency_ms": _lat(miss),
        "direct_status_rtt_ms": _lat(direct_status),
        "errors": dict(miss.errors),
        "fanouts": fanouts,
        "probes": probes,
        "probes_per_miss": round(probes / fanouts, 3) if fanouts else None,
        "probes_per_miss_source": "router /metrics: macp_router_probes_total{protocol=\"acp\"} "
                                  "/ macp_router_probe_fanouts_total{protocol=\"acp\"}",
        "router_locate": locate,
        "real_miss_fraction": round(locate["probe_hit"] / max(1, calls), 4),
        "probe_answers": _by_label(m0, m1, "macp_router_probes_total", "result",
                                   protocol="acp"),
    }
    for p in (50, 99):
        out[f"miss_minus_direct_status_p{p}_ms"] = round(
            miss.hist.percentile_ms(p) - direct_status.hist.percentile_ms(p), 4)
        out[f"miss_minus_router_hit_p{p}_ms"] = round(
            miss.hist.percentile_ms(p) - hit_status.hist.percentile_ms(p), 4)
    return out


def run_cpu_split(r: PhaseResult) -> dict[str, float]:
    from loadtest.scenarios import cpu_split

    return cpu_split(r)
