"""`python -m loadtest profile`: where the router's CPU goes on a cache hit (py-spy).

Starts one simulated pod, the hit sessions and a router (as `run --scenario hit` does), puts a
closed-loop hit load on the router (`--concurrency` in flight), and records the router process
with `py-spy record --gil` for `--seconds` (raw collapsed stacks of the samples that hold the
GIL, i.e. Python and Cython CPU work, not threads waiting; with native frames when py-spy can
unwind them here, so grpc's Cython layer shows by name). The samples are grouped into buckets by
`bucket()`:

- `metrics`: any frame in prometheus_client (or the router's metrics module),
- `metadata`: a frame whose function or module handles metadata (`*metadata*`),
- `grpc glue`: the leaf frame is in grpc (its Cython `cygrpc` layer, C core, or grpc.aio),
- `asyncio scheduling`: the leaf frame is in asyncio, selectors or the event loop's C parts,
- `router code`: the leaf frame is in `router/`,
- `other`: the rest (protobuf, the interpreter, libc, ...).

The first matching rule wins, in that order. The raw profile (`profile-<stamp>.txt`, py-spy's
collapsed format: one stack per line, `frame;frame;... count`; load it into speedscope or
flamegraph.pl) and a JSON summary are written under `--out`. py-spy samples Python threads
only: CPU spent in grpc's own C-core threads is not in the samples, so the summary also gives
the router's CPU seconds (psutil) over the same window and the share the samples account for.

Invariants: loopback only, bounded (`--seconds` <= 600 and `--max-wall`), every process
started is stopped. py-spy needs ptrace (root, or CAP_SYS_PTRACE / ptrace_scope 0): when it
cannot attach, the command fails with py-spy's own message and what to do.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

BUCKETS = ("grpc glue", "asyncio scheduling", "metadata", "metrics", "router code", "other")
_GRPC = re.compile(r"grpc|cygrpc|__pyx_.*grpc|_cython", re.IGNORECASE)
_ASYNCIO = re.compile(r"asyncio/|selectors\.py|_asyncio|epoll|uvloop|_run_once|select\.",
                      re.IGNORECASE)
_LIBC = re.compile(r"\((libc|libpthread|ld-linux|libm)[.-]|^(syscall|sendmsg|recvmsg|write|read|"
                   r"epoll_wait|__libc_\w+) ")
_ROUTER = re.compile(r"(^|[ (/])router/")


def pyspy_path() -> str | None:
    """The py-spy executable next to this interpreter, or on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """py-spy raw output -> [(frames root..leaf, samples)]."""
    out: list[tuple[list[str], int]] = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        out.append((stack.split(";"), int(count)))
    return out


def bucket(frames: list[str]) -> str:
    """The bucket of one sampled stack (see the module docstring for the rules).

    Without native frames (py-spy could not unwind them), Cython and C code shows as the
    Python frame that called it: a leaf `Runner.run` is the event loop's C code (uvloop) and
    the grpc Cython callbacks it runs, counted as asyncio scheduling; a leaf `Thread.run` is
    a thread running C code (grpc's completion-queue poller), counted as grpc glue."""
    if any("prometheus_client" in f or "router/metrics.py" in f for f in frames):
        return "metrics"
    if any("metadata" in f.split(" (", 1)[0].lower() or "metadata" in f.lower().split("/")[-1]
           for f in frames if not f.startswith(("process ", "thread "))):
        return "metadata"
    real = [f for f in frames if not f.startswith(("process ", "thread "))]
    # a syscall or libc leaf (native frames) belongs to whoever called it
    while len(real) > 1 and _LIBC.search(real[-1]):
        real.pop()
    leaf = real[-1] if real else ""
    if _GRPC.search(leaf):
        return "grpc glue"
    if _ASYNCIO.search(leaf) or leaf.startswith("Runner.run "):
        # without native frames, a sample whose leaf is Runner.run is inside the (uv)loop's
        # C code: scheduling, and the grpc Cython callbacks the loop runs
        return "asyncio scheduling"
    if leaf.startswith("Thread.run "):
        return "grpc glue"  # a thread whose target is C code: grpc's completion-queue poller
    if _ROUTER.search(leaf):
        return "router code"
    return "other"


def summarize(stacks: list[tuple[list[str], int]], top: int = 12) -> dict[str, Any]:
    total = sum(n for _, n in stacks) or 1
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for frames, n in stacks:
        buckets[bucket(frames)] += n
        real = [f for f in frames if not f.startswith(("process ", "thread "))]
        if real:
            leaves[real[-1]] += n
    return {
        "samples": sum(n for _, n in stacks),
        "buckets_pct": {b: round(buckets[b] * 100.0 / total, 1) for b in BUCKETS},
        "top_leaf_frames_pct": {f: round(n * 100.0 / total, 1)
                                for f, n in leaves.most_common(top)},
    }


def summary_table(summary: dict[str, Any]) -> str:
    lines = [f"router CPU on hits by bucket ({summary['samples']} GIL-holding samples of the "
             f"router's Python threads, py-spy {'with' if summary.get('native') else 'without'} "
             "native frames)"]
    for b, pct in summary["buckets_pct"].items():
        lines.append(f"  {b:<20} {pct:5.1f} %")
    cov = summary.get("router_cpu_s")
    if cov is not None:
        lines.append(f"  router CPU over the window: {cov:.2f} s on {summary['wall_s']:.1f} s "
                     f"wall ({summary['router_cores']:.2f} cores); samples cover "
                     f"{summary['sampled_cpu_s']:.2f} s of it (the rest: grpc C-core threads "
                     "and sampling gaps)")
    lines.append("  top leaf frames:")
    for f, pct in summary["top_leaf_frames_pct"].items():
        lines.append(f"    {pct:5.1f} %  {f[:110]}")
    return "\n".join(lines)


def _read_if_written(path: Path) -> str | None:
    if path.exists() and path.stat().st_size:
        return path.read_text(encoding="utf-8", errors="replace")
    return None


async def record(pid: int, seconds: float, out: Path, *, rate: int = 200,
                 native: bool = False) -> tuple[str, bool]:
    """Run `py-spy record` on `pid`; return (collapsed text, whether native frames were on).
    Raises RuntimeError with py-spy's message when it cannot attach."""
    exe = pyspy_path()
    if exe is None:
        raise RuntimeError("py-spy not installed: pip install py-spy (the loadtest extra)")
    errors = []
    for with_native in ((True, False) if native else (False,)):
        # --native pauses the process for every sample (blocking sampling: it slows the
        # router noticeably); it falls back to non-native, non-blocking sampling where
        # py-spy cannot unwind native frames here
        argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                "--rate", str(rate), "--format", "raw", "--output", str(out), "--subprocesses",
                "--gil"]
        if with_native:
            argv.append("--native")
        else:
            argv.append("--nonblocking")
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        text, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
        recorded = await asyncio.to_thread(_read_if_written, out)
        if proc.returncode == 0 and recorded:
            return recorded, with_native
        errors.append(text.decode("utf-8", "replace").strip()[-400:])
    raise RuntimeError("py-spy could not record the router (it needs ptrace: run as root, or "
                       "grant CAP_SYS_PTRACE, or set kernel.yama.ptrace_scope=0): "
                       + " | ".join(errors))


async def profile_router(seconds: float, out_dir: Path, *, concurrency: int = 16,
                         sessions: int = 50, router_args: list[str] | None = None,
                         native: bool = False) -> dict[str, Any]:
    """Hit load on a fresh router while py-spy records it; the summary (also as JSON)."""
    from loadtest.cluster import Cluster
    from loadtest.gen import run_closed
    from loadtest.scenarios import Run, Settings, send_op

    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    settings = Settings(scenarios=["hit"], pods=1, sessions=sessions, concurrency=concurrency,
                        nginx=False, require_router=True, quiet=True, out=out_dir,
                        router_args=list(router_args or []))
    async with Cluster(out_dir / f"logs-{stamp}") as cluster:
        run = Run(settings, cluster)
        await run.setup()
        assert run.router is not None and run.router.client is not None
        requests = [run.hit_request(sid) for sid in run.hit_sids]
        op = send_op(run.router.client, requests)
        raw = out_dir / f"profile-{stamp}.txt"
        proc = run.router.proc
        load = asyncio.create_task(run_closed("router", "profile", op, concurrency=concurrency,
                                              duration=seconds + 3.0, quiet=True))
        try:
            await asyncio.sleep(0.5)  # load running before the first sample
            cpu0, t0 = proc.cpu_seconds(), time.perf_counter()
            text, native = await record(proc.pid, seconds, raw, native=native)
            cpu1, t1 = proc.cpu_seconds(), time.perf_counter()
        except BaseException:
            load.cancel()
            raise
        result = await load
    stacks = parse_collapsed(text)
    summary = summarize(stacks)
    wall = t1 - t0
    summary.update({
        "native": native,
        "seconds": seconds,
        "wall_s": round(wall, 2),
        "router_cpu_s": round(cpu1 - cpu0, 3),
        "router_cores": round((cpu1 - cpu0) / wall, 3) if wall else 0.0,
        "sampled_cpu_s": round(summary["samples"] / 200.0, 3),
        "concurrency": concurrency,
        "router_args": settings.router_args,
        "load_ok_calls": result.ok,
        "load_errors": dict(result.errors),
        "raw_profile": str(raw),
        "raw_format": "py-spy raw (collapsed stacks: 'frame;frame;... count')",
    })
    (out_dir / f"profile-{stamp}.json").write_text(json.dumps(summary, indent=1),
                                                   encoding="utf-8")
    return summary
