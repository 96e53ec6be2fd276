"""Benchmark: a client reads every page of ListSessions through the router.

`python -m loadtest.listpaging [--pods 3] [--sessions-per-pod 10000] [--page-size 1000]
[--timeout-s 300]`

Writes each simulated pod's state file with N sessions shaped like real ones
(`loadtest.bigreconcile.synthetic_state`), starts the pods and the router
(`router.app.Router`, defaults except the pod list and token) in this process on 127.0.0.1,
then lists every session page by page with one client channel and measures: the first page's
latency (the fan-out), the whole listing's time, the mean latency of a later page, and how many
ListSessions calls each pod answered for the listing (its own counter). The router pages from
one snapshot per listing, so every pod should answer exactly one.

Prints one figure per line and `RESULT {...}` as JSON; exits 1 when the listing is not every
session exactly once or a pod answered more than one ListSessions. Loopback only; bounded by
--timeout-s. Pods and router share this process (and its CPU): the figures are an upper bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time

import grpc
from macp.v1 import core_pb2, core_pb2_grpc

from loadtest.bigreconcile import synthetic_state
from router.app import Router
from router.config import RouterConfig
from router.pods import PodSpec
from router.sim import SimPod
from router.sim.auth import agent_entry, router_entry

TOKENS = [router_entry("router"), agent_entry("coordinator")]
CLIENT = (("authorization", "Bearer coordinator"),)


async def _measure(tmp: str, pods: int, per_pod: int, page_size: int, timeout_s: float
                   ) -> dict[str, object]:
    sims: list[SimPod] = []
    router: Router | None = None
    try:
        for index in range(pods):
            name = chr(ord("a") + index)
            state = os.path.join(tmp, f"pod-{name}.json")
            synthetic_state(state, name, per_pod)
            pod = SimPod(name, "127.0.0.1:0", state_file=state, auth_tokens=TOKENS,
                         allow_insecure=True)
            await pod.start()
            sims.append(pod)
        router = Router(RouterConfig(
            listen="127.0.0.1:0", token="router",
            pods=tuple(PodSpec(pod.name, pod.address) for pod in sims)))
        await router.start()
        if not await router.wait_ready(timeout_s):
            raise SystemExit("the router's feeds did not come up")
        before = {pod.name: pod.calls["ListSessions"] for pod in sims}
        options = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
        async with grpc.aio.insecure_channel(router.address, options=options) as channel:
            stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
            seen: list[str] = []
            token, pages, first_s = "", 0, 0.0
            started = time.perf_counter()
            while True:
                reply = await stub.ListSessions(
                    core_pb2.ListSessionsRequest(page_size=page_size, page_token=token),
                    metadata=CLIENT, timeout=timeout_s)
                pages += 1
                if pages == 1:
                    first_s = time.perf_counter() - started
                seen.extend(session.session_id for session in reply.sessions)
                token = reply.next_page_token
                if not token:
                    break
            total_s = time.perf_counter() - started
        calls = {pod.name: pod.calls["ListSessions"] - before[pod.name] for pod in sims}
        return {
            "pods": pods, "sessions": len(seen), "unique": len(set(seen)),
            "expected": pods * per_pod, "page_size": page_size, "pages": pages,
            "first_page_s": round(first_s, 3), "all_pages_s": round(total_s, 3),
            "later_page_ms": round((total_s - first_s) / max(1, pages - 1) * 1000, 2),
            "pod_list_calls": calls,
        }
    finally:
        if router is not None:
            await router.stop(grace=0)
        for pod in sims:
            await pod.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.listpaging",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=3)
    parser.add_argument("--sessions-per-pod", type=int, default=10_000)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    if not 1 <= args.pods <= 26:
        parser.error("--pods must be between 1 and 26")
    if not 1 <= args.sessions_per_pod <= 200_000:
        parser.error("--sessions-per-pod must be between 1 and 200000")
    if args.page_size < 1:
        parser.error("--page-size must be at least 1")
    with tempfile.TemporaryDirectory(prefix="listpaging-") as tmp:
        result = asyncio.run(asyncio.wait_for(
            _measure(tmp, args.pods, args.sessions_per_pod, args.page_size, args.timeout_s),
            args.timeout_s * 2))
    print(f"sessions listed:         {result['sessions']} ({result['unique']} unique, "
          f"{result['expected']} on the pods)")
    print(f"pages of {result['page_size']}:          {result['pages']}")
    print(f"first page (fan-out):    {result['first_page_s']} s")
    print(f"whole listing:           {result['all_pages_s']} s")
    print(f"later page, mean:        {result['later_page_ms']} ms")
    print(f"ListSessions per pod:    {result['pod_list_calls']}")
    print("RESULT " + json.dumps(result))
    ok = (result["sessions"] == result["unique"] == result["expected"]
          and all(count == 1 for count in result["pod_list_calls"].values()))  # type: ignore[union-attr]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
