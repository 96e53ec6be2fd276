"""The status page at `/` of the metrics port: what an operator wants to see in one glance.

Like HAProxy's stats page: server-rendered HTML, no build step, refreshes itself (a tiny inline
script that waits while you type, with a `<noscript>` meta refresh). It shows:
- readiness, store, version; every MACP pod with health, feed, open/cached sessions,
  draining, reconnects, whether it takes new sessions (and why not) and last error;
- the locate mix (hit / store / probe / not found / negative / unknown / stale) and the probe
  fan-outs with their latency;
- the last placements (a bounded ring in `Metrics.recent_placements`);
- the router's background services: up, or down with the error that stopped them, starts and
  crashes (down ones first);
- "where is session X" (`/?session=SID` or `/session?id=SID`): live / not_found / unknown,
  which pod and how the router knows.

Every number comes from the admin API's own code (`RouterAdmin.ListPods`, `SessionStatus`,
`DrainPod`, `UndrainPod`, called in process on the router's event loop with a small servicer
context) or from the metrics registry: nothing is computed twice.

Invariants:
- Everything printed is HTML-escaped; session ids of placements are shortened like the logs
  (`router.logs.short_sid`).
- Reading needs no token. The drain/undrain buttons POST the admin token (form field `token`
  or `Authorization: Bearer`), which the admin API checks exactly as for gRPC; a router
  without `--admin-token` has no buttons (a page on a network port must not drain for
  anyone), and a form posted from another site cannot know the token.
"""

from __future__ import annotations

import asyncio
import html
import math
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote_plus

import grpc

from router import __version__
from router.admin import RouterAdmin
from router.core.status import LocateStatus
from router.logs import short_sid
from router.metrics import Metrics
from router.v1 import router_pb2

T = TypeVar("T")
StartResponse = Callable[..., Any]

LOCATE_ORDER = (
    ("hit", "near-cache hit"),
    ("store_hit", "store hit"),
    ("probe_hit", "found by probing"),
    ("not_found", "not found"),
    ("negative_hit", "recently not found"),
    ("unknown", "unknown (a pod silent)"),
    ("stale", "stale route"),
)
MAX_FORM_BYTES = 4096
MAX_SID_CHARS = 256


class AdminRefused(Exception):
    """The admin API refused a page request (its own context.abort)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _PageContext:
    """The part of `grpc.aio.ServicerContext` the admin servicer uses, for in-process calls."""

    def __init__(self, token: str | None) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise AdminRefused(code, details)


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


class StatusPage:
    """WSGI application of the page; runs on the HTTP thread, calls into the router's loop."""

    def __init__(
        self,
        *,
        admin: RouterAdmin,
        metrics: Metrics,
        health_snapshot: Callable[[], dict[str, Any]],
        loop: asyncio.AbstractEventLoop,
        admin_token: str | None,
        refresh_s: float = 5.0,
        call_timeout_s: float = 5.0,
    ) -> None:
        self.admin = admin
        self.metrics = metrics
        self.health_snapshot = health_snapshot
        self.loop = loop
        self.admin_token = admin_token
        self.refresh_s = refresh_s
        self.call_timeout_s = call_timeout_s

    # -- calls into the router ----------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.call_timeout_s)
        except TimeoutError:
            future.cancel()  # do not leave the lookup running on the router's loop
            raise

    def list_pods(self) -> router_pb2.ListPodsResponse:
        return self._run(self.admin.ListPods(router_pb2.ListPodsRequest(),
                                             _PageContext(self.admin_token)))  # type: ignore[arg-type]

    def session_status(self, sid: str) -> router_pb2.SessionStatusResponse:
        request = router_pb2.SessionStatusRequest(session_id=sid)
        return self._run(self.admin.SessionStatus(request, _PageContext(self.admin_token)))  # type: ignore[arg-type]

    def set_draining(self, pod: str, draining: bool, token: str) -> router_pb2.DrainPodResponse:
        method = self.admin.DrainPod if draining else self.admin.UndrainPod
        return self._run(method(router_pb2.DrainPodRequest(name=pod), _PageContext(token)))  # type: ignore[arg-type]

    # -- WSGI ----------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET").upper() == "POST":
            return self._post(environ, start_response)
        query = parse_qs(environ.get("QUERY_STRING", ""))
        key = "id" if environ.get("PATH_INFO") == "/session" else "session"
        sid = (query.get(key) or query.get("session") or [""])[0].strip()[:MAX_SID_CHARS]
        notice = (query.get("notice") or [""])[0][:300]
        return self._page(start_response, "200 OK", sid=sid, notice=notice)

    def _post(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        draining = environ.get("PATH_INFO") == "/drain"
        try:
            length = min(int(environ.get("CONTENT_LENGTH") or 0), MAX_FORM_BYTES)
        except ValueError:
            length = 0
        form = parse_qs(environ["wsgi.input"].read(length).decode("utf-8", "replace"))
        pod = (form.get("pod") or [""])[0]
        token = (form.get("token") or [""])[0]
        header = environ.get("HTTP_AUTHORIZATION", "")
        if not token and header.lower().startswith("bearer "):
            token = header[7:].strip()
        verb = "drain" if draining else "undrain"
        if self.admin_token is None:
            return self._page(start_response, "403 Forbidden", error=(
                f"cannot {verb} from this page: the router has no admin token "
                "(start it with --admin-token, or use `macp-router drain` on the admin port)"))
        if not token:
            return self._page(start_response, "401 Unauthorized",
                              error=f"{verb} needs the admin token: type it next to the button")
        try:
            reply = self.set_draining(pod, draining, token)
        except AdminRefused as exc:
            status = {grpc.StatusCode.NOT_FOUND: "404 Not Found",
                      grpc.StatusCode.UNAUTHENTICATED: "401 Unauthorized"}.get(
                          exc.code, "403 Forbidden")
            return self._page(start_response, status, error=f"{verb} {pod}: {exc.details}")
        state = "draining: no new sessions" if reply.pod.draining else "accepting new sessions"
        notice = f"pod {reply.pod.name}: {state}"
        start_response("303 See Other", [("Location", "/?notice=" + quote_plus(notice)),
                                         ("Content-Length", "0")])
        return [b""]

    def _page(self, start_response: StartResponse, status: str, *, sid: str = "",
              notice: str = "", error: str = "") -> Iterable[bytes]:
        try:
            body = self.render(sid=sid, notice=notice, error=error)
        except (TimeoutError, RuntimeError) as exc:  # loop stopping or busy
            status = "503 Service Unavailable"
            body = (f"<!doctype html><title>macp-router</title><p>the router did not answer "
                    f"within {self.call_timeout_s:g}s ({esc(type(exc).__name__)}); "
                    f"retry</p>")
        data = body.encode()
        start_response(status, [("Content-Type", "text/html; charset=utf-8"),
                                ("Content-Length", str(len(data))),
                                ("Cache-Control", "no-store"),
                                ("X-Frame-Options", "DENY"),
                                ("Content-Security-Policy",
                                 "default-src 'none'; style-src 'unsafe-inline'; "
                                 "script-src 'unsafe-inline'; form-action 'self'")])
        return [data]

    # -- rendering -----------------------------------------------------------------------------
    def render(self, *, sid: str = "", notice: str = "", error: str = "") -> str:
        pods = self.list_pods()
        health = self.health_snapshot()
        lookup = self._lookup_html(sid) if sid else ""
        ready = bool(health.get("ready"))
        readiness = ("<span class=ok>ready</span>" if ready else
                     f"<span class=bad>not ready: {esc(health.get('reason', ''))}</span>")
        store = esc(pods.store) + (" <span class=bad>DEGRADED</span>" if pods.store_degraded
                                   else "")
        banner = ""
        if notice:
            banner += f"<p class=notice id=notice>{esc(notice)}</p>"
        if error:
            banner += f"<p class=error id=error>{esc(error)}</p>"
        return PAGE.format(
            refresh_ms=int(self.refresh_s * 1000),
            refresh_s=int(self.refresh_s),
            version=esc(__version__),
            readiness=readiness,
            store=store,
            cached=esc(pods.cached_sessions),
            now=esc(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())),
            banner=banner,
            pod_rows=self._pod_rows(pods.pods),
            service_rows=self._service_rows(pods.services),
            admin_note=self._admin_note(),
            sid=esc(sid),
            lookup=lookup,
            locate=self._locate_html(),
            probes=self._probes_html(),
            placements=self._placements_html(),
        )

    def _service_rows(self, services: Iterable[router_pb2.ServiceStatus]) -> str:
        rows = []
        for service in sorted(services, key=lambda s: (s.up, s.name)):
            state = ("<td class=ok>up</td>" if service.up
                     else "<td class=bad>DOWN: restarting</td>")
            crashes = (f"<td class='num bad'>{service.crashes}</td>" if service.crashes
                       else "<td class=num>0</td>")
            rows.append(
                f"<tr data-service=\"{esc(service.name)}\"><td class=name>{esc(service.name)}"
                f"</td>{state}<td class=num>{service.for_seconds:.0f} s</td>"
                f"<td class=num>{service.starts}</td>{crashes}"
                f"<td class=err>{esc(service.last_error)}</td></tr>")
        return "\n".join(rows) or "<tr><td colspan=6>none running</td></tr>"

    def _admin_note(self) -> str:
        if self.admin_token is None:
            return ("Read-only: this router has no <code>--admin-token</code>, so the page has "
                    "no drain buttons (use <code>macp-router drain NAME</code> on the admin "
                    "port).")
        return "Drain / undrain need the router's admin token, typed next to the button."

    def _pod_rows(self, pods: Iterable[router_pb2.PodStatus]) -> str:
        rows = []
        for pod in pods:
            health = ("<td class=ok>healthy</td>" if pod.healthy else "<td class=bad>DOWN</td>")
            feed = "<td class=ok>up</td>" if pod.feed_up else "<td class=bad>down</td>"
            draining = "<td class=warn>yes</td>" if pod.draining else "<td>no</td>"
            reason = pod.not_placeable
            placeable = (f"<td class=warn>no: {esc(reason)}</td>" if reason
                         else "<td>yes</td>" if pod.healthy and not pod.draining
                         else "<td class=warn>no</td>")
            actions = ""
            if self.admin_token is not None:
                verb = "undrain" if pod.draining else "drain"
                actions = (
                    f"<form method=post action=/{verb} class=inline>"
                    f"<input type=hidden name=pod value=\"{esc(pod.name)}\">"
                    "<input type=password name=token placeholder=\"admin token\" "
                    "autocomplete=off required size=12>"
                    f"<button type=submit>{verb}</button></form>"
                )
            rows.append(
                f"<tr data-pod=\"{esc(pod.name)}\"><td class=name>{esc(pod.name)}</td>"
                f"<td>{esc(pod.address)}</td>{health}{feed}{draining}"
                f"<td class=num>{pod.open_sessions}</td><td class=num>{pod.cached_sessions}</td>"
                f"<td class=num>{pod.feed_reconnects}</td>{placeable}"
                f"<td class=err>{esc(pod.last_error)}</td><td>{actions}</td></tr>"
            )
        if not rows:
            rows.append("<tr><td colspan=11 class=bad>no pods: check --pods / --pods-dns "
                        "(see /readyz)</td></tr>")
        return "\n".join(rows)

    def _lookup_html(self, sid: str) -> str:
        try:
            reply = self.session_status(sid)
        except AdminRefused as exc:
            return f"<p class=error id=lookup-result>{esc(exc.details)}</p>"
        css = {LocateStatus.LIVE: "ok", LocateStatus.NOT_FOUND: "warn"}.get(reply.status, "bad")
        parts = [f"<p id=lookup-result><code>{esc(sid)}</code>: "
                 f"<strong class={css} id=lookup-status>{esc(reply.status)}</strong>"]
        if reply.pod:
            parts.append(f" on pod <strong id=lookup-pod>{esc(reply.pod)}</strong>")
        parts.append(f" (how the router knows: <span id=lookup-source>{esc(reply.source)}"
                     "</span>")
        if reply.state:
            parts.append(f", state {esc(reply.state)}")
        parts.append(")</p>")
        if reply.detail:
            parts.append(f"<p class=detail id=lookup-detail>{esc(reply.detail)}</p>")
        return "".join(parts)

    def _counter(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    def _locate_html(self) -> str:
        counts = [(label, self._counter("macp_router_locate_total", protocol="macp",
                                        result=result), result)
                  for result, label in LOCATE_ORDER]
        total = sum(count for _, count, _ in counts)
        rows = []
        for label, count, result in counts:
            share = count / total * 100 if total else 0.0
            rows.append(
                f"<tr data-result=\"{esc(result)}\"><td>{esc(label)}</td>"
                f"<td class=num>{count:.0f}</td><td class=num>{share:.1f} %</td>"
                f"<td><div class=bar style=\"width:{share:.1f}%\"></div></td></tr>")
        return "\n".join(rows)

    def _probes_html(self) -> str:
        fanouts = self._counter("macp_router_probe_fanouts_total", protocol="macp")
        coalesced = self._counter("macp_router_coalesced_misses_total", protocol="macp")
        buckets = self._buckets("macp_router_probe_duration_seconds", protocol="macp")
        count = self._counter("macp_router_probe_duration_seconds_count", protocol="macp")
        total = self._counter("macp_router_probe_duration_seconds_sum", protocol="macp")
        mean = f"{total / count * 1000:.2f} ms" if count else "-"
        p50 = _quantile(0.5, buckets)
        p99 = _quantile(0.99, buckets)
        return (f"<tr><td>fan-outs</td><td class=num>{fanouts:.0f}</td></tr>"
                f"<tr><td>coalesced misses</td><td class=num>{coalesced:.0f}</td></tr>"
                f"<tr><td>mean</td><td class=num>{mean}</td></tr>"
                f"<tr><td>p50 (≤)</td><td class=num>{_ms(p50)}</td></tr>"
                f"<tr><td>p99 (≤)</td><td class=num>{_ms(p99)}</td></tr>")

    def _buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        out = []
        for family in self.metrics.registry.collect():
            if family.name != name:
                continue
            for s in family.samples:
                if s.name == name + "_bucket" and all(s.labels.get(k) == v
                                                      for k, v in labels.items()):
                    out.append((float(s.labels["le"]), s.value))
        return sorted(out)

    def _placements_html(self) -> str:
        rows = []
        for placement in reversed(self.metrics.recent_placements):
            when = time.strftime("%H:%M:%S", time.gmtime(placement.at))
            rows.append(f"<tr><td>{esc(when)}</td><td>{esc(placement.protocol)}</td>"
                        f"<td><code>{esc(short_sid(placement.sid))}</code></td>"
                        f"<td>{esc(placement.pod)}</td><td>{esc(placement.result)}</td></tr>")
        if not rows:
            rows.append("<tr><td colspan=5>no placement yet</td></tr>")
        return "\n".join(rows)


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The upper bound of the bucket holding the q-quantile (None without observations)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    for bound, cumulative in buckets:
        if cumulative >= rank:
            return bound
    return math.inf


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return "&gt; 10 s"
    return f"{seconds * 1000:g} ms"


PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8>
<title>macp-router status</title>
<noscript><meta http-equiv=refresh content="{refresh_s}"></noscript>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:1.2em 2em;color:#1d2430;background:#f7f8fa}}
h1{{font-size:1.4em;margin:0 0 .2em}} h2{{font-size:1.1em;margin:1.4em 0 .4em}}
table{{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}}
th,td{{padding:.35em .7em;border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:top}}
th{{background:#eef1f5;font-weight:600}}
td.num{{text-align:right;font-variant-numeric:tabular-nums}}
.ok{{color:#137333;font-weight:600}} .bad{{color:#b3261e;font-weight:600}}
.warn{{color:#a05a00;font-weight:600}} td.err{{color:#b3261e;max-width:28em;font-size:.9em}}
.bar{{height:.8em;background:#4a78c2;min-width:1px}} td:last-child .bar{{max-width:12em}}
.meta{{color:#555}} .notice{{background:#e6f4ea;padding:.5em}}
.error{{background:#fce8e6;padding:.5em}}
.cols{{display:flex;gap:2em;flex-wrap:wrap}} form.inline{{display:inline;margin:0}}
code{{background:#eef1f5;padding:0 .25em}} .detail{{color:#555}}
</style></head>
<body>
<h1>macp-router</h1>
<p class=meta>version {version} · {readiness} · store {store} · cached sessions {cached} ·
{now} · refreshes every {refresh_s} s</p>
{banner}
<h2>Pods</h2>
<table id=pods>
<tr><th>pod</th><th>address</th><th>health</th><th>feed</th><th>draining</th><th>open</th>
<th>cached</th><th>feed reconnects</th><th>new sessions</th><th>last error</th><th></th></tr>
{pod_rows}
</table>
<p class=meta>{admin_note}</p>
<h2>Background services</h2>
<table id=services>
<tr><th>service</th><th>state</th><th>for</th><th>starts</th><th>crashes</th>
<th>last crash</th></tr>
{service_rows}
</table>
<h2>Where is session X?</h2>
<form method=get action="/" id=lookup>
<input name=session value="{sid}" placeholder="session id" size=40 autocomplete=off>
<button type=submit>locate</button></form>
{lookup}
<div class=cols>
<div><h2>Locate mix</h2>
<table id=locate><tr><th>result</th><th>count</th><th>share</th><th style="width:12em"></th></tr>
{locate}
</table></div>
<div><h2>Probe fan-outs</h2>
<table id=probes>{probes}</table></div>
<div><h2>Recent placements</h2>
<table id=placements><tr><th>time (UTC)</th><th>protocol</th><th>session</th><th>pod</th>
<th>result</th></tr>
{placements}
</table></div>
</div>
<script>
(function tick() {{
  setTimeout(function () {{
    var a = document.activeElement;
    if (a && (a.tagName === "INPUT" || a.tagName === "BUTTON")) {{ tick(); return; }}
    location.replace(location.pathname + location.search.replace(/([?&])notice=[^&]*&?/, "$1"));
  }}, {refresh_ms});
}})();
</script>
</body></html>
"""
