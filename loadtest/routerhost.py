"""The router in process, its near-cache preloaded with N synthetic sessions (the 1M case).

`python -m loadtest.routerhost --preload 1000000 serve --listen ... --pods ...` builds the
router exactly as `macp-router serve` does (same argument parser, same config), fills its
near-cache with N random session ids spread over the configured pods *before* it starts
serving, then serves like the CLI (uvloop when installed) and prints a `ready` line. Creating
1M real sessions on simulated pods would take minutes and gigabytes; the hit path only reads
the near-cache dict, so a preloaded dict of the same size is what "1M cached sessions" costs it.

The two functions touching router internals are `build_router` and `preload`; fix them here if
the router's API changes.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time
import uuid
from typing import Any

MAX_PRELOAD = 5_000_000


def build_router(serve_argv: list[str]) -> Any:
    """A `router.app.Router` configured from `macp-router serve` arguments."""
    from router import cli
    from router.app import Router
    from router.config import config_from_options

    args = cli.build_parser().parse_args(serve_argv)
    return Router(config_from_options(vars(args)))


def preload(router: Any, n: int, seed: int = 1) -> float:
    """Put `n` synthetic open sessions into the router's near-cache; returns seconds taken.

    They name pods that are not configured (`synthetic0..7`): a feed's start-up reconcile
    drops entries of *its* pod that the pod does not list, which would empty the preload.
    """
    from router.store import OPEN

    pods = [f"synthetic{i}" for i in range(8)]
    rnd = random.Random(seed)
    near = router.locator.near
    t0 = time.perf_counter()
    for i in range(n):
        near.set(str(uuid.UUID(int=rnd.getrandbits(128), version=4)), pods[i % len(pods)], OPEN)
    return time.perf_counter() - t0


async def _serve(preload_n: int, serve_argv: list[str]) -> None:
    router = build_router(serve_argv)
    took = preload(router, preload_n)
    await router.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"routerhost ready on {router.address}: near-cache preloaded with {preload_n} "
          f"sessions in {took:.2f}s", flush=True)
    try:
        await stop.wait()
    finally:
        await router.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.routerhost", description=__doc__)
    parser.add_argument("--preload", type=int, default=0, help="synthetic cached sessions")
    parser.add_argument("serve", nargs=argparse.REMAINDER,
                        help="`serve` and its arguments, as for macp-router")
    args = parser.parse_args(argv)
    if not 0 <= args.preload <= MAX_PRELOAD:
        parser.error(f"--preload must be in [0, {MAX_PRELOAD}]")
    if not args.serve or args.serve[0] != "serve":
        parser.error("expected: serve --listen HOST:PORT --pods ...")
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args.preload, args.serve))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(args.preload, args.serve))
    return 0


if __name__ == "__main__":
    sys.exit(main())
