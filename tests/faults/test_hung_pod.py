"""A pod that hangs: it accepts connections and never answers a MACP call.

The router (a `macp-router serve` process) probes it on every miss; each probe must time out at
the probe deadline, the pod must be marked unhealthy (left out of probes and placement until it
answers again), and nothing else may wait behind it: calls for the other pods' sessions stay
fast while the probes to the hung pod are timing out (no head-of-line blocking).
"""

from __future__ import annotations

import time
import uuid

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
    names_pod,
    report,
    sessions_by_pod,
    start_sessions,
)

PROBE_TIMEOUT_MS = 250


async def pod_healthy(address: str, name: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await admin_stub(channel).ListPods(router_pb2.ListPodsRequest(), timeout=5)
    return next(pod.healthy for pod in reply.pods if pod.name == name)


async def test_hung_pod_times_out_probes_is_marked_unhealthy_and_blocks_nothing(
    sim_pods, routers
):
    pods = await sim_pods(3, **LOAD_LIMITS)
    b = pods[1]
    router = await routers.start(
        ",".join(f"{p.name}={p.address}" for p in pods),
        "--probe-timeout-ms", str(PROBE_TIMEOUT_MS))
    initial = await start_sessions(router.address, 30)
    on_b = set(b.sessions)
    others = [sid for sid in initial if sid not in on_b]
    assert on_b and others
    nowhere = [str(uuid.uuid4()) for _ in range(500)]  # misses: every pod gets probed

    b.hang = True
    hung_at = time.monotonic()
    hits = Traffic([router.address], others, workers=4, starts=0.0, seed=1)
    misses = Traffic([router.address], nowhere, workers=4, starts=0.0, gets=1.0, seed=2)
    stuck = Traffic([router.address], sorted(on_b), workers=1, starts=0.0, timeout_s=1.0,
                    seed=3)
    async with hits, misses, stuck:
        await eventually(lambda: _not(pod_healthy(router.address, "b")), timeout=5,
                         what="b marked unhealthy")
        marked_at = time.monotonic()
        await misses.hold(PROBE_TIMEOUT_MS / 1000 + 0.1)  # probes sent before the mark end
        probes_to_b = router.metric("macp_router_probes_total", pod="b")
        assert probes_to_b > 0  # the misses before the mark did probe b (timing out)
        # Placement now skips b: new sessions land on a and c only.
        placing = Traffic([router.address], others, workers=2, starts=0.5, seed=4)
        async with placing:
            await placing.hold(1.5)
        probes_to_b = router.metric("macp_router_probes_total", pod="b") - probes_to_b
        b.hang = False
        unhung_at = time.monotonic()
        await eventually(lambda: pod_healthy(router.address, "b"), timeout=5,
                         what="b healthy again once it answers")
        healthy_at = time.monotonic()
        await hits.hold(0.3)

    # Probes to b timed out at the deadline (the first misses waited for it) ...
    first = [call for call in misses.calls if call.started < hung_at + 0.2]
    assert first and all(call.code == "UNAVAILABLE" for call in first)
    slowest = max(call.seconds for call in misses.calls)
    assert PROBE_TIMEOUT_MS / 1000 - 0.02 <= slowest < PROBE_TIMEOUT_MS / 1000 + 0.5, slowest
    # ... every miss while b was hung is UNAVAILABLE naming b, never NOT_FOUND ...
    while_hung = [call for call in misses.calls if call.ended < unhung_at]
    assert all(call.code == "UNAVAILABLE" and names_pod(call.details, "b")
               for call in while_hung), misses.errors(while_hung)
    # ... and once b was marked unhealthy, misses no longer wait for it: the router sends it
    # no probe at all (its /metrics), and the misses answer well within the probe deadline.
    assert probes_to_b == 0, probes_to_b
    after_mark = sorted(call.seconds for call in misses.calls
                        if marked_at + PROBE_TIMEOUT_MS / 1000 < call.started < unhung_at)
    assert after_mark and after_mark[len(after_mark) // 2] < PROBE_TIMEOUT_MS / 1000 / 2
    # Once b answers again, a miss gets the runtime's own not-found (every pod answered).
    answered = [call for call in misses.calls if call.started > healthy_at]
    assert answered and {call.code for call in answered} == {"NOT_FOUND"}
    # No head-of-line blocking: the other pods' sessions stayed fast and error-free.
    assert hits.errors() == {}
    assert max(call.seconds for call in hits.calls) < 1.0
    # b's own sessions: the hung pod's calls hit the client's deadline (nothing else to do).
    assert set(stuck.errors()) <= {"DEADLINE_EXCEEDED"}
    by_pod = await sessions_by_pod(pods)
    held = holders(by_pod)
    assert not placing.acked_starts & by_pod["b"]
    assert placing.errors() == {}
    duplicates = [sid for sid, where in held.items() if len(where) > 1]
    lost = (set(initial) | placing.acked_starts) - set(held)
    assert not duplicates and not lost
    assert not await final_sweep(router.address, held)

    errors: dict[str, int] = {}
    for part in (hits.errors(), misses.errors(while_hung), stuck.errors(), placing.errors()):
        for code, n in part.items():
            errors[code] = errors.get(code, 0) + n
    report(FaultRow(
        fault="pod b hangs (accepts, never answers) for "
              f"{unhung_at - hung_at:.1f} s; probe deadline {PROBE_TIMEOUT_MS} ms",
        traffic=f"hits on a/c sessions: {hits.describe()}; {len(misses.calls)} misses "
                f"(GetSession of unknown sids; {len(while_hung)} while b hung, the rest got "
                f"NOT_FOUND once b answered); {len(stuck.calls)} calls to b's sessions "
                f"(1 s deadline); {len(placing.acked_starts)} starts after b was marked",
        errors=errors,
        misroutes=f"{len(client_misroutes(hits, held))} "
                  f"(router stale relocations {router.stale_relocations()})",
        duplicates=len(duplicates),
        lost=len(lost),
        recovery=f"b unhealthy {marked_at - hung_at:.2f} s after hanging; healthy again "
                 f"{healthy_at - unhung_at:.2f} s after it answers; hits max "
                 f"{max(call.seconds for call in hits.calls) * 1000:.0f} ms",
    ))


async def _not(awaitable) -> bool:  # type: ignore[no-untyped-def]
    return not await awaitable
