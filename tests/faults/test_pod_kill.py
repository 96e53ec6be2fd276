"""A runtime pod SIGKILLed mid-run and restarted on the same name and port.

Pods and the router are real processes (`macp-router pod --state-file`, `macp-router serve`);
traffic comes from concurrent raw grpc.aio clients. While the pod is down its sessions answer
UNAVAILABLE naming it (retryable), never NOT_FOUND and never re-placed elsewhere; they route
again within 2 s of the pod's readiness; the other pods' sessions see no error at all.
"""

from __future__ import annotations

import time

from tests.faults.conftest import (
    NOT_FOUND_CODES,
    FaultRow,
    Traffic,
    client_misroutes,
    eventually,
    final_sweep,
    holders,
    names_pod,
    pod_sessions,
    report,
    sessions_by_pod,
    start_sessions,
    state_file_sessions,
)

RECOVERY_BOUND_S = 2.0


async def test_pod_killed_and_restarted_under_traffic(pod_procs, routers):
    await pod_procs.start("a", "b", "c")
    router = await routers.start(pod_procs.pod_list())
    initial = await start_sessions(router.address, 30)
    by_pod = await sessions_by_pod(pod_procs.addresses())
    assert all(by_pod[name] for name in "abc"), by_pod  # every pod holds some

    async with Traffic([router.address], initial, workers=6, starts=0.1) as traffic:
        await traffic.hold(1.0)
        # Quiesce starts until b has persisted what it acked: the sim's state file is
        # write-behind, and this test is about routing, not about the pod's durability.
        await traffic.pause_starts()
        on_b = set(await pod_sessions(pod_procs.pods["b"].address))
        await eventually(lambda: on_b <= state_file_sessions(pod_procs.pods["b"].state_file),
                         what="b persisted its sessions")
        pod_procs.kill("b")
        killed_at = time.monotonic()
        traffic.resume_starts()
        await traffic.hold(1.5)
        ready_at = await pod_procs.restart("b")

        # Watch b's own sessions closely from its readiness on (besides the random traffic).
        await traffic.poll(on_b, seconds=RECOVERY_BOUND_S + 0.5)

    by_pod = await sessions_by_pod(pod_procs.addresses())
    held = holders(by_pod)
    b_sessions = by_pod["b"]
    others = set(held) - b_sessions

    # b's sessions while it was down: UNAVAILABLE naming b, retryable; never NOT_FOUND.
    failures = [call for call in traffic.on(b_sessions) if not call.ok]
    assert failures, "no call reached b's sessions while it was down"
    assert min(call.ended for call in failures) >= killed_at
    assert {call.code for call in failures} == {"UNAVAILABLE"}, traffic.errors(failures)
    assert all(names_pod(call.details, "b") and "retry" in call.details
               for call in failures), failures[:3]
    assert not [call for call in traffic.calls if call.code in NOT_FOUND_CODES]
    # Other pods' sessions: zero errors over the whole run.
    assert traffic.errors(traffic.on(others)) == {}
    # Back within the bound after b's readiness, and OK from then on.
    recovered_at = max([ready_at, *(call.ended for call in failures)])
    assert recovered_at - ready_at <= RECOVERY_BOUND_S, recovered_at - ready_at
    late = [call for call in traffic.on(b_sessions) if call.started > recovered_at]
    assert len(late) > len(on_b) and all(call.ok for call in late)
    # Never re-placed: each session on exactly one pod; b kept its own; starts acked while b
    # was down went elsewhere; failed starts are retryable.
    assert on_b <= b_sessions
    duplicates = [sid for sid, pods in held.items() if len(pods) > 1]
    lost = (set(initial) | traffic.acked_starts) - set(held)
    assert not duplicates and not lost, (duplicates, lost)
    while_down = {call.sid for call in traffic.calls
                  if call.op == "start" and call.ok and killed_at < call.started < ready_at}
    assert not while_down & b_sessions
    start_errors = {call.code for call in traffic.calls if call.op == "start" and not call.ok}
    assert start_errors <= {"UNAVAILABLE"}, start_errors
    assert not await final_sweep(router.address, held)

    start_failures = sum(1 for call in traffic.calls if call.op == "start" and not call.ok)
    report(FaultRow(
        fault="pod b SIGKILLed for 1.5 s, restarted (same name/port, state file)",
        traffic=f"{traffic.describe()}; errors: {len(failures)} on b's sessions, "
                f"{start_failures} start attempts placed on b before it was marked down "
                "(retried elsewhere by the client), 0 on a/c sessions",
        errors=traffic.errors(),
        misroutes=f"{len(client_misroutes(traffic, held))} "
                  f"(router stale relocations {router.stale_relocations()})",
        duplicates=len(duplicates),
        lost=len(lost),
        recovery=f"{recovered_at - ready_at:.2f} s after b ready "
                 f"(down {ready_at - killed_at:.1f} s)",
    ))
