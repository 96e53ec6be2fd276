"""`serve --workers N`: N router processes sharing one listen port (SO_REUSEPORT).

A Python gRPC hop costs about half a millisecond of CPU per unary call, so one process tops out
near one core. Workers scale it: the kernel spreads incoming connections over N independent
router processes, each with its own near-cache, watch feeds and pod channels, all sharing the
store (use Redis with more than one worker so placements agree across them).

Invariants:
- The supervisor only supervises: it starts the workers as fresh interpreters (never fork after
  gRPC is initialised), forwards SIGTERM/SIGINT to them, and exits when they have all exited,
  with the first non-zero status.
- Worker i serves metrics on the `--metrics-listen` port + i, so every worker can be scraped.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from router.config import RouterConfig, parse_host_port
from router.settings import WORKER_ENV

log = logging.getLogger("macp_router.workers")


def worker_argv(config: RouterConfig, index: int) -> list[str]:
    """The command line of worker `index`: the supervisor's own flags, one worker each."""
    argv = [a for a in sys.argv[1:]]
    cleaned: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers=") or arg.startswith("--metrics-listen"):
            if arg == "--metrics-listen":
                skip = True
            continue
        cleaned.append(arg)
    cleaned += ["--workers", "1"]
    if config.metrics_listen:
        host, port = parse_host_port(config.metrics_listen, "--metrics-listen")
        cleaned += ["--metrics-listen", f"{host}:{port + index if port else 0}"]
    return [sys.executable, "-m", "router.cli", *cleaned]


def run_workers(config: RouterConfig, _serve_one: Callable[[], int] | None = None) -> int:
    """Start `config.workers` worker processes and supervise them until they exit."""
    _, port = parse_host_port(config.listen, "--listen")
    if port == 0:
        print("macp-router serve: error: --workers > 1 needs a fixed --listen port "
              "(the workers share it)", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.pop("MACP_ROUTER_WORKERS", None)
    env.pop("MACP_ROUTER_METRICS_LISTEN", None)
    children: list[subprocess.Popen[bytes]] = []
    for index in range(config.workers):
        env[WORKER_ENV] = str(index)
        children.append(subprocess.Popen(worker_argv(config, index), env=env))
    log.info("started %d workers on %s (pids %s)", len(children), config.listen,
             ", ".join(str(c.pid) for c in children))

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while children:
        for child in list(children):
            code = child.poll()
            if code is None:
                continue
            children.remove(child)
            if code != 0:
                log.error("worker pid %d exited with status %d; stopping the others",
                          child.pid, code)
                status = status or code
                forward(signal.SIGTERM, None)
        time.sleep(0.1)
    return status
