"""The load generator: closed-loop (N in flight) and open-loop (fixed rate) phases on asyncio.

An *op* is `async (i) -> None | error-code`: one logical request (a unary call, or a whole
stream). The generator times it, records successful latencies in an HDR histogram and counts
failures by code (`grpc.StatusCode` name, `ACK_<registry code>` for Send rejections,
`TIMEOUT`). Every phase is bounded by its duration (and optionally an op count), and prints one
progress line per second to stderr.

- Closed loop: `concurrency` workers each issue the next op as soon as the previous finished;
  measures saturation throughput and latency under a fixed number of requests in flight.
- Open loop: ops are *scheduled* at `rate` per second regardless of completions, and latency is
  measured from the scheduled start (no coordinated omission: a stall shows up as latency of
  every op that should have started during it). In-flight ops are capped (`max_in_flight`);
  ops beyond the cap are counted as `SKIPPED_OVERLOAD`, not silently dropped. So the
  generator's own memory stays flat however slow the target gets. It also reports how far
  behind its schedule it fell (`schedule_lag_ms`: the delay between an op's scheduled start
  and the moment the generator actually started it) and how often the cap was hit
  (`in_flight_bound_hits`): a generator that cannot keep up says so instead of quietly
  offering less load than asked.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from loadtest.hist import LatencyHistogram

Op = Callable[[int], Awaitable[str | None]]


@dataclass
class PhaseResult:
    """What one phase measured against one target."""

    target: str
    phase: str
    mode: str  # "closed" | "open"
    concurrency: int | None = None
    rate: float | None = None
    duration_s: float = 0.0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    hist: LatencyHistogram = field(default_factory=LatencyHistogram)
    bin_s: float = 1.0  # width of the ok_per_s / err_per_s bins (counts per bin)
    ok_per_s: list[int] = field(default_factory=list)
    err_per_s: list[int] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "phase": self.phase,
            "mode": self.mode,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "duration_s": round(self.duration_s, 3),
            "ok": self.ok,
            "errors": dict(self.errors),
            "throughput_rps": round(self.throughput, 1),
            "latency": self.hist.summary(),
            "latency_curve": self.hist.curve(),
            "bin_s": self.bin_s,
            "ok_per_s": self.ok_per_s,
            "err_per_s": self.err_per_s,
            "cpu_s": {k: round(v, 4) for k, v in self.cpu_s.items()},
            **self.extra,
        }


def error_code(exc: BaseException) -> str:
    """Short error label for a failed op."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, TimeoutError):
        return "TIMEOUT"
    return type(exc).__name__


class _Progress:
    """Per-second counters and the once-a-second progress line."""

    def __init__(self, result: PhaseResult, start: float, quiet: bool) -> None:
        self.result = result
        self.start = start
        self.quiet = quiet
        self.in_flight = 0

    def ok(self, now: float, latency: float) -> None:
        r = self.result
        r.ok += 1
        r.hist.record(latency)
        sec = int((now - self.start) / r.bin_s)
        while len(r.ok_per_s) <= sec:
            r.ok_per_s.append(0)
            r.err_per_s.append(0)
        r.ok_per_s[sec] += 1

    def err(self, now: float, code: str) -> None:
        r = self.result
        r.errors[code] += 1
        at = round(now - self.start, 3)
        r.extra.setdefault("first_error_at_s", at)
        r.extra["last_error_at_s"] = at
        sec = int((now - self.start) / r.bin_s)
        while len(r.err_per_s) <= sec:
            r.ok_per_s.append(0)
            r.err_per_s.append(0)
        r.err_per_s[sec] += 1

    async def run(self) -> None:
        last_ok = 0
        while True:
            await asyncio.sleep(1.0)
            r = self.result
            if self.quiet:
                continue
            elapsed = time.perf_counter() - self.start
            errs = " ".join(f"{k}={v}" for k, v in r.errors.most_common(3)) or "0"
            print(
                f"[{r.target}/{r.phase}] {elapsed:5.1f}s ok={r.ok} ({r.ok - last_ok}/s) "
                f"err={errs} p50={r.hist.percentile_ms(50):.2f}ms "
                f"p99={r.hist.percentile_ms(99):.2f}ms in_flight={self.in_flight}",
                file=sys.stderr,
                flush=True,
            )
            last_ok = r.ok


async def run_closed(
    target: str,
    phase: str,
    op: Op,
    *,
    concurrency: int,
    duration: float,
    max_ops: int | None = None,
    quiet: bool = False,
) -> PhaseResult:
    """`concurrency` workers issue ops back to back for `duration` s (or `max_ops` ops)."""
    result = PhaseResult(target=target, phase=phase, mode="closed", concurrency=concurrency)
    start = time.perf_counter()
    end = start + duration
    progress = _Progress(result, start, quiet)
    counter = iter(range(max_ops if max_ops is not None else sys.maxsize))
    perf = time.perf_counter

    async def worker() -> None:
        progress.in_flight += 1
        try:
            for i in counter:
                t0 = perf()
                if t0 >= end:
                    return
                try:
                    code = await op(i)
                except (grpc.aio.AioRpcError, TimeoutError) as exc:
                    code = error_code(exc)
                t1 = perf()
                if code is None:
                    progress.ok(t1, t1 - t0)
                else:
                    progress.err(t1, code)
        finally:
            progress.in_flight -= 1

    ticker = asyncio.create_task(progress.run())
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        ticker.cancel()
    result.duration_s = time.perf_counter() - start
    return result


async def run_open(
    target: str,
    phase: str,
    op: Op,
    *,
    rate: float,
    duration: float,
    max_in_flight: int = 2000,
    drain_timeout: float = 10.0,
    bin_s: float = 1.0,
    quiet: bool = False,
) -> PhaseResult:
    """Schedule ops at `rate`/s for `duration` s; latency counts from each op's scheduled start."""
    result = PhaseResult(target=target, phase=phase, mode="open", rate=rate, bin_s=bin_s)
    start = time.perf_counter()
    end = start + duration
    progress = _Progress(result, start, quiet)
    perf = time.perf_counter
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, scheduled: float) -> None:
        # counted in flight from its creation (below), so a burst of catch-up arrivals cannot
        # create more tasks than the bound before any of them has started
        try:
            code = await op(i)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            code = error_code(exc)
        finally:
            progress.in_flight -= 1
        now = perf()
        if code is None:
            progress.ok(now, now - scheduled)
        else:
            progress.err(now, code)

    ticker = asyncio.create_task(progress.run())
    i = 0
    lag_max = lag_sum = 0.0
    bound_hits = peak = 0
    try:
        while True:
            now = perf()
            if now >= end:
                break
            due = min(int((now - start) * rate) + 1, int(duration * rate))
            while i < due:
                scheduled = start + i / rate
                lag = now - scheduled
                lag_sum += lag
                lag_max = max(lag_max, lag)
                if progress.in_flight >= max_in_flight:
                    bound_hits += 1
                    progress.err(now, "SKIPPED_OVERLOAD")
                else:
                    progress.in_flight += 1
                    task = asyncio.create_task(one(i, scheduled))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    peak = max(peak, progress.in_flight)
                i += 1
            await asyncio.sleep(max(0.0, start + i / rate - perf()))
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                result.errors["UNFINISHED"] += len(pending)
    finally:
        ticker.cancel()
        for task in tasks:
            task.cancel()
    result.duration_s = duration
    result.extra.update({
        "scheduled": i,
        "schedule_lag_ms": {"max": round(lag_max * 1000.0, 3),
                            "mean": round(lag_sum * 1000.0 / max(1, i), 3)},
        "in_flight_bound": max_in_flight,
        "in_flight_bound_hits": bound_hits,
        "in_flight_peak": peak,
    })
    return result


def merge(parts: list[PhaseResult]) -> PhaseResult:
    """One result from phase chunks run at different times (interleaved rounds): counts,
    histograms and CPU seconds add up, per-bin series are concatenated in time order."""
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    out = PhaseResult(target=first.target, phase=first.phase, mode=first.mode,
                      concurrency=first.concurrency, rate=first.rate, bin_s=first.bin_s)
    for part in parts:
        out.duration_s += part.duration_s
        out.ok += part.ok
        out.errors.update(part.errors)
        out.hist.merge(part.hist)
        out.ok_per_s += part.ok_per_s
        out.err_per_s += part.err_per_s
        for key, value in part.cpu_s.items():
            out.cpu_s[key] = out.cpu_s.get(key, 0.0) + value
    out.extra.update(first.extra)
    if "scheduled" in first.extra:  # open loop: the generator's own figures over all chunks
        n = sum(p.extra.get("scheduled", 0) for p in parts)
        out.extra["scheduled"] = n
        out.extra["schedule_lag_ms"] = {
            "max": max(p.extra["schedule_lag_ms"]["max"] for p in parts),
            "mean": round(sum(p.extra["schedule_lag_ms"]["mean"] * p.extra["scheduled"]
                              for p in parts) / max(1, n), 3)}
        out.extra["in_flight_bound_hits"] = sum(p.extra["in_flight_bound_hits"] for p in parts)
        out.extra["in_flight_peak"] = max(p.extra["in_flight_peak"] for p in parts)
    out.extra.pop("first_error_at_s", None)
    out.extra.pop("last_error_at_s", None)
    out.extra["rounds"] = len(parts)
    return out
