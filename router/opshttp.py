"""The operations HTTP endpoint (`--metrics-listen`): /metrics, /healthz, /readyz, status page.

Served by a small threaded WSGI server on its own thread, so a slow scrape never blocks the
event loop. Routes:

- `GET|HEAD /metrics`: Prometheus exposition of the router's registry.
- `GET|HEAD /healthz` (and `/livez`): 200 while the process runs.
- `GET|HEAD /readyz`: 200 while a pod is healthy, else 503; JSON detail either way.
- `GET|HEAD /` and `/session?id=SID`: the status page (`router.statuspage`); `POST /drain`
  and `POST /undrain` are its admin-token-guarded buttons.

Invariants: an unknown path answers 404 (never metrics); HEAD answers every GET route with
the GET's status and headers and no body; a known path with another method answers 405 with
`Allow`. Nothing here changes routing except the drain buttons, which go through the admin
API's own code path and its token check.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

StartResponse = Callable[..., Any]
Environ = dict[str, Any]
WsgiApp = Callable[[Environ, StartResponse], Iterable[bytes]]

GET_ROUTES = ("/metrics", "/healthz", "/livez", "/readyz", "/", "/session")
POST_ROUTES = ("/drain", "/undrain")


def _plain(start_response: StartResponse, status: str, text: str,
           headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *(headers or [])])
    return [body]


def ops_app(
    registry: CollectorRegistry,
    health_snapshot: Callable[[], dict[str, Any]],
    status_page: WsgiApp | None = None,
) -> WsgiApp:
    """The WSGI application: routes by path and method as the module docstring says."""
    metrics_app = make_wsgi_app(registry)

    def get(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path in ("/healthz", "/livez"):
            body = b'{"alive": true}\n'
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if path == "/readyz":
            snapshot = health_snapshot()
            body = (json.dumps(snapshot, sort_keys=True) + "\n").encode()
            status = "200 OK" if snapshot.get("ready") else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(body)))])
            return [body]
        if status_page is None:
            return _plain(start_response, "404 Not Found", "no status page on this router\n")
        return status_page(environ, start_response)

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if path not in GET_ROUTES and path not in POST_ROUTES:
            return _plain(start_response, "404 Not Found",
                          f"404 not found: {path[:200]!r}; try /metrics, /healthz, /readyz or /\n")
        allowed = ("POST",) if path in POST_ROUTES else ("GET", "HEAD")
        if method not in allowed:
            return _plain(start_response, "405 Method Not Allowed",
                          f"405: {method} is not allowed on {path}\n",
                          [("Allow", ", ".join(allowed))])
        if method == "POST":
            if status_page is None:
                return _plain(start_response, "404 Not Found", "no status page on this router\n")
            return status_page(environ, start_response)
        if method == "HEAD":
            # Answer exactly as GET would (status, headers, Content-Length), without the body:
            # wsgiref does not strip it.
            answer: list[Any] = []
            body = b"".join(get(dict(environ, REQUEST_METHOD="GET"),
                                lambda status, headers, *exc: answer.extend((status, headers))))
            status, headers = answer
            if not any(name.lower() == "content-length" for name, _ in headers):
                headers = [*headers, ("Content-Length", str(len(body)))]
            start_response(status, headers)
            return [b""]
        return get(environ, start_response)

    return app


class OpsHttpServer:
    """The threaded HTTP server of `ops_app` on `host:port` (port 0: any free port)."""

    def __init__(self, host: str, port: int, app: WsgiApp) -> None:
        """Bind and serve on a daemon thread; OSError when the address cannot be bound."""
        self._server: WSGIServer | None = make_server(
            host, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="ops-http",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
