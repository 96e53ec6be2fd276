"""SIGTERM to a `macp-router serve` process while streams are open and unary calls in flight.

Expected: no new call is accepted, in-flight unary calls finish with their pod's
answer, every open stream (WatchSessions, StreamSession both ways) ends with a clean, retryable
status the router chose (UNAVAILABLE saying it is shutting down) instead of being held until the
grace period runs out, and the process exits 0 within `--shutdown-grace-s`.
"""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
from macp.v1 import core_pb2

from router.sim import SimPod
from tests import macp_calls
from tests.faults.conftest import (
    LOAD_LIMITS,
    FaultRow,
    Traffic,
    eventually,
    holders,
    report,
    sessions_by_pod,
    start_sessions,
)
from tests.pod_auth import pod_options

GRACE_S = 4.0
SLOW_S = 1.0


class SlowPod(SimPod):
    """A pod whose MACP calls take SLOW_S while `hang` is set (then answer normally)."""

    async def _hang_forever(self) -> None:
        await asyncio.sleep(SLOW_S)


async def read_until_end(call) -> tuple[str, str, float]:  # type: ignore[no-untyped-def]
    """Read a stream to its end: (code name, details, time it ended)."""
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
        code, details = (await call.code()).name, await call.details()
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code().name, exc.details() or ""
    return code, details, time.monotonic()


async def test_sigterm_finishes_unary_calls_ends_streams_cleanly_and_exits_within_grace(
    routers,
):
    pods = [SlowPod(name, "127.0.0.1:0", **pod_options(**LOAD_LIMITS)) for name in ("a", "b")]
    for pod in pods:
        await pod.start()
    try:
        router = await routers.start(",".join(f"{p.name}={p.address}" for p in pods),
                                     "--shutdown-grace-s", str(GRACE_S))
        sids = await start_sessions(router.address, 8)
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = macp_calls.stub(channel)
            watch = stub.WatchSessions(core_pb2.WatchSessionsRequest(),
                                       metadata=macp_calls.METADATA, timeout=30)
            await watch.read()  # the snapshot is flowing
            talk = stub.StreamSession(metadata=macp_calls.METADATA, timeout=30)
            await talk.write(core_pb2.StreamSessionRequest(
                envelope=macp_calls.proposal_envelope(sids[0])))
            assert (await talk.read()).envelope.message_type == "Proposal"
            listen = stub.StreamSession(metadata=macp_calls.METADATA, timeout=30)
            await listen.write(core_pb2.StreamSessionRequest(subscribe_session_id=sids[1]))
            assert (await listen.read()).envelope.message_type == "SessionStart"
            streams = [asyncio.ensure_future(read_until_end(call))
                       for call in (watch, talk, listen)]

            traffic = Traffic([router.address], sids[2:], workers=4, starts=0.1,
                              start_retry_s=0.5)
            async with traffic:
                await traffic.hold(0.5)
                for pod in pods:
                    pod.hang = True  # every call now takes SLOW_S at the pod
                in_flight = [asyncio.ensure_future(macp_calls.get_session(channel, sid))
                             for sid in sids]
                in_flight += [asyncio.ensure_future(macp_calls.send(
                    channel, macp_calls.proposal_envelope(sid))) for sid in sids]
                await asyncio.sleep(0.3)  # they have reached the pods
                router.process.proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(0.2)  # let the router stop listening
                try:
                    await macp_calls.get_session(channel, sids[0])
                    refused = ""
                except grpc.aio.AioRpcError as exc:
                    refused = exc.code().name
                await traffic.stop()
            answers = await asyncio.gather(*in_flight, return_exceptions=True)
            ended = await asyncio.gather(*streams)
            code = await asyncio.to_thread(router.process.proc.wait, GRACE_S + 10)
            exited = time.monotonic()
        for pod in pods:
            pod.hang = False
        # The router ended its upstream streams: nothing is left running on the pods (no
        # session stream bound, no WatchSessions subscriber).
        await eventually(lambda: all(not record.subs for p in pods
                                     for record in p.sessions.values())
                         and all(p.watcher_count == 0 for p in pods),
                         what="the pods released the relayed streams")
    finally:
        for pod in pods:
            await pod.stop()

    assert refused == "UNAVAILABLE"  # no new call after SIGTERM
    errors = [a for a in answers if isinstance(a, BaseException)]
    assert not errors, errors[:3]  # every in-flight unary call got its pod's answer
    assert all(getattr(a, "ok", True) for a in answers)
    for name, (status, details, at) in zip(("WatchSessions", "StreamSession (send)",
                                            "StreamSession (subscribe)"), ended, strict=True):
        assert status == "UNAVAILABLE" and "shutting down" in details, (name, status, details)
        assert at - signalled < 1.0, (name, at - signalled)  # ended at once, not at the grace
    assert code == 0, router.process.output()[-2000:]
    assert exited - signalled < GRACE_S, exited - signalled
    # Calls during the shutdown were refused, not misrouted; nothing placed twice.
    held = holders(await sessions_by_pod(pods))
    assert not [sid for sid, where in held.items() if len(where) > 1]
    assert not (set(sids) | traffic.acked_starts) - set(held)
    refused_calls = [call for call in traffic.calls if not call.ok]
    assert {call.code for call in refused_calls} <= {"UNAVAILABLE"}
    report(FaultRow(
        fault=f"SIGTERM with 3 streams open and {len(in_flight)} unary calls in flight "
              f"(pods answer in {SLOW_S:.0f} s); --shutdown-grace-s {GRACE_S:.0f}",
        traffic=traffic.describe(),
        errors=traffic.errors(),
        misroutes="0",
        duplicates=0,
        lost=0,
        recovery=f"in-flight calls answered OK; streams ended UNAVAILABLE "
                 f"{max(at for _, _, at in ended) - signalled:.2f} s after SIGTERM; "
                 f"exit 0 after {exited - signalled:.2f} s",
    ))
