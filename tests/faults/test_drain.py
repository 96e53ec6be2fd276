"""Draining a pod under traffic: through the admin API and through the `macp-router` CLI.

A drained pod takes no new session while its own sessions keep routing without a single
error; undraining it (admin UndrainPod or `macp-router undrain`) makes it placeable again.
Both directions are exercised through both front ends: admin DrainPod + CLI undrain on pod a,
CLI drain + admin UndrainPod on pod b.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc

from router.v1 import router_pb2
from tests.faults.conftest import (
    LOAD_LIMITS,
    FaultRow,
    Traffic,
    admin_stub,
    client_misroutes,
    eventually,
    final_sweep,
    holders,
    report,
    sessions_by_pod,
    start_sessions,
)


async def cli(*args: str) -> str:
    """Run `macp-router ARGS` (bounded); return its stdout, failing on a non-zero exit."""
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "router.cli", *args],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
    return done.stdout


async def admin_drain(address: str, pod: str, drain: bool) -> router_pb2.PodStatus:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = admin_stub(channel)
        method = stub.DrainPod if drain else stub.UndrainPod
        return (await method(router_pb2.DrainPodRequest(name=pod), timeout=5)).pod


async def test_drain_and_undrain_through_admin_api_and_cli_under_traffic(sim_pods, routers):
    pods = await sim_pods(3, **LOAD_LIMITS)
    router = await routers.start(",".join(f"{p.name}={p.address}" for p in pods))
    initial = await start_sessions(router.address, 30)
    by_name = {pod.name: pod for pod in pods}
    own = {name: set(pod.sessions) for name, pod in by_name.items()}
    assert all(own.values())

    def placed_on(name: str, since: float, until: float = float("inf")) -> set[str]:
        """Sessions on pod `name` whose start was first sent in (since, until) and acked.

        A start is placed when its first attempt reaches the router: a retry of the same sid
        (after a DEADLINE_EXCEEDED the pod may or may not have seen) goes where that attempt's
        reservation is, drained since or not; the reservation wins over a later drain."""
        first: dict[str, float] = {}
        acked: set[str] = set()
        for call in traffic.calls:
            if call.op == "start":
                first[call.sid] = min(first.get(call.sid, call.started), call.started)
                if call.ok:
                    acked.add(call.sid)
        started = {sid for sid in acked if since < first[sid] < until}
        return started & set(by_name[name].sessions)

    def first_placement(name: str, since: float) -> float:
        sids = placed_on(name, since)
        return min(call.ended for call in traffic.calls
                   if call.sid in sids and call.op == "start") - since

    async with Traffic([router.address], initial, workers=6, starts=0.25) as traffic:
        await traffic.hold(0.5)
        # pod a: admin DrainPod, then `macp-router undrain a`.
        status = await admin_drain(router.address, "a", True)
        assert status.draining and status.name == "a"
        drained_a = time.monotonic()
        await traffic.hold(1.0)
        undraining_a = time.monotonic()  # the CLI undrains some time before it returns
        out = await cli("undrain", "a", "--router", router.address)
        assert "pod a: accepting new sessions" in out, out
        undrained_a = time.monotonic()
        await eventually(lambda: placed_on("a", undrained_a), timeout=5,
                         what="a new session placed on a after undrain")
        # pod b: `macp-router drain b`, then admin UndrainPod.
        out = await cli("drain", "b", "--router", router.address)
        assert "pod b: draining: no new sessions" in out and "keep routing" in out, out
        drained_b = time.monotonic()
        await traffic.hold(1.0)
        undraining_b = time.monotonic()
        status = await admin_drain(router.address, "b", False)
        assert not status.draining
        undrained_b = time.monotonic()
        await eventually(lambda: placed_on("b", undrained_b), timeout=5,
                         what="a new session placed on b after UndrainPod")
        await traffic.hold(0.2)

    # While drained: no new session on the pod; its own sessions kept routing, error-free.
    assert not placed_on("a", drained_a, undraining_a)
    assert not placed_on("b", drained_b, undraining_b)
    assert placed_on("c", drained_a, undraining_b)
    for name, since, until in (("a", drained_a, undraining_a), ("b", drained_b, undraining_b)):
        during = [call for call in traffic.on(own[name]) if since < call.started < until]
        assert during and all(call.ok for call in during), traffic.errors(during)
    assert traffic.errors() == {}, traffic.errors()
    held = holders(await sessions_by_pod(pods))
    duplicates = [sid for sid, where in held.items() if len(where) > 1]
    lost = (set(initial) | traffic.acked_starts) - set(held)
    assert not duplicates and not lost and not client_misroutes(traffic, held)
    assert not await final_sweep(router.address, held)
    report(FaultRow(
        fault="drain a (admin DrainPod) / undrain a (CLI); drain b (CLI) / undrain b "
              "(admin UndrainPod)",
        traffic=traffic.describe(),
        errors=traffic.errors(),
        misroutes=f"0 (router stale relocations {router.stale_relocations()})",
        duplicates=len(duplicates),
        lost=len(lost),
        recovery="first new session on a "
                 f"{first_placement('a', undrained_a) * 1000:.0f} ms, on b "
                 f"{first_placement('b', undrained_b) * 1000:.0f} ms after undrain",
    ))
