"""Output of a run: the terminal table, the quality bars, the JSON file and the HTML report.

The bars are the router's performance goals (`quality_bars`), each computed from figures
measured in the same run: value, goal, and "PASS" / "MISS" / "n/a" (with the reason when a
figure is missing, e.g. the router leg was skipped). No goal is set for the ACP front door: its
rows are "(info)", except that a clean run has no errors; `acp_table` puts the ACP figures side
by side. The HTML report is one self-contained file (plots embedded as base64 PNG, matplotlib
with the Agg backend).
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Bar = dict[str, Any]


def _get(d: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _bar(name: str, value: Any, unit: str, goal: str, ok: Callable[[float], bool] | None,
         note: str = "") -> Bar:
    status = "n/a"
    if isinstance(value, (int, float)) and ok is not None:
        status = "PASS" if ok(float(value)) else "MISS"
    return {"name": name, "value": value, "unit": unit, "goal": goal, "status": status,
            "note": note}


def quality_bars(results: dict[str, Any]) -> list[Bar]:
    """The performance goals as measured in this run: the rows of the scenarios that ran."""
    r = results
    bars: list[Bar] = [
        _bar("hit: router/passthrough throughput", _get(r, "hit", "ratio_router_passthrough"),
             "x", ">= 0.85", lambda v: v >= 0.85),
        _bar("hit: router/direct throughput", _get(r, "hit", "ratio_router_direct"), "x",
             "(info)", None),
        _bar("hit: passthrough/direct throughput", _get(r, "hit", "ratio_passthrough_direct"),
             "x", "(info; a bare Python hop: 0.25-0.33 on 2 cores)", None),
        _bar("hit: p50 at c=1, router - passthrough",
             _get(r, "hit", "c1_p50_router_minus_passthrough_ms"), "ms", "<= 0.15",
             lambda v: v <= 0.15),
        _bar("hit: added p99 at half saturation (router - direct)",
             _get(r, "hit", "added_ms", "router", "p99"), "ms", "<= 3", lambda v: v <= 3.0),
        _bar("hit: added p50 at half saturation (router - direct)",
             _get(r, "hit", "added_ms", "router", "p50"), "ms", "(info)", None),
        _bar("hit: router CPU per 1k requests",
             _scale(_get(r, "hit", "cpu_ms_per_request", "router"), 1.0), "s CPU", "(info)",
             None, "CPU-ms per request = CPU-s per 1k requests"),
        _bar("hit: passthrough CPU per 1k requests",
             _scale(_get(r, "hit", "cpu_ms_per_request", "passthrough"), 1.0), "s CPU",
             "(info; a bare Python hop: ~0.5)", None),
        _bar("hit: nginx CPU per 1k requests",
             _get(r, "hit", "cpu_ms_per_request", "nginx"), "s CPU",
             "(info; nginx grpc_pass, one worker)", None,
             _get(r, "hit", "not_run", "nginx") or ""),
        _bar("hit: router/nginx CPU per call",
             _ratio(_get(r, "hit", "cpu_ms_per_request", "router"),
                    _get(r, "hit", "cpu_ms_per_request", "nginx")), "x", "(info)", None),
        _bar("hit: Redis commands per hit", _get(r, "hit", "redis_commands_per_hit"), "",
             "~0 (< 0.001: background only)", lambda v: v < 0.001,
             "run with --redis embedded or --redis-url"
             if _get(r, "hit", "redis_commands_per_hit") is None
             else "during the phase: " + json.dumps(_get(r, "hit", "redis_commands"))),
        _bar("stream: whole stream p50 at c=1, router - passthrough",
             _get(r, "stream", "stream_router_minus_passthrough_ms", "c1", "p50"), "ms",
             "<= 2", lambda v: v <= 2.0, "open, round trips, half-close, end"),
        _bar("stream: whole stream p99 at c=1, router - passthrough",
             _get(r, "stream", "stream_router_minus_passthrough_ms", "c1", "p99"), "ms",
             "(info)", None),
        _bar("miss: p50 - probe RTT p50", _get(r, "miss", "miss_minus_probe_rtt_p50_ms"), "ms",
             "<= 2", lambda v: v <= 2.0),
        _bar("miss: p50 - router hit p50 (same GetSession)",
             _get(r, "miss", "miss_minus_router_hit_p50_ms"), "ms", "(info)", None),
        _bar("miss: p99 - probe RTT p99", _get(r, "miss", "miss_minus_probe_rtt_p99_ms"), "ms",
             "(info)", None),
        _bar("miss: probes per miss", _get(r, "miss", "probes_per_miss"), "",
             f"== pods ({_get(r, 'miss', 'pods')})",
             (lambda v: v <= float(_get(r, "miss", "pods") or 0) + 1e-9)
             if _get(r, "miss", "pods") else None),
        _bar("miss: fan-outs per sid, 8 concurrent misses",
             _get(r, "miss", "coalescing", "fanouts_per_session"), "", "== 1",
             lambda v: v <= 1.0),
        _bar("scale: throughput K pods / 1 pod", _get(r, "scale", "throughput_ratio_many_vs_1"),
             "x", ">= 0.9", lambda v: v >= 0.9),
        _bar("scale: c1 p50 K pods - 1 pod", _get(r, "scale", "c1_p50_many_minus_1_ms"), "ms",
             "<= 0.1", lambda v: v <= 0.1),
        _bar("scale: throughput large / small cache (1M / 1k)",
             _get(r, "scale", "throughput_ratio_large_vs_small_cache"), "x", ">= 0.9",
             lambda v: v >= 0.9),
        _bar("scale: c1 p50 large - small cache (1M - 1k)",
             _get(r, "scale", "c1_p50_large_minus_small_cache_ms"), "ms", "<= 0.1",
             lambda v: v <= 0.1),
        _bar("scale: router RSS bytes per cached session (1M preload)",
             _get(r, "scale", "rss_bytes_per_cached_session"), "B", "(info)", None),
        _bar("scale: near-cache lookup large/small",
             _get(r, "scale", "near_cache", "lookup_ratio_large_vs_small"), "x",
             "(info: ns vs a ~ms call)", None),
        _bar("workers: N/1 throughput", _get(r, "workers", "speedup"), "x", ">= 1.6",
             lambda v: v >= 1.6, "one 2-core machine shared with generator and pods"),
        _bar("memory: near-cache bytes/session (tracemalloc)",
             _get(r, "memory", "near_cache_tracemalloc", "bytes_per_session"), "B", "(info)",
             None),
        _bar("memory: router RSS bytes/session",
             _get(r, "memory", "router_rss_bytes_per_session"), "B", "(info)", None,
             "coarse: RSS moves by pages and reuses memory freed by earlier phases"),
        _bar("memory: Redis bytes/session", _get(r, "memory", "redis_bytes_per_session"), "B",
             "(info)", None),
        _bar("pod-kill: misrouted calls (router)", _get(r, "pod-kill", "router", "misroutes"),
             "", "== 0", lambda v: v == 0),
        _bar("pod-kill: last error after the restart (router)",
             _get(r, "pod-kill", "router", "errors_end_after_restart_s"), "s", "(info)", None),
        _bar("pod-kill: last error after the restart (direct)",
             _get(r, "pod-kill", "direct", "errors_end_after_restart_s"), "s", "(info)", None),
        _bar("pod-kill: non-retryable errors (router)",
             _get(r, "pod-kill", "router", "non_retryable_errors"), "", "== 0",
             lambda v: v == 0),
        *acp_bars(r),
        *store_bars(r),
    ]
    return [b for b in bars if b["name"].split(":", 1)[0] in r]


def store_bars(r: dict[str, Any]) -> list[Bar]:
    """The `store` scenario's rows (none when it did not run)."""
    if "store" not in r:
        return []
    st = r["store"]
    kind = st.get("topology")
    rows = [
        _bar(f"store: Redis commands per hit ({kind})", st.get("redis_commands_per_hit"), "",
             "== 0", lambda v: v == 0, "timer commands (marker, drain, PING) listed apart"),
        _bar(f"store: Redis commands per start ({kind})", st.get("redis_commands_per_start"),
             "", "(info)", None, "commands the router sent; script-internal ones apart"),
        _bar(f"store: Redis commands per session lifecycle ({kind})",
             st.get("redis_commands_per_lifecycle"), "", "(info)", None),
        _bar(f"store: Redis commands per session lifecycle, 2 routers ({kind})",
             st.get("redis_commands_per_lifecycle_2_routers"), "", "(info)", None,
             "each router writes what its watch feeds report"),
        _bar(f"store: router CPU per watch-feed event ({kind})",
             st.get("router_cpu_us_per_feed_event"), "us", "(info)", None,
             "every router applies every pod's events and writes them behind"),
        _bar(f"store: Redis bytes per session ({kind})", st.get("redis_bytes_per_session"), "B",
             "(info)", None, "100,000 sessions, 1,000 per pod"),
    ]
    for key, value in st.items():
        if key.startswith("placements_") and isinstance(value, dict):
            label = key.removeprefix("placements_").replace("_", " ")
            rows.append(_bar(f"store: placements/s, {label} ({kind})",
                             value.get("placements_per_s"), "/s", "(info)", None,
                             f"{value.get('redis_cpu_us_per_placement')} us Redis CPU each"))
    rows.append(_bar("store: placements 3 masters / 1 master",
                     st.get("placements_ratio_3_vs_1"), "x", "(info)", None,
                     "one Python caller on 2 shared cores"))
    return [row for row in rows if row["value"] is not None]


def acp_bars(r: dict[str, Any]) -> list[Bar]:
    """The `acp` scenario's rows (none when it did not run)."""
    if "acp" not in r:
        return []
    a = r["acp"]
    k = a.get("connections")
    shared = "everything shares the machine's cores"
    return [
        _bar(f"acp: prompt router/direct throughput ({k} connections)",
             _get(a, "prompt", "ratio_router_direct"), "x", "(info)", None, shared),
        _bar("acp: prompt added p50 at c=1 (router - direct)",
             _get(a, "prompt", "added_c1_ms", "p50"), "ms", "(info)", None),
        _bar("acp: prompt added p99 at c=1 (router - direct)",
             _get(a, "prompt", "added_c1_ms", "p99"), "ms", "(info)", None),
        _bar(f"acp: prompt added p50 at saturation ({k} connections)",
             _get(a, "prompt", "added_sat_ms", "p50"), "ms", "(info)", None),
        _bar(f"acp: prompt added p99 at saturation ({k} connections)",
             _get(a, "prompt", "added_sat_ms", "p99"), "ms", "(info)", None),
        _bar("acp: router CPU per prompt", _get(a, "prompt", "router_cpu_ms_per_prompt"),
             "ms", "(info)", None),
        _bar("acp: generator CPU per prompt (router leg)",
             _get(a, "prompt", "generator_cpu_ms_per_prompt", "router"), "ms", "(info)", None,
             "the load client's own cost"),
        _bar("acp: session/status p50, router cache hit - direct",
             _get(a, "status", "added_ms", "p50"), "ms", "(info)", None),
        _bar("acp: status miss p50 - one direct status RTT",
             _get(a, "miss", "miss_minus_direct_status_p50_ms"), "ms",
             "(info; the miss goal, <= 2, is MACP's)", None),
        _bar("acp: status miss p99 - one direct status RTT",
             _get(a, "miss", "miss_minus_direct_status_p99_ms"), "ms", "(info)", None),
        _bar("acp: probes per miss", _get(a, "miss", "probes_per_miss"), "",
             f"(info; pods = {a.get('pods')})", None),
        _bar("acp: errors, all phases", a.get("errors_total"), "", "== 0",
             lambda v: v == 0,
             json.dumps(a["errors"]) if a.get("errors") else a.get("skipped", "")),
    ]


def acp_table(results: dict[str, Any]) -> str:
    """Direct vs router for the `acp` scenario ("" when it did not run)."""
    a = results.get("acp")
    if not isinstance(a, dict) or "prompt" not in a:
        return ""
    prompt, status, miss = a["prompt"], a.get("status", {}), a.get("miss", {})

    def lat(d: Any) -> str:
        if not isinstance(d, dict):
            return "-"
        return " / ".join(f"{d[f'p{p}_ms']:.2f}" for p in (50, 90, 99))

    def diff(d: Any) -> str:
        if not isinstance(d, dict):
            return "-"
        return " / ".join(f"{d[f'p{p}']:+.2f}" for p in (50, 90, 99))

    def pair(d: Any) -> tuple[str, str]:
        d = d if isinstance(d, dict) else {}
        return _fmt(d.get("direct")), _fmt(d.get("router"))

    ratio = prompt.get("ratio_router_direct")
    rows = [
        (f"ACP, {a.get('transport')}, {a.get('pods')} pods", "direct", "router",
         "router - direct"),
        (f"prompt sat rps ({a.get('connections')} connections)",
         *pair(prompt.get("throughput_rps")), f"x{ratio:.3f}" if ratio is not None else "-"),
        ("prompt sat p50/p90/p99 ms", lat(prompt["sat_latency_ms"].get("direct")),
         lat(prompt["sat_latency_ms"].get("router")), diff(prompt.get("added_sat_ms"))),
        ("prompt c=1 p50/p90/p99 ms", lat(prompt["c1_latency_ms"].get("direct")),
         lat(prompt["c1_latency_ms"].get("router")), diff(prompt.get("added_c1_ms"))),
    ]
    if status:
        rows.append(("status c=1 p50/p90/p99 ms", lat(status["latency_ms"].get("direct")),
                     lat(status["latency_ms"].get("router")), diff(status.get("added_ms"))))
    if miss:
        rows.append(("status miss p50/p90/p99 ms", "-", lat(miss.get("latency_ms")),
                     f"{miss['miss_minus_direct_status_p50_ms']:+.2f} p50 vs direct status"))
        rows.append(("probes per miss", "-", _fmt(miss.get("probes_per_miss")),
                     f"{_fmt(miss.get('fanouts'))} fan-outs"))
    rows += [
        ("generator CPU ms/prompt", *pair(prompt.get("generator_cpu_ms_per_prompt")), "-"),
        ("ACP pods CPU ms/prompt", *pair(prompt.get("pods_cpu_ms_per_prompt")), "-"),
        ("router CPU ms/prompt", "-", _fmt(prompt.get("router_cpu_ms_per_prompt")), "-"),
    ]
    errs = a.get("errors") or {}
    rows.append(("errors", *(json.dumps(errs[t]) if errs.get(t) else "0"
                             for t in ("direct", "router")), "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\n({a.get('note', '')})"


def _ratio(a: Any, b: Any) -> Any:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return round(a / b, 3)
    return None


def _scale(v: Any, k: float) -> Any:
    return round(v * k, 4) if isinstance(v, (int, float)) else v


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def phase_table(phases: list[dict[str, Any]]) -> str:
    head = ("scenario", "target", "phase", "load", "ok", "rps", "p50", "p90", "p99", "max",
            "errors")
    rows = [head]
    for p in phases:
        lat = p["latency"]
        load = f"c={p['concurrency']}" if p["mode"] == "closed" else f"{p['rate']:g}/s"
        errs = ",".join(f"{k}:{v}" for k, v in sorted(p["errors"].items())) or "0"
        rows.append((p.get("scenario", ""), p["target"], p["phase"], load, str(p["ok"]),
                     f"{p['throughput_rps']:.0f}", f"{lat['p50_ms']:.3f}",
                     f"{lat['p90_ms']:.3f}", f"{lat['p99_ms']:.3f}", f"{lat['max_ms']:.2f}",
                     errs[:40]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(latency in ms; rps = OK calls per second)"


def hop_table(results: dict[str, Any]) -> str:
    """`hit`: router / bare hop / nginx / direct side by side (throughput, CPU per call of
    each hop process and of the generator, p50 at c=1); legs not run are named with why."""
    hit = results.get("hit")
    if not isinstance(hit, dict) or "throughput_rps" not in hit:
        return ""
    rps, cpu = hit["throughput_rps"], hit.get("cpu_ms_per_request", {})
    gen, c1 = hit.get("generator_cpu_ms_per_request", {}), hit.get("c1_p50_ms", {})
    rows = [("leg", "rps", "hop CPU ms/call", "hop CPU % core", "generator CPU ms/call",
             "p50 @ c=1 ms")]
    for leg in ("router", "router-b", "passthrough", "passthrough-sync", "nginx", "direct"):
        if leg not in rps:
            why = hit.get("not_run", {}).get(leg)
            if why:
                rows.append((leg, why, "", "", "", ""))
            continue
        hop = cpu.get(leg) if leg != "direct" else None
        # CPU ms per call x calls per second = the hop process's share of one core
        share = hop * rps[leg] / 10 if hop is not None else None
        rows.append((leg, f"{rps[leg]:.0f}", "-" if hop is None else f"{hop:.3f}",
                     "-" if share is None else f"{share:.0f} %",
                     _fmt(gen.get(leg)), _fmt(c1.get(leg))))
    widths = [max(len(r[i]) for r in rows if len(r[1]) < 40 or i != 1) for i in range(6)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "hit: hops side by side (saturation, --concurrency in flight)\n" + "\n".join(lines)


def workers_table(results: dict[str, Any]) -> str:
    """`workers`: 1 vs N workers, pinning and per-core efficiency ('' if it did not run)."""
    w = results.get("workers")
    if not isinstance(w, dict) or "workers" not in w:
        return ""
    lines = [f"workers: {w['pinning']['note'] if 'pinning' in w else 'unpinned'}"]
    for n, r in w["workers"].items():
        lines.append(f"  {n} worker(s): {r['throughput_rps']:.0f} OK calls/s, router CPU "
                     f"{r['router_cpu_ms_per_request']:.3f} ms/call, "
                     f"{r['rps_per_router_core']:.0f} calls per router CPU-second, cores "
                     f"{r.get('router_cores', '-')}")
    lines.append(f"  speedup {w['speedup']:.2f}x; per-core efficiency (calls per router "
                 f"CPU-second, N vs 1) {w['efficiency_ratio']:.2f}")
    return "\n".join(lines)


def bars_table(bars: list[Bar]) -> str:
    rows = [("quality bar", "value", "goal", "status")]
    for b in bars:
        unit = f" {b['unit']}" if b["unit"] and b["value"] is not None else ""
        rows.append((b["name"], _fmt(b["value"]) + unit, b["goal"],
                     b["status"] + (f"  ({b['note']})" if b["note"] else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True))
                     + "  " + r[3] for r in rows)


# ── plots ───────────────────────────────────────────────────────────────
def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, base64 PNG) pairs; empty if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    phases = report["phases"]
    out: list[tuple[str, str]] = []
    scenarios = sorted({p.get("scenario", "") for p in phases})
    for scenario in scenarios:
        mine = [p for p in phases if p.get("scenario") == scenario and p["latency_curve"]]
        kinds = list(dict.fromkeys(p["phase"] for p in mine))
        if not mine:
            continue
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds) + 1, 3.8),
                                 squeeze=False)
        for ax, kind in zip(axes[0], kinds, strict=True):
            for p in (p for p in mine if p["phase"] == kind):
                xs = [1.0 / max(1e-4, 1.0 - q / 100.0) for q, _ in p["latency_curve"]]
                ys = [ms for _, ms in p["latency_curve"]]
                ax.plot(xs, ys, label=p["target"])
            p0 = next(p for p in mine if p["phase"] == kind)
            load = f"c={p0['concurrency']}" if p0["mode"] == "closed" else f"{p0['rate']:g}/s"
            ax.set_xscale("log")
            ax.set_xticks([2, 10, 100, 1000, 10000],
                          ["p50", "p90", "p99", "p99.9", "p99.99"])
            ax.set_ylabel("latency (ms)")
            ax.set_title(f"{scenario} / {kind} ({load})", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        out.append((f"{scenario}: latency by percentile", _png(fig)))
    sat = [p for p in phases if p["phase"] == "sat"]
    if sat:
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(sat) + 1.2))
        labels = [f"{p.get('scenario')}: {p['target']}" for p in sat]
        ax.barh(labels, [p["throughput_rps"] for p in sat], color="tab:blue")
        ax.invert_yaxis()
        ax.set_xlabel("OK calls per second (closed loop, saturation)")
        ax.set_title("throughput")
        ax.grid(True, axis="x", alpha=0.3)
        out.append(("throughput at saturation", _png(fig)))
    kill = [p for p in phases if p.get("scenario") == "pod-kill"]
    if kill:
        fig, axes = plt.subplots(len(kill), 1, figsize=(8, 2.6 * len(kill)), squeeze=False)
        for ax, p in zip(axes[:, 0], kill, strict=True):
            width = float(p.get("bin_s", 1.0))
            xs = [i * width for i in range(len(p["ok_per_s"]) + 1)]
            for key, label, color in (("ok_per_s", "ok/s", "tab:blue"),
                                      ("err_per_s", "errors/s", "tab:red")):
                rates = [c / width for c in p[key]]
                ax.stairs(rates, xs, label=label, color=color)
            for key, style in (("killed_at_s", "--"), ("restarted_at_s", ":")):
                if key in p:
                    ax.axvline(p[key], color="k", linestyle=style, label=key)
            ax.set_xlabel("s since phase start")
            ax.set_title(f"pod-kill via {p['target']}", fontsize=10)
            ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(("pod-kill timeline", _png(fig)))
    return out


def write_html(report: dict[str, Any], path: Path) -> None:
    images = "".join(
        f"<h3>{html.escape(t)}</h3><img src='data:image/png;base64,{b64}'/>"
        for t, b64 in plots(report))
    meta = report["meta"]
    acp = acp_table(report["results"])
    acp_html = f"<h2>ACP: direct vs router</h2><pre>{html.escape(acp)}</pre>" if acp else ""
    from loadtest.overload import overload_table

    for title, text in (("Hops side by side", hop_table(report["results"])),
                        ("Workers", workers_table(report["results"])),
                        ("Overload", overload_table(report["results"]))):
        if text:
            acp_html += f"<h2>{title}</h2><pre>{html.escape(text)}</pre>"
    body = (
        "<!doctype html><meta charset='utf-8'><title>macp-router load test</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}</style>"
        f"<h1>macp-router load test</h1><p>{html.escape(meta['command'])}<br>"
        f"{html.escape(meta['started_at'])}; {meta['machine']['cpus']} CPUs, "
        f"{html.escape(meta['machine']['note'])}</p>"
        f"<h2>Quality bars</h2><pre>{html.escape(bars_table(report['bars']))}</pre>"
        f"<h2>Phases</h2><pre>{html.escape(phase_table(report['phases']))}</pre>"
        f"{acp_html}<h2>Plots</h2>{images or '<p>matplotlib not installed: no plots</p>'}"
        f"<h2>Scenario summaries</h2><pre>{html.escape(json.dumps(report['results'], indent=1))}"
        "</pre>"
    )
    path.write_text(body, encoding="utf-8")


def write_outputs(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write `<stamp>.json`, `<stamp>.html` and `latest.*` copies; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = {"json": out_dir / f"loadtest-{stamp}.json", "html": out_dir / f"loadtest-{stamp}.html"}
    text = json.dumps(report, indent=1, default=str)
    paths["json"].write_text(text, encoding="utf-8")
    (out_dir / "latest.json").write_text(text, encoding="utf-8")
    write_html(report, paths["html"])
    (out_dir / "latest.html").write_text(paths["html"].read_text(encoding="utf-8"),
                                         encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}
