"""A simulated MACP runtime pod: an in-memory `macp.v1.MACPRuntimeService` on grpc.aio.

Job: stand in for one macp-runtime v0.6.1 pod in tests, the demo and load tests, faithfully
enough that the Python SDK and the router cannot tell the difference on the paths the router
cares about: session placement (SessionStart), per-session routing (Send, StreamSession,
GetSession, Cancel/Suspend/Resume), fan-out reads (ListSessions, WatchSessions, WatchSignals)
and broadcast registries (policies, ext modes). `docs/runtime-compat.md` lists every behaviour,
the runtime source it comes from and the test that covers it.

By default the pod is as strict as the runtime:
- Auth where the runtime requires it (token entries in the runtime's MACP_AUTH_TOKENS_JSON
  shape, `router.sim.auth`; no built-in observers). With no entries the pod refuses to start
  unless `allow_insecure` (dev mode: any bearer token is a full identity named by the token);
  plaintext also needs `allow_insecure`, as the runtime requires TLS otherwise.
- Per-sender rate limits on (60 starts / 600 messages per minute); RATE_LIMITED.
- WatchSessions' snapshot holds every in-memory session, terminal ones too; ListSessions is
  one unpaged reply (page_size / page_token ignored).
- Registries live in memory only (empty after a restart; the state file holds sessions only);
  duplicates are answered in-band (`ok=false`, "... is already registered"); writes need
  `can_manage_mode_registry` (PERMISSION_DENIED); with `policies_dir` set, Register/
  UnregisterPolicy are FAILED_PRECONDITION.
- StreamSession ends the stream for UNAUTHENTICATED, INTERNAL, RESOURCE_EXHAUSTED,
  INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS and answers every other error inline with a
  `MACPError` whose code and message are the status message (an unknown session:
  "UnknownSession"), keeping the stream open.
- SessionStart ids must be a lowercase UUID v4/v7 or base64url of 22+ chars (INVALID_SESSION_ID).
- Session-scoped Progress is accepted without looking the session up.
- grpc.health.v1 always answers SERVING (`health=False` removes the service, as in runtimes
  built before it existed: Health/Check is UNIMPLEMENTED).
- At most 128 concurrent streams per connection (HTTP/2 setting) and 64 requests in flight per
  connection (more wait in a queue, as tonic's concurrency limit does).
- Terminal sessions are evicted silently from memory `session_retention_s` (3600) after they
  started, by a sweep every `cleanup_interval_s` (60).
Kinder behaviour exists only behind explicit constructor arguments (raised rate limits,
`allow_insecure` dev mode, a shorter retention) that tests and the demo name.

Invariants:
- The event loop is the only lock: every state change and its lifecycle event happen in one
  synchronous step, so a WatchSessions subscriber registered together with its snapshot sees
  every later change exactly once and nothing twice.
- Protocol errors of Send come back inside a gRPC OK (`Ack.ok == false`, registry code in
  `Ack.error.code`); errors of the other RPCs are gRPC statuses (the sim adds the registry code
  in a `macp-error-code` trailer for tests; the runtime sends no such trailer and nothing in the
  router reads it).
- The per-call path is O(1) in the number of sessions (ListSessions and the snapshot are
  O(sessions), as the runtime's are); no per-call logging. Persistence is write-behind with a
  short debounce and flushed on stop.
- Every task and timer the pod creates is referenced by the pod and cancelled on stop.

Layout (each module states its own job and invariants): `SimPod` here owns the gRPC server,
start/stop and the test instrumentation, and composes
- `protocol`: constants, error codes, Acks and statuses (the wire vocabulary);
- `admission`: token -> identity, registry rights, authorize_mode + rate limits, envelope shape;
- `engine`: the session engine (start, message, control, expiry, eviction) over `record`;
- `registries`: ext modes, promotion, policies, and Initialize / GetManifest / ListModes;
- `bus`: the lifecycle-event bus and WatchSessions / WatchSignals subscribers;
- `persistence`: the state file; `limits`: per-connection in-flight limits;
- `servicer`: the gRPC handlers, and `stream`: one StreamSession call.

Instrumentation for tests: `calls` (Counter per method), `cancelled_calls` (Counter per method
of handlers that observed a client cancellation or deadline), `hang` (every MACP method awaits
forever while set; health is unaffected), `drop_watchers()`, `sessions` (sid -> SessionRecord),
`max_in_flight` (the most requests seen in flight on one connection).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from macp.v1 import core_pb2, core_pb2_grpc, policy_pb2

from router.sim.admission import Admission
from router.sim.auth import (
    DEFAULT_MESSAGE_LIMIT_PER_MINUTE,
    DEFAULT_START_LIMIT_PER_MINUTE,
    Identity,
    JwtHs256,
    RateLimiter,
    load_token_file,
    parse_token_entries,
)
from router.sim.bus import LifecycleBus
from router.sim.engine import SessionEngine
from router.sim.limits import ConnectionLimits
from router.sim.mailbox import Subscriber
from router.sim.persistence import StateFile
from router.sim.protocol import (
    CLEANUP_INTERVAL_S,
    CONCURRENCY_LIMIT_PER_CONNECTION,
    MAX_CONCURRENT_STREAMS,
    SERVICE_NAME,
    SESSION_RETENTION_S,
    valid_session_id,
)
from router.sim.record import SessionRecord
from router.sim.registries import Registries
from router.sim.servicer import Health, Servicer

__all__ = ["SessionRecord", "SimPod", "serve_pod", "valid_session_id"]

log = logging.getLogger("router.sim")


class SimPod:
    """One simulated runtime pod. See the module docstring for behaviour and invariants.

    Public attributes: `name`, `port`, `address` (after start), `calls`, `cancelled_calls`,
    `hang`, `sessions`, `identities`, `policies`, `ext_modes`, `promoted_modes`,
    `max_in_flight`, `queued_calls`.

    Configuration (each argument is the runtime's environment variable of the same meaning):
    `auth_tokens` (MACP_AUTH_TOKENS_JSON: JSON text or parsed entries), `auth_tokens_file`
    (MACP_AUTH_TOKENS_FILE), `allow_insecure` (MACP_ALLOW_INSECURE=1: plaintext, and dev-mode
    auth when no tokens are configured), `start_limit_per_minute` /
    `message_limit_per_minute` (MACP_SESSION_START_LIMIT_PER_MINUTE /
    MACP_MESSAGE_LIMIT_PER_MINUTE), `policies_dir` (MACP_POLICIES_DIR: the policy registry is
    read-only; the directory itself is not read), `max_concurrent_streams`
    (MACP_MAX_CONCURRENT_STREAMS), `concurrency_limit_per_connection`
    (MACP_CONCURRENCY_LIMIT_PER_CONNECTION), `session_retention_s`
    (MACP_SESSION_RETENTION_SECS), `cleanup_interval_s` (MACP_CLEANUP_INTERVAL_SECS),
    `max_payload_bytes` (MACP_MAX_PAYLOAD_BYTES). `health=False` is a runtime built before
    grpc.health.v1 existed.
    """

    def __init__(
        self,
        name: str,
        listen: str = "127.0.0.1:0",
        *,
        state_file: str | None = None,
        auth_tokens: str | Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None,
        auth_tokens_file: str | None = None,
        allow_insecure: bool = False,
        start_limit_per_minute: int = DEFAULT_START_LIMIT_PER_MINUTE,
        message_limit_per_minute: int = DEFAULT_MESSAGE_LIMIT_PER_MINUTE,
        policies_dir: str | None = None,
        health: bool = True,
        max_concurrent_streams: int = MAX_CONCURRENT_STREAMS,
        concurrency_limit_per_connection: int = CONCURRENCY_LIMIT_PER_CONNECTION,
        session_retention_s: float = SESSION_RETENTION_S,
        cleanup_interval_s: float = CLEANUP_INTERVAL_S,
        max_payload_bytes: int = 1_048_576,
        server_credentials: grpc.ServerCredentials | None = None,
        jwt: JwtHs256 | None = None,
    ) -> None:
        self.name = name
        self.server_credentials = server_credentials
        self.listen = listen
        self.state_file = state_file
        self.start_limit_per_minute = start_limit_per_minute
        self.message_limit_per_minute = message_limit_per_minute
        self.health_enabled = health
        self.max_concurrent_streams = max_concurrent_streams
        self.cleanup_interval_s = cleanup_interval_s
        self.port: int = 0
        self.address: str = ""
        self.calls: collections.Counter[str] = collections.Counter()
        self.cancelled_calls: collections.Counter[str] = collections.Counter()
        self._hang = False
        self._hang_waiters: set[asyncio.Future[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: grpc.aio.Server | None = None
        self._health: Health | None = None
        self._stopping = False

        self.sessions: dict[str, SessionRecord] = {}  # in creation order
        self.admission = Admission(
            _identities(auth_tokens, auth_tokens_file),
            jwt=jwt,
            allow_insecure=allow_insecure,
            rate_limits=RateLimiter(start_limit_per_minute, message_limit_per_minute),
            max_payload_bytes=max_payload_bytes,
        )
        self.registries = Registries(name, policies_read_only=policies_dir is not None)
        self.bus = LifecycleBus()
        self.limits = ConnectionLimits(concurrency_limit_per_connection)
        self.persistence = StateFile(state_file, name, self.sessions)
        self.engine = SessionEngine(
            name, admission=self.admission, registries=self.registries, bus=self.bus,
            state=self.persistence, sessions=self.sessions, session_retention_s=session_retention_s,
        )

    # ── configuration and state, as attributes of the pod ──────────────
    @property
    def jwt(self) -> JwtHs256 | None:
        """The runtime's JWT resolver (MACP_AUTH_ISSUER + an HS256 JWKS key), if configured."""
        return self.admission.jwt

    @property
    def allow_insecure(self) -> bool:
        return self.admission.allow_insecure

    @property
    def identities(self) -> dict[str, Identity]:
        return self.admission.identities

    @property
    def rate_limits(self) -> RateLimiter:
        return self.admission.rate_limits

    @property
    def max_payload_bytes(self) -> int:
        return self.admission.max_payload_bytes

    @property
    def policies_read_only(self) -> bool:
        return self.registries.policies_read_only

    @property
    def policies(self) -> dict[str, policy_pb2.PolicyDescriptor]:
        return self.registries.policies

    @property
    def ext_modes(self) -> dict[str, core_pb2.ModeDescriptor]:
        return self.registries.ext_modes

    @property
    def promoted_modes(self) -> dict[str, core_pb2.ModeDescriptor]:
        return self.registries.promoted_modes

    @property
    def session_retention_s(self) -> float:
        return self.engine.session_retention_s

    @session_retention_s.setter
    def session_retention_s(self, value: float) -> None:
        self.engine.session_retention_s = value

    @property
    def concurrency_limit_per_connection(self) -> int:
        return self.limits.limit

    @property
    def max_in_flight(self) -> int:
        """The most requests seen in flight on one connection."""
        return self.limits.max_in_flight

    @property
    def queued_calls(self) -> int:
        """Requests that waited for a per-connection slot."""
        return self.limits.queued_calls

    @property
    def _session_watchers(self) -> set[Subscriber]:
        """The WatchSessions subscribers (fault-injection tests mark them lagged)."""
        return self.bus.session_watchers

    # ── lifecycle ──────────────────────────────────────────────────────
    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"pod {self.name} already started")
        self._check_startup_config()
        self._stopping = False
        self.persistence.stopping = False
        self._reset_state()
        self.persistence.load()
        server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.max_receive_message_length", self.max_payload_bytes + 64 * 1024),
        ])
        core_pb2_grpc.add_MACPRuntimeServiceServicer_to_server(Servicer(self), server)
        self._health = None
        if self.health_enabled:
            self._health = Health(self)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self._bind(server)
        await server.start()
        self._server = server
        if self._health is not None:
            for service in ("", SERVICE_NAME):
                await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.engine.arm_all_timers()
        self.spawn(self._cleanup_loop())

    def _bind(self, server: grpc.aio.Server) -> None:
        """Bind the listen address (a restart keeps its port); set `port` and `address`."""
        listen = self.listen
        host, _, port_s = listen.rpartition(":")
        if self.port and port_s == "0":  # a restart keeps its address
            listen = f"{host}:{self.port}"
        if self.server_credentials is None:
            self.port = server.add_insecure_port(listen)
        else:
            self.port = server.add_secure_port(listen, self.server_credentials)
        if not self.port:
            raise RuntimeError(f"pod {self.name} could not bind {listen}")
        connect_host = "127.0.0.1" if host in ("", "0.0.0.0", "[::]", "::", "*") else host
        self.address = f"{connect_host}:{self.port}"

    def _check_startup_config(self) -> None:
        """Refuse to start where the runtime refuses to (src/main.rs), with its reasons."""
        if not self.identities and self.jwt is None and not self.allow_insecure:
            raise RuntimeError(
                f"pod {self.name}: no authentication configured: give auth_tokens / "
                "auth_tokens_file (MACP_AUTH_TOKENS_JSON / MACP_AUTH_TOKENS_FILE), or opt into "
                "dev-mode auth with allow_insecure (MACP_ALLOW_INSECURE=1, local development only)"
            )
        if self.server_credentials is None and not self.allow_insecure:
            raise RuntimeError(
                f"pod {self.name}: TLS is required unless allow_insecure (MACP_ALLOW_INSECURE=1): "
                "give server_credentials or allow_insecure"
            )

    async def _cleanup_loop(self) -> None:
        """The runtime's cleanup tick: evict terminal sessions past the retention window."""
        while True:
            await asyncio.sleep(self.cleanup_interval_s)
            self.evict_stale_sessions()


    def evict_stale_sessions(self) -> int:
        """Drop terminal sessions started more than `session_retention_s` ago; no event.

        The runtime removes them from memory only (its disk keeps them); the sim has no disk
        beyond the state file, so they leave the state file too.
        """
        return self.engine.evict_stale_sessions()

    async def stop(self, grace: float | None = 0) -> None:
        server = self._server
        if server is None:
            return
        self._stopping = True
        self.persistence.stopping = True
        # No health flip here: the runtime answers SERVING until its server is gone.
        self.bus.close_all()
        await server.stop(grace)
        self._server = None
        for rec in self.sessions.values():
            if rec.timer is not None:
                rec.timer.cancel()
                rec.timer = None
        await self.flush()  # first: a write-behind in flight must finish, not be cut off
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def flush(self) -> None:
        """Write the state file now (no-op without one)."""
        await self.persistence.flush()

    async def __aenter__(self) -> SimPod:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def set_serving(self, serving: bool) -> None:
        """Flip the health status (both service names) without stopping the pod."""
        if self._health is None:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    def drop_watchers(self) -> None:
        """End every current WatchSessions stream with OK (a dropped slow consumer)."""
        self.bus.drop_session_watchers()

    @property
    def watcher_count(self) -> int:
        """Open WatchSessions streams."""
        return len(self.bus.session_watchers)

    @property
    def signal_watcher_count(self) -> int:
        """Open WatchSignals streams."""
        return len(self.bus.signal_watchers)

    def session_state(self, session_id: str) -> int | None:
        rec = self.sessions.get(session_id)
        return rec.metadata.state if rec is not None else None

    def _reset_state(self) -> None:
        for rec in self.sessions.values():
            if rec.timer is not None:
                rec.timer.cancel()
        self.sessions.clear()
        self.registries.clear()  # registries live in memory only: a restart starts empty
        self.limits.clear()
        self.persistence.reset()
        self.bus.clear()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run `coro` as a task the pod references and cancels on stop."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ── test instrumentation ───────────────────────────────────────────
    @property
    def hang(self) -> bool:
        """While True every MACP method waits (health is unaffected); False releases them."""
        return self._hang

    @hang.setter
    def hang(self, value: bool) -> None:
        self._hang = value
        if not value:
            for waiter in self._hang_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._hang_waiters.clear()

    async def _hang_forever(self) -> None:
        """Wait until `hang` is cleared (called by every MACP handler while it is set).

        A subclass may override it to model a slow pod instead (tests/faults/test_shutdown.py).
        """
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hang_waiters.add(waiter)
        try:
            await waiter
        finally:
            self._hang_waiters.discard(waiter)

    def note_cancelled(self, method: str) -> None:
        """Count a handler that saw its client cancel (not the pod's own stop)."""
        if not self._stopping:
            self.cancelled_calls[method] += 1


def _identities(
    auth_tokens: str | Sequence[Mapping[str, Any]] | Mapping[str, Any] | None,
    auth_tokens_file: str | None,
) -> dict[str, Identity]:
    """The static token entries; the JSON wins over the file, as the runtime's environment."""
    identities: dict[str, Identity] = {}
    if auth_tokens is not None:
        identities.update(parse_token_entries(auth_tokens))
    if auth_tokens_file is not None and auth_tokens is None:
        identities.update(load_token_file(auth_tokens_file))
    return identities


async def serve_pod(listen: str, name: str, state_file: str | None, **options: Any) -> None:
    """Run one simulated pod until cancelled or SIGTERM/SIGINT (the `macp-router pod` command).

    `options` are SimPod's keyword arguments (auth, rate limits, health, ...). Logs exactly one
    line containing `ready` and the bound address once serving.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    pod = SimPod(name, listen, state_file=state_file, **options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    await pod.start()
    try:
        log.info("sim pod %s ready on %s", name, pod.address)
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await pod.stop(grace=1.0)
