"""What admission control's numbers rest on: router CPU per refusal vs per forwarded call, and
router memory per open stream. Loopback only; pods and the router are subprocesses.

    python -m loadtest.admissioncost [--seconds 3] [--streams 250,500,1000] [--out DIR]

1. Refusal cost. A router with `--max-inflight-calls 1` in front of one simulated pod: a closed
   loop of cache-hit GetSession at concurrency 1 (nothing is ever refused: CPU per forwarded
   call), then at concurrency 16 (all but one call in flight is refused: the extra CPU over the
   forwarded calls, per refusal). Alternated twice. A refusal that costs nearly what a forwarded
   call costs cannot hold goodput up under a flood of callers that do not back off.
2. Stream memory. A router with the default bounds: N StreamSession subscriptions opened
   through it (in steps), each answered once; router RSS and `macp_router_asyncio_tasks` per
   open stream over the idle baseline. `--max-inflight-streams` is sized from it.

Prints one JSON object per measurement. Bounded: a few seconds per loop, at most the largest
`--streams` streams, every call with a deadline; every process is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from macp.v1 import core_pb2

from loadtest import payloads
from loadtest.cluster import Client, Cluster, Router
from loadtest.overload import PUSHBACK

CALL_TIMEOUT_S = 5.0


async def closed_loop(client: Client, request: bytes, concurrency: int,
                      seconds: float) -> dict[str, int]:
    """GetSession `request` from `concurrency` workers for `seconds`: ok / refused / other."""
    counts = {"ok": 0, "refused": 0, "other": 0}
    end = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < end:
            try:
                await client.get_session(request, metadata=payloads.METADATA,
                                         timeout=CALL_TIMEOUT_S)
                counts["ok"] += 1
            except grpc.aio.AioRpcError as exc:
                pushback = any(k == PUSHBACK for k, _ in (exc.trailing_metadata() or ()))
                counts["refused" if pushback else "other"] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


async def start_session(client: Client) -> str:
    sid = payloads.new_id()
    reply = await client.send(payloads.send_start(sid), metadata=payloads.METADATA,
                              timeout=CALL_TIMEOUT_S)
    error = payloads.ack_error(reply)
    if error:
        raise RuntimeError(f"SessionStart through the router failed: {error}")
    return sid


async def refusal_cost(cluster: Cluster, seconds: float) -> list[dict[str, Any]]:
    router = await cluster.start_router(name="router-bound1",
                                        extra_args=["--max-inflight-calls", "1"])
    client = router.client
    assert client is not None
    await client.ready()
    request = payloads.get_session(await start_session(client))
    await closed_loop(client, request, 1, 1.0)  # warm-up: channels, caches
    rows: list[dict[str, Any]] = []
    per_ok_us = 0.0
    for concurrency in (1, 16, 1, 16):
        cpu0, t0 = router.proc.cpu_seconds(), time.monotonic()
        counts = await closed_loop(client, request, concurrency, seconds)
        cpu, took = router.proc.cpu_seconds() - cpu0, time.monotonic() - t0
        row: dict[str, Any] = {"measure": "refusal_cost", "concurrency": concurrency, **counts,
                               "seconds": round(took, 2), "router_cpu_s": round(cpu, 3)}
        if concurrency == 1 and counts["ok"]:
            per_ok_us = cpu / counts["ok"] * 1e6
            row["router_cpu_us_per_forwarded_call"] = round(per_ok_us, 1)
        elif counts["refused"]:
            extra = cpu - counts["ok"] * per_ok_us / 1e6
            row["router_cpu_us_per_refusal"] = round(extra / counts["refused"] * 1e6, 1)
            row["refusal_vs_forwarded"] = round(extra / counts["refused"] * 1e6 / per_ok_us, 2)
        rows.append(row)
    return rows


async def tasks_of(router: Router) -> float:
    return (await router.metrics()).get("macp_router_asyncio_tasks", float("nan"))


async def stream_memory(cluster: Cluster, steps: list[int]) -> list[dict[str, Any]]:
    router = await cluster.start_router(name="router-streams")
    client = router.client
    assert client is not None
    await client.ready()
    sid = await start_session(client)
    subscribe = core_pb2.StreamSessionRequest(subscribe_session_id=sid).SerializeToString()
    await asyncio.sleep(1.0)  # let start-up garbage settle before the baseline
    base_rss, base_tasks = router.proc.rss_bytes(), await tasks_of(router)
    # A connection of its own per 200 streams (the router allows 256 per client connection;
    # channels to one address would otherwise share a single connection).
    channels = [grpc.aio.insecure_channel(router.address,
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(max(1, max(steps) // 200 + 1))]
    opens = [channel.stream_stream(payloads.path("StreamSession")) for channel in channels]
    streams: list[Any] = []
    rows: list[dict[str, Any]] = [{"measure": "stream_memory_baseline",
                                   "router_rss_mib": round(base_rss / 2**20, 1),
                                   "router_tasks": base_tasks}]
    try:
        for target in steps:
            opened = []
            while len(streams) < target:
                call = opens[len(streams) % len(opens)](metadata=payloads.METADATA,
                                                        timeout=120.0)
                await call.write(subscribe)
                streams.append(call)
                opened.append(call)
            first = await asyncio.wait_for(asyncio.gather(*(c.read() for c in opened)), 60.0)
            if any(not isinstance(raw, bytes) for raw in first):
                raise RuntimeError("a subscription ended before its first message")
            await asyncio.sleep(1.0)
            rss, tasks = router.proc.rss_bytes(), await tasks_of(router)
            rows.append({"measure": "stream_memory", "open_streams": target,
                         "router_rss_mib": round(rss / 2**20, 1),
                         "rss_kib_per_stream": round((rss - base_rss) / target / 1024, 1),
                         "tasks_per_stream": round((tasks - base_tasks) / target, 2)})
    finally:
        for call in streams:
            call.cancel()
        for channel in channels:
            await channel.close()
    return rows


async def main_async(args: argparse.Namespace) -> None:
    out = Path(args.out or tempfile.mkdtemp(prefix="admissioncost-"))
    async with Cluster(out) as cluster:
        await cluster.start_pods(1)
        for row in await refusal_cost(cluster, args.seconds):
            print(json.dumps(row), flush=True)
        for row in await stream_memory(cluster, args.streams):
            print(json.dumps(row), flush=True)
    print(f"logs: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.admissioncost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="seconds per closed loop of the refusal-cost measure (3)")
    parser.add_argument("--streams", type=lambda t: sorted(int(x) for x in t.split(",")),
                        default=[250, 500, 1000],
                        help="open streams at each step of the memory measure (250,500,1000)")
    parser.add_argument("--out", help="log directory (default: a new temporary one)")
    args = parser.parse_args()
    if not 0.5 <= args.seconds <= 30 or not args.streams or not 1 <= max(args.streams) <= 5000:
        raise SystemExit("--seconds in [0.5, 30], --streams between 1 and 5000")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
