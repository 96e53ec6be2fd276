"""What one grpc.aio hop costs per call, piece by piece, in one process (issue 16).

`python -m loadtest hopbench` answers "where could a Python hop save CPU?" with process CPU
time per call (median of `--rounds`), no subprocesses and no network beyond loopback:

- `aio public API`: a raw-bytes unary call from a grpc.aio channel to a grpc.aio echo server in
  the same process; the figure is client side + server side of one call, i.e. about what a hop
  (server for its client, client of its pod) pays per call, minus the forwarding itself.
  Measured on uvloop (what the router runs) and on asyncio's default loop (what the bare hop
  `loadtest.passthrough` runs).
- `cygrpc direct`: the same call made straight on grpc's Cython channel (no grpc.aio `Call`
  object, no asyncio Task per call, no `Metadata` wrapping): what bypassing grpc.aio's Python
  client layer would save. It uses grpc's private internals (`grpc._cython.cygrpc`,
  `grpc.aio._call`), so it is a measurement only; the router does not do this.
- `router's own Python per hit`: the steps the router adds to a Send hit (a `Call`, the envelope
  scan, the near-cache hit counter, metadata filtering, the "not here" check, the request
  metric), without any I/O.

Invariants: loopback only; every call has a deadline; bounded by `--calls` x `--rounds`;
prints one table and returns the figures as a dict.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

ECHO_SERVICE = "loadtest.HopBench"
ECHO_PATH = f"/{ECHO_SERVICE}/Echo"
METADATA = (("authorization", "Bearer hopbench"),)
REQUEST = b"x" * 120  # about the size of the hit Send(Proposal)
DEADLINE_S = 5.0


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


def _cygrpc_caller(channel: grpc.aio.Channel) -> Callable[[], Awaitable[bytes]]:
    """A unary call straight on the Cython channel (private API: measurement only)."""
    from grpc._cython import cygrpc
    from grpc.aio._call import _create_rpc_error

    cy_channel = channel._channel  # type: ignore[attr-defined]
    method = ECHO_PATH.encode()

    async def call() -> bytes:
        cy_call = cy_channel.call(method, time.time() + DEADLINE_S, None, None, 0)
        try:
            response = await cy_call.unary_unary(REQUEST, METADATA,
                                                 cygrpc.build_census_context())
        except asyncio.CancelledError:
            if not cy_call.done():
                cy_call.cancel("cancelled")
            raise
        if not cy_call.is_ok():
            raise _create_rpc_error(cy_call._initial_metadata, cy_call._status)
        return response  # type: ignore[no-any-return]

    return call


async def _grpc_rounds(calls: int, rounds: int, concurrency: int) -> dict[str, float]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        public = channel.unary_unary(ECHO_PATH)

        async def aio_call() -> bytes:
            call = public(REQUEST, metadata=METADATA, timeout=DEADLINE_S)
            response = await call
            await call.trailing_metadata()  # what a hop reads to pass trailers on
            return response  # type: ignore[no-any-return]

        variants = {"aio": aio_call, "cygrpc": _cygrpc_caller(channel)}
        per_worker = max(1, calls // concurrency)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for name, fn in variants.items():  # warm-up: connection, caches
            for _ in range(200):
                if await fn() != REQUEST:
                    raise RuntimeError(f"hopbench: {name} echo returned other bytes")
        for _ in range(rounds):
            for name, fn in variants.items():
                async def worker(fn: Callable[[], Awaitable[bytes]] = fn) -> None:
                    for _ in range(per_worker):
                        await fn()

                started = time.process_time()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                samples[name].append((time.process_time() - started) / (per_worker * concurrency))
        return {name: statistics.median(v) * 1e6 for name, v in samples.items()}
    finally:
        await channel.close()
        await server.stop(None)


def _router_python_us(iterations: int = 20_000) -> dict[str, float]:
    """CPU microseconds per call of the router's own steps on a Send hit (no I/O)."""
    from loadtest import payloads
    from router import routes
    from router.core.call import Call
    from router.macp.backend import forwardable
    from router.metrics import Metrics

    route_table = routes.build_routes()
    send = next(r for r in route_table.values() if r.method == "Send")
    request = payloads.send_proposal(str(uuid.uuid4()), str(uuid.uuid4()))
    metrics = Metrics()
    metrics.add_methods(r.method for r in route_table.values())
    metrics.add_pod("pod0")  # a known pod: its request metric children are cached, as in serve
    hits = metrics.locate.labels("macp", "hit")
    invocation = ((":authority", "127.0.0.1"), ("authorization", "Bearer t"),
                  ("user-agent", "grpc-python"), ("content-type", "application/grpc"),
                  ("te", "trailers"), ("grpc-accept-encoding", "identity,deflate,gzip"))
    answer = b"\n\x12\x08\x01" + b"x" * 60
    finished = Call("macp", "Send", "session", send)
    finished.pod = "pod0"

    def finish() -> None:
        finished.finished = False
        finished.finish(metrics)

    steps: dict[str, Callable[[], object]] = {
        "Call()": lambda: Call("macp", "Send", "session", send),
        "envelope scan (classify_envelope)": lambda: routes.classify_envelope(1, request),
        "near-cache hit counter": hits.inc,
        "metadata filter (forwardable)": lambda: forwardable(invocation),
        "not-here check": lambda: b"SESSION_NOT_FOUND" in answer,
        "Call.finish (request metric)": finish,
    }
    out: dict[str, float] = {}
    for name, step in steps.items():
        started = time.process_time()
        for _ in range(iterations):
            step()
        out[name] = (time.process_time() - started) / iterations * 1e6
    out["total"] = sum(out.values())
    return out


def hop_bench(calls: int = 3200, rounds: int = 5, concurrency: int = 8) -> dict[str, Any]:
    """All figures (CPU microseconds per call); see the module docstring."""
    import uvloop

    result: dict[str, Any] = {
        "calls_per_round": calls, "rounds": rounds, "concurrency": concurrency,
        "uvloop": uvloop.run(_grpc_rounds(calls, rounds, concurrency)),
        "asyncio": asyncio.run(_grpc_rounds(calls, rounds, concurrency)),
        "router_python": _router_python_us(),
    }
    uv = result["uvloop"]
    result["cygrpc_saves_us"] = round(uv["aio"] - uv["cygrpc"], 1)
    result["uvloop_vs_asyncio"] = round(uv["aio"] / result["asyncio"]["aio"], 3)
    result["router_python_share_of_aio_call"] = round(
        result["router_python"]["total"] / uv["aio"], 4)
    return result


def hop_bench_table(r: dict[str, Any]) -> str:
    lines = [f"CPU microseconds per call (median of {r['rounds']} rounds of "
             f"{r['calls_per_round']} calls, {r['concurrency']} in flight; client + server of "
             "one call in one process)"]
    for loop in ("uvloop", "asyncio"):
        lines.append(f"  {loop:8s} aio public API {r[loop]['aio']:7.1f}   "
                     f"cygrpc direct {r[loop]['cygrpc']:7.1f}")
    lines.append(f"  cygrpc direct saves {r['cygrpc_saves_us']} us per call on uvloop; uvloop / "
                 f"asyncio (aio API) {r['uvloop_vs_asyncio']}")
    lines.append("router's own Python per Send hit (no I/O):")
    for name, us in r["router_python"].items():
        lines.append(f"  {name:36s} {us:6.2f}")
    lines.append(f"  = {r['router_python_share_of_aio_call'] * 100:.1f} % of one aio call's "
                 "client + server CPU")
    return "\n".join(lines)
