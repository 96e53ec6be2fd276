"""Benchmark: one pod holding N sessions answers ListSessions in ONE reply (runtime v0.6.1).

`python -m loadtest.bigreconcile [--sessions 100000] [--terminal 0.2] [--timeout-s 300]`

Writes a simulated pod's state file with N sessions (a share of them terminal, as the runtime
keeps terminal sessions in memory for MACP_SESSION_RETENTION_SECS), starts that pod in its own
process (`loadtest.podproc`), then starts the router in this process and measures:
- the size of the pod's unpaged ListSessions reply;
- feed reconcile time: router start until the pod's watch feed is up (snapshot applied and the
  ListSessions reconcile done), every session in the near-cache;
- the router process's peak RSS during that (VmHWM, reset first through /proc/self/clear_refs)
  and its RSS after, against the RSS before the router started;
- that a limit below the reply (`--max-list-bytes`) is one clear log line naming the pod and the
  flag, within seconds, and the router stays up.
Prints one figure per line and `RESULT {...}` as JSON. Loopback only; bounded by --timeout-s.

Invariant: nothing here is faked on the router side: the pod is the simulated runtime over real
gRPC, the router is `router.app.Router` with its defaults except the pod list and token.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid

import grpc
from macp.v1 import core_pb2, envelope_pb2

from loadtest.ports import free_port
from router.app import Router
from router.config import RouterConfig
from router.pods import PodSpec

MODE = "macp.mode.decision.v1"


def synthetic_state(path: str, pod_name: str, count: int, terminal_share: float = 0.2) -> None:
    """A simulated pod's state file holding `count` sessions shaped like real ones."""
    now = int(time.time() * 1000)
    terminal_every = int(1 / terminal_share) if terminal_share > 0 else 0
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"version": 1, "name": pod_name})[:-1] + ',"sessions":[')
        for index in range(count):
            sid = str(uuid.uuid4())
            state = envelope_pb2.SESSION_STATE_OPEN
            if terminal_every and index % terminal_every == 0:
                state = envelope_pb2.SESSION_STATE_RESOLVED
            meta = core_pb2.SessionMetadata(
                session_id=sid, mode=MODE, state=state, started_at_unix_ms=now - index,
                expires_at_unix_ms=now + 3_600_000, mode_version="1.0.0",
                configuration_version="config.default", policy_version="policy.default",
                participants=["agent://coordinator", f"agent://planning/reviewer-{index % 97}",
                              f"agent://planning/critic-{index % 89}",
                              f"agent://execution/worker-{index % 83}"],
                initiator="agent://coordinator", context_id=str(uuid.uuid4()),
                extension_keys=["ext.audit.v1"],
            )
            item = {"session_id": sid, "state": envelope_pb2.SessionState.Name(state),
                    "metadata": base64.b64encode(meta.SerializeToString()).decode(),
                    "seen": [], "log": []}
            handle.write(("," if index else "") + json.dumps(item, separators=(",", ":")))
        handle.write("]}")


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


async def _list_reply_bytes(address: str) -> int:
    options = [("grpc.max_receive_message_length", 1024 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call = channel.unary_unary("/macp.v1.MACPRuntimeService/ListSessions")
        raw = await call(b"", metadata=(("authorization", "Bearer router"),), timeout=120)
        return len(raw)


async def _measure(address: str, sessions: int, timeout_s: float) -> dict[str, object]:
    reply_bytes = await _list_reply_bytes(address)
    rss_before = _status_kib("VmRSS")
    peak_reset = _reset_peak_rss()
    config = RouterConfig(listen="127.0.0.1:0", pods=(PodSpec("a", address),), token="router",
                          health_interval_ms=500)
    started = time.perf_counter()
    router = Router(config)
    await router.start()
    try:
        ready = await router.wait_ready(timeout_s)
        reconcile_s = time.perf_counter() - started
        cached = len(router.locator.near)
        peak = _status_kib("VmHWM")
        rss_after = _status_kib("VmRSS")
    finally:
        await router.stop(grace=0)

    # The same pod behind a limit below its reply: one clear log line, no hang, no crash.
    records: list[str] = []
    logged = asyncio.Event()
    loop = asyncio.get_running_loop()

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())
            if "--max-list-bytes" in records[-1]:
                loop.call_soon_threadsafe(logged.set)

    catcher = Catch(logging.ERROR)
    logging.getLogger("macp_router").addHandler(catcher)
    limit = max(1024 * 1024, reply_bytes // 2)
    small = Router(RouterConfig(listen="127.0.0.1:0", pods=(PodSpec("a", address),),
                                token="router", health_interval_ms=500, max_list_bytes=limit))
    over_started = time.perf_counter()
    await small.start()
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(logged.wait(), 60)
        over_limit_s = time.perf_counter() - over_started
        line = next((r for r in records if "--max-list-bytes" in r), "")
        placeable = small.pods.get("a").placeable  # type: ignore[union-attr]
    finally:
        await small.stop(grace=0)
        logging.getLogger("macp_router").removeHandler(catcher)
    return {
        "sessions": sessions, "list_reply_bytes": reply_bytes, "feed_ready": ready,
        "reconcile_s": round(reconcile_s, 2), "cached_sessions": cached,
        "rss_before_mib": round(rss_before / 1024, 1),
        "peak_rss_mib": round(peak / 1024, 1) if peak_reset else None,
        "rss_after_mib": round(rss_after / 1024, 1),
        "over_limit": {"max_list_bytes": limit, "logged_after_s": round(over_limit_s, 2),
                       "line": line, "pod_placeable": placeable},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bigreconcile",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--terminal", type=float, default=0.2,
                        help="share of terminal sessions in the pod's memory")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 1_000_000:
        parser.error("--sessions must be between 1 and 1000000")
    with tempfile.TemporaryDirectory(prefix="bigreconcile-") as tmp:
        state = os.path.join(tmp, "pod-a.json")
        synthetic_state(state, "a", args.sessions, args.terminal)
        port = free_port()
        pod = subprocess.Popen(
            [sys.executable, "-m", "loadtest.podproc", "--listen", f"127.0.0.1:{port}",
             "--name", "a", "--state-file", state],
            stdout=subprocess.PIPE, text=True)
        try:
            assert pod.stdout is not None
            deadline = time.monotonic() + args.timeout_s
            while "ready" not in (pod.stdout.readline() or "ready"):
                if time.monotonic() > deadline:
                    raise SystemExit("the pod did not become ready")
            if pod.poll() is not None:
                raise SystemExit(f"the pod exited with {pod.returncode}")
            result = asyncio.run(asyncio.wait_for(
                _measure(f"127.0.0.1:{port}", args.sessions, args.timeout_s),
                args.timeout_s * 2))
        finally:
            pod.terminate()
            try:
                pod.wait(10)
            except subprocess.TimeoutExpired:
                pod.kill()
    print(f"sessions on the pod:            {result['sessions']}")
    print(f"ListSessions reply:             {result['list_reply_bytes'] / 2**20:.1f} MiB")
    print(f"feed up and reconciled after:   {result['reconcile_s']} s "
          f"({result['cached_sessions']} sessions cached)")
    print(f"router RSS before / peak / after: {result['rss_before_mib']} / "
          f"{result['peak_rss_mib']} / {result['rss_after_mib']} MiB")
    over = result["over_limit"]
    print(f"limit {over['max_list_bytes']} B: logged after {over['logged_after_s']} s, "  # type: ignore[index]
          f"pod placeable={over['pod_placeable']}: {over['line']}")  # type: ignore[index]
    print("RESULT " + json.dumps(result))
    return 0 if result["feed_ready"] and result["cached_sessions"] == args.sessions else 1


if __name__ == "__main__":
    raise SystemExit(main())
