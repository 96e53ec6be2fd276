"""One simulated pod in its own process, with its call counters readable from outside.

`python -m loadtest.podproc --listen 127.0.0.1:PORT --name NAME [--state-file PATH]
[--stats-listen 127.0.0.1:SPORT]` runs `router.sim.SimPod` (the same pod the tests use) and,
with `--stats-listen`, a tiny TCP endpoint: connect, read one JSON line
`{"calls": {method: n}, "sessions": n}`, connection closes. The load test reads it before and
after a phase to count the pod-side calls (probes per miss) without trusting the router's
own metrics. Prints one line containing `ready` when serving; SIGTERM stops it gracefully.

This wraps the pod instead of using `macp-router pod` only to expose the counters; it runs the
pod on the default asyncio loop, as the CLI does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from loadtest import payloads
from router.sim import SimPod, agent_entry, router_entry

ROUTER_TOKEN = "router"  # the token loadtest.cluster gives the router (--token)


async def _serve(args: argparse.Namespace) -> None:
    # Configured as an operator configures a runtime for a load test: token entries for the
    # router (observer, registry rights: what it needs on a real runtime) and the load
    # generator's agents; plaintext on loopback (MACP_ALLOW_INSECURE=1); the per-sender rate
    # limits raised, since the generator is one sender sending far more than the runtime's
    # default 60 starts / 600 messages per minute.
    tokens = [router_entry(ROUTER_TOKEN), *(agent_entry(name) for name in payloads.PARTICIPANTS)]
    pod = SimPod(args.name, args.listen, state_file=args.state_file, auth_tokens=tokens,
                 allow_insecure=True, start_limit_per_minute=1_000_000_000,
                 message_limit_per_minute=1_000_000_000)
    await pod.start()

    async def stats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = {"calls": dict(pod.calls), "sessions": len(pod.sessions)}
        writer.write(json.dumps(body).encode() + b"\n")
        await writer.drain()
        writer.close()

    stats_server: asyncio.Server | None = None
    if args.stats_listen:
        host, _, port = args.stats_listen.rpartition(":")
        stats_server = await asyncio.start_server(stats, host, int(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"podproc {args.name} ready on {pod.address}", flush=True)
    try:
        await stop.wait()
    finally:
        if stats_server is not None:
            stats_server.close()
        await pod.stop(grace=0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.podproc", description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT for the pod's gRPC server")
    parser.add_argument("--name", required=True, help="pod name")
    parser.add_argument("--state-file", default=None, help="persist sessions here (restarts)")
    parser.add_argument("--stats-listen", default=None, help="HOST:PORT for the counters endpoint")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
