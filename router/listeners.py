"""The router's listening ports: client gRPC (`--listen`), admin gRPC, operations HTTP.

Job: bind every port at start-up, before any pod is contacted, so an unusable address fails
at once with one line naming the flag; start serving the client port only when the router is
ready to route (`serve()`, the last start-up stage); stop the client port first and gracefully
(`stop_serving(grace)`), the admin and HTTP ports last (`close()`), so an operator can read
`/readyz` and the pod table while the router drains.

Invariants:
- A port that cannot be bound raises `ListenError` naming the flag and the address.
- `close()` releases every port that is still bound, also after a start-up that failed
  half-way (bound, never served); it is idempotent.
- The admin API is on the client port only with an admin token or on a loopback client port;
  otherwise on its own port (`--admin-listen`, loopback 127.0.0.1:50052 by default).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router import routes
from router.admin import RouterAdmin
from router.config import RouterConfig, parse_host_port
from router.metrics import Metrics
from router.opshttp import OpsHttpServer, ops_app
from router.statuspage import StatusPage
from router.v1 import router_pb2_grpc

DEFAULT_ADMIN_LISTEN = "127.0.0.1:50052"
"""The admin port when the client port may not carry the admin API and none is configured."""


class ListenError(RuntimeError):
    """The listen address cannot be bound."""


def server_credentials(config: RouterConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    client_ca = config.read_file(config.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(config.read_file(config.tls_key), config.read_file(config.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _bind(server: grpc.aio.Server, address: str, flag: str,
          credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        port, detail = 0, str(exc)
    else:
        detail = "port unavailable"
    if not port:
        raise ListenError(
            f"cannot listen on {flag} {address}: {detail} (is another process using it?)"
        )
    return port


class Listeners:
    """The three ports of one router; see the module docstring."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        admin: RouterAdmin,
        health_servicer: health.aio.HealthServicer,
        metrics: Metrics,
        snapshot: Callable[[], dict[str, Any]],
    ) -> None:
        self.config = config
        self.admin = admin
        self.health_servicer = health_servicer
        self.metrics = metrics
        self.snapshot = snapshot
        self.server: grpc.aio.Server | None = None
        self.admin_server: grpc.aio.Server | None = None
        self._http: OpsHttpServer | None = None
        self.port = 0
        self.admin_port = 0
        self.metrics_port = 0

    def _options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.so_reuseport", 1 if self.config.reuse_port else 0),
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            ("grpc.max_concurrent_streams", self.config.max_concurrent_streams),
        ]

    async def bind(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Bind the client port (served later by `serve()`); start the admin and HTTP ports."""
        server = grpc.aio.server(options=self._options())
        if self.config.admin_on_main_port:
            router_pb2_grpc.add_RouterAdminServicer_to_server(self.admin, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, server)
        reflection.enable_server_reflection(
            (routes.SERVICE, "router.v1.RouterAdmin", health.SERVICE_NAME,
             reflection.SERVICE_NAME),
            server,
        )
        for handler in handlers:
            server.add_generic_rpc_handlers((handler,))
        self.port = _bind(server, self.config.listen, "--listen", server_credentials(self.config))
        self.server = server
        await self._start_admin_server()
        self._start_http()

    async def _start_admin_server(self) -> None:
        address = self.config.admin_listen
        if address is None and not self.config.admin_on_main_port:
            address = DEFAULT_ADMIN_LISTEN
        if address is None:
            return
        server = grpc.aio.server(options=self._options())
        router_pb2_grpc.add_RouterAdminServicer_to_server(self.admin, server)
        self.admin_port = _bind(server, address, "--admin-listen", None)
        await server.start()
        self.admin_server = server

    def _start_http(self) -> None:
        """/metrics, /healthz, /readyz and the status page (router.opshttp)."""
        if not self.config.metrics_listen:
            return
        host, port = parse_host_port(self.config.metrics_listen, "--metrics-listen")
        page = StatusPage(
            admin=self.admin, metrics=self.metrics, health_snapshot=self.snapshot,
            loop=asyncio.get_running_loop(), admin_token=self.config.admin_token,
        )
        try:
            self._http = OpsHttpServer(host, port, ops_app(self.metrics.registry, self.snapshot,
                                                           page))
        except OSError as exc:
            raise ListenError(
                f"cannot listen on --metrics-listen {self.config.metrics_listen}: {exc.strerror}"
            ) from None
        self.metrics_port = self._http.port

    async def serve(self) -> None:
        assert self.server is not None, "bind() first"
        await self.server.start()

    async def stop_serving(self, grace: float) -> None:
        """No new calls on the client port; calls in flight get `grace` seconds."""
        server, self.server = self.server, None
        if server is not None:
            await server.stop(grace)

    async def close(self) -> None:
        await self.stop_serving(0)  # bound but never served: a start that failed half-way
        if self.admin_server is not None:
            await self.admin_server.stop(0)
            self.admin_server = None
        if self._http is not None:
            self._http.close()
            self._http = None
