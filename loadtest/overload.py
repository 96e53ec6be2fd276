"""The `overload` scenario: open-loop arrivals at 1x, 2x and 4x the router's saturation rate.

What it measures (per leg: router, bare hop `passthrough`, `direct`; legs interleaved in
rounds like every compared phase):

0. the knee (router leg only): short closed loops at 1, 2, 4, ... `KNEE_CONCURRENCY` calls in
   flight, each with its throughput and p50/p99; the knee is the smallest concurrency whose
   throughput is within `KNEE_FRACTION` of the best one: past it the router only queues (more
   in flight, same throughput, higher latency). It is what `--max-inflight-calls` should be
   near (its default was derived from this sweep: loadtest/RESULTS.md);
1. the router's saturation rate: a short closed loop (`--concurrency` in flight) of cache-hit
   Sends (without a router: the bare hop's), or the knee sweep's best throughput when that is
   higher (one closed loop at a fixed concurrency on a busy machine can land in a dip and make
   "2x" no overload at all);
2. for each multiplier (`--overload-steps`, default 1,2,4) an open-loop step of
   `--step-seconds` (10) at multiplier x saturation against every leg, reporting offered rate,
   goodput (OK calls/s), refused calls/s, other errors, p50/p99 of OK calls (from each call's
   scheduled start: queueing in the client counts), the router's RSS at the start and end of
   the step, the generator's CPU and how far it fell behind its schedule.

"Refused" is a call answered RESOURCE_EXHAUSTED or UNAVAILABLE *with* a
`grpc-retry-pushback-ms` trailer (admission control saying "not now, retry in N ms"); every
other failure is an error. Arrivals the generator did not send because its own in-flight bound
(`--max-in-flight`) was reached are counted as `SKIPPED_OVERLOAD` (and `in_flight_bound_hits`):
the generator's memory stays flat, and the report says so when it was the limit.

The goal check (issue: hold up under overload) is printed as PASS/MISS lines: goodput at 2x and
4x >= 90 % of the saturation throughput (the 1x rate), admitted p99 within 3x of its 1x
value, router RSS flat over the steps.
`--router-args "..."` passes extra flags to the router; `--compare-router-args "..."` adds a
second router leg (`router-b`) with other flags, measured in the same interleaved rounds, so one
run compares the router with and without admission control
(`--compare-router-args "--max-inflight-calls 0 --max-inflight-streams 0"`): goal lines for both.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from loadtest import payloads
from loadtest.cluster import Client
from loadtest.gen import Op, PhaseResult
from loadtest.hist import LatencyHistogram

REFUSED = "REFUSED"
PUSHBACK = "grpc-retry-pushback-ms"
REFUSAL_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
GOODPUT_FLOOR = 0.90  # goodput at 2x / 4x vs 1x
P99_CEILING = 3.0  # admitted p99 at 2x / 4x vs 1x
RSS_FLAT_BYTES = 16 * 2**20  # "flat": grows by less than this over all steps ...
RSS_FLAT_FRACTION = 0.10  # ... or by less than this fraction of the start
KNEE_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KNEE_FRACTION = 0.90  # the knee: the first concurrency reaching this share of the best throughput


def refusable_send_op(client: Client, requests: list[bytes], timeout: float,
                      details: dict[str, str] | None = None) -> Op:
    """Unary Send of pre-serialized requests; a refusal with a pushback hint -> `REFUSED`.
    The first status details per error code go to `details` (what the error said)."""
    send, n = client.send, len(requests)

    async def op(i: int) -> str | None:
        try:
            return payloads.ack_error(await send(requests[i % n], metadata=payloads.METADATA,
                                                 timeout=timeout))
        except grpc.aio.AioRpcError as exc:
            if exc.code() in REFUSAL_CODES and any(
                    k == PUSHBACK for k, _ in (exc.trailing_metadata() or ())):
                return REFUSED
            if details is not None:
                details.setdefault(exc.code().name, str(exc.details())[:200])
            raise

    return op


def step_row(mult: float, r: PhaseResult, rss: tuple[int, int] | None) -> dict[str, Any]:
    """One step of one leg as reported."""
    d = r.duration_s or 1.0
    refused = r.errors.get(REFUSED, 0)
    skipped = r.errors.get("SKIPPED_OVERLOAD", 0)
    errors = {k: v for k, v in r.errors.items() if k not in (REFUSED, "SKIPPED_OVERLOAD")}
    lat = r.hist.summary()
    row: dict[str, Any] = {
        "multiplier": mult,
        "offered_rps": round(r.extra.get("scheduled", 0) / d, 1),
        "goodput_rps": round(r.ok / d, 1),
        "refused_rps": round(refused / d, 1),
        "errors_rps": round(sum(errors.values()) / d, 1),
        "errors": errors,
        "ok_p50_ms": lat["p50_ms"],
        "ok_p99_ms": lat["p99_ms"],
        "generator_cpu_pct_core": round(r.cpu_s.get("generator", 0.0) / d * 100.0, 1),
        "generator_skipped": skipped,
        "in_flight_bound_hits": r.extra.get("in_flight_bound_hits", 0),
        "in_flight_peak": r.extra.get("in_flight_peak", 0),
        "schedule_lag_ms": r.extra.get("schedule_lag_ms"),
    }
    if rss is not None:
        row["router_rss_start_mib"] = round(rss[0] / 2**20, 1)
        row["router_rss_end_mib"] = round(rss[1] / 2**20, 1)
    return row


def knee_of(rows: list[dict[str, Any]]) -> int | None:
    """The smallest concurrency whose throughput is >= KNEE_FRACTION of the sweep's best."""
    best = max((r["ok_rps"] for r in rows), default=0.0)
    if best <= 0:
        return None
    return next(r["concurrency"] for r in rows if r["ok_rps"] >= KNEE_FRACTION * best)


async def knee_sweep(run: Any, op: Op, target: str) -> dict[str, Any]:
    """Closed loops at rising concurrency on `target`: throughput and latency per level.

    The levels are swept `--rounds` times (1, 2, 4, ... then again), each level's calls merged
    over the rounds, so a burst of other work on a shared machine hits every level a little
    instead of one level a lot."""
    seconds = min(2.0, max(0.5, run.settings.step_seconds / 5))
    rounds = max(1, run.settings.rounds)
    results: dict[int, list[Any]] = {c: [] for c in KNEE_CONCURRENCY}
    for n in range(rounds):
        for concurrency in KNEE_CONCURRENCY:
            results[concurrency].append(await run.phase(
                "overload", target, f"knee c={concurrency} round {n + 1}", op,
                concurrency=concurrency, duration=seconds))
    rows: list[dict[str, Any]] = []
    for concurrency, parts in results.items():
        lat = LatencyHistogram.merged(r.hist for r in parts).summary()
        ok, took = sum(r.ok for r in parts), sum(r.duration_s for r in parts)
        rows.append({"concurrency": concurrency, "ok_rps": round(ok / took, 1) if took else 0.0,
                     "refused": sum(r.errors.get(REFUSED, 0) for r in parts),
                     "errors": sum(v for r in parts for k, v in r.errors.items()
                                   if k != REFUSED),
                     "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"]})
    return {"target": target, "seconds": seconds, "rounds": rounds, "rows": rows,
            "knee": knee_of(rows)}


def goal_checks(rows: list[dict[str, Any]],
                saturation_rps: float | None = None) -> list[dict[str, Any]]:
    """PASS/MISS of the overload goals on the router leg's steps (first step = 1x).

    Goodput is compared with the measured saturation throughput (the issue's "1x saturation
    throughput") when given, else with the 1x step's goodput: a router already failing at 1x
    must not pass by failing as much at 2x and 4x."""
    if not rows:
        return []
    base = rows[0]
    floor = saturation_rps or base["goodput_rps"]
    checks: list[dict[str, Any]] = []
    for row in rows[1:]:
        m = f"{row['multiplier']:g}x"
        ratio = row["goodput_rps"] / floor if floor else 0.0
        checks.append({"name": f"goodput at {m} >= {GOODPUT_FLOOR:.0%} of 1x",
                       "value": round(ratio, 3), "pass": ratio >= GOODPUT_FLOOR})
        p99 = row["ok_p99_ms"] / base["ok_p99_ms"] if base["ok_p99_ms"] else float("inf")
        checks.append({"name": f"admitted p99 at {m} within {P99_CEILING:g}x of 1x",
                       "value": round(p99, 3) if row["goodput_rps"] else None,
                       "pass": bool(row["goodput_rps"]) and p99 <= P99_CEILING})
    if "router_rss_start_mib" in base:
        start = base["router_rss_start_mib"]
        end = rows[-1]["router_rss_end_mib"]
        peak = max(r["router_rss_end_mib"] for r in rows)
        grown = max(end, peak) - start
        limit = max(RSS_FLAT_BYTES / 2**20, start * RSS_FLAT_FRACTION)
        checks.append({"name": f"router RSS flat (grows < {limit:.0f} MiB over the steps)",
                       "value": round(grown, 1), "pass": grown < limit})
    return checks


async def scenario_overload(run: Any) -> None:
    """See the module docstring. `run` is the `loadtest.scenarios.Run`."""
    s = run.settings
    summary: dict[str, Any] = {"router_args": s.router_args, "step_seconds": s.step_seconds,
                               "max_in_flight": s.max_in_flight,
                               "compare_router_args": getattr(s, "compare_router_args", None)}
    run.results["overload"] = summary
    requests = [run.hit_request(sid) for sid in run.hit_sids]
    timeout = 5.0
    legs = {t: c for t, c in run.legs().items()
            if t in ("router", "router-b", "passthrough", "direct")}
    routers = {"router": run.router, "router-b": getattr(run, "router_b", None)}
    details: dict[str, dict[str, str]] = {t: {} for t in legs}
    ops = {t: refusable_send_op(c, requests, timeout, details[t]) for t, c in legs.items()}
    ref = "router" if "router" in ops else "passthrough"
    if ref != "router":
        summary["note"] = "no router leg: the rate is the bare hop's saturation rate"
    summary["knee"] = await knee_sweep(run, ops[ref], ref)
    sat = await run.phase("overload", ref, "saturation", ops[ref], concurrency=s.concurrency,
                          duration=min(3.0, max(1.0, s.step_seconds)))
    best = max((r["ok_rps"] for r in summary["knee"]["rows"]), default=0.0)
    rate1 = round(max(sat.throughput, best), 1)
    summary["saturation_closed_loop_rps"] = round(sat.throughput, 1)
    summary["saturation_rps"] = rate1
    summary["saturation_target"] = ref
    if rate1 <= 0:
        raise RuntimeError(f"overload: saturation of {ref} measured 0 OK calls/s "
                           f"({dict(sat.errors)}); see the logs under {run.cluster.log_dir}")
    if "router-b" in ops:  # warm it up as the sweep warmed `router`: its RSS growth is load's
        await run.phase("overload", "router-b", "warm-up", ops["router-b"],
                        concurrency=s.concurrency, duration=min(3.0, s.step_seconds),
                        record=False)
    steps: dict[str, list[dict[str, Any]]] = {t: [] for t in ops}
    for mult in s.overload_steps:
        rss_now: dict[str, list[int]] = {}

        @contextlib.asynccontextmanager
        async def track(target: str,
                        rss_now: dict[str, list[int]] = rss_now) -> AsyncIterator[None]:
            router = routers.get(target)
            if router is not None:
                rss_now.setdefault(target, []).append(router.proc.rss_bytes())
                yield
                rss_now[target].append(router.proc.rss_bytes())
            else:
                yield

        results = await run.interleaved("overload", f"{mult:g}x", ops, around=track,
                                         rate=rate1 * mult, duration=s.step_seconds,
                                         max_in_flight=s.max_in_flight)
        for target, r in results.items():
            seen = rss_now.get(target)
            steps[target].append(step_row(mult, r, (seen[0], seen[-1]) if seen else None))
    summary["steps"] = steps
    summary["error_details"] = {t: d for t, d in details.items() if d}
    if "router" in steps:
        summary["goals"] = goal_checks(steps["router"], rate1)
    if "router-b" in steps:  # --compare-router-args: e.g. the same router without admission
        summary["goals_b"] = goal_checks(steps["router-b"], rate1)
    # the generator is what must NOT collapse: say when it was the limit
    summary["generator_limited"] = any(
        row["in_flight_bound_hits"] or (row["schedule_lag_ms"] or {}).get("max", 0) > 100
        for rows in steps.values() for row in rows)


def overload_table(results: dict[str, Any]) -> str:
    """The per-step table and the goal lines ('' when the scenario did not run)."""
    o = results.get("overload")
    if not isinstance(o, dict) or "steps" not in o:
        return ""
    head = ("leg", "step", "offered/s", "goodput/s", "refused/s", "errors/s", "p50 ms",
            "p99 ms", "RSS start-end MiB", "gen CPU", "gen lag max ms", "bound hits")
    rows = [head]
    for leg, steps in o["steps"].items():
        for r in steps:
            rss = (f"{r['router_rss_start_mib']:.1f}-{r['router_rss_end_mib']:.1f}"
                   if "router_rss_start_mib" in r else "-")
            rows.append((leg, f"{r['multiplier']:g}x", f"{r['offered_rps']:.0f}",
                         f"{r['goodput_rps']:.0f}", f"{r['refused_rps']:.0f}",
                         f"{r['errors_rps']:.0f}", f"{r['ok_p50_ms']:.2f}",
                         f"{r['ok_p99_ms']:.2f}", rss, f"{r['generator_cpu_pct_core']:.0f} %",
                         f"{(r['schedule_lag_ms'] or {}).get('max', 0):.1f}",
                         str(r["in_flight_bound_hits"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = (f"overload: saturation of {o['saturation_target']} = {o['saturation_rps']:.0f} "
             f"OK calls/s; steps of {o['step_seconds']:g} s; router args: "
             f"{' '.join(o['router_args']) or '(none)'}"
             + (f"; router-b args: {' '.join(o['compare_router_args']) or '(none)'}"
                if o.get("compare_router_args") is not None and "router-b" in o["steps"]
                else ""))
    goals = [f"{'PASS' if g['pass'] else 'MISS'}  {g['name']}: {g['value']}"
             for g in o.get("goals", [])]
    if o.get("goals_b"):
        goals = [f"router: {g}" for g in goals] + [
            f"router-b: {'PASS' if g['pass'] else 'MISS'}  {g['name']}: {g['value']}"
            for g in o["goals_b"]]
    knee = o.get("knee")
    if knee:
        levels = "  ".join(f"c={r['concurrency']}: {r['ok_rps']:.0f}/s p50 {r['p50_ms']:.2f} "
                           f"p99 {r['p99_ms']:.2f} ms" + (f" ({r['refused']} refused)"
                                                          if r["refused"] else "")
                           for r in knee["rows"])
        goals.insert(0, f"knee sweep on {knee['target']} ({knee['seconds']:g} s closed loops x "
                        f"{knee.get('rounds', 1)} rounds): "
                        f"{levels}; knee at c={knee['knee']} (first level >= "
                        f"{KNEE_FRACTION:.0%} of the best throughput)")
    if o.get("generator_limited"):
        goals.append("NOTE  the generator hit its in-flight bound or fell > 100 ms behind "
                     "its schedule in some step: offered load was lower than asked there")
    return "\n".join([title, *lines, *goals])

