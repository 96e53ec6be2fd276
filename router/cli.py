"""`macp-router`: the command line. The only module that reads flags and the environment.

Every flag of every subcommand can also be given as `MACP_ROUTER_<FLAG>` (dashes become
underscores: `--redis-url` -> `MACP_ROUTER_REDIS_URL`); a flag on the command line wins.
Bad input exits with status 2 and one line saying what is wrong and what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

import grpc

from router import __version__

ENV_PREFIX = "MACP_ROUTER_"
EXIT_USAGE = 2
EXIT_FAILURE = 1


def _env(flag: str) -> str | None:
    return os.environ.get(ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(parser: argparse.ArgumentParser, flag: str, *, help: str, **kwargs: object) -> None:
    """A flag whose default comes from MACP_ROUTER_<FLAG> when set."""
    env_value = _env(flag)
    env_name = ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
    if kwargs.get("action") == "store_true":
        if env_value is not None:
            kwargs["default"] = env_value.lower() in ("1", "true", "yes", "on")
    elif env_value is not None:
        kwargs["default"] = env_value
        kwargs.pop("required", None)
    parser.add_argument(flag, help=f"{help} [env {env_name}]", **kwargs)  # type: ignore[arg-type]


def _log_flags(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "--log-format", default="text", choices=["text", "json"],
          help="text lines, or one JSON object per line (time, level, logger, message and "
          "fields such as pod, method, code, duration_ms)")
    _flag(parser, "--log-session-ids", action="store_true",
          help="log full session ids (default: the first 8 characters and '…'; ids can act "
          "as capabilities)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="macp-router",
        description=(
            "Route MACP sessions to the runtime pod that holds them. Clients talk to the "
            "router exactly as to one runtime (macp.v1.MACPRuntimeService); the router keeps a "
            "session->pod cache fed by each pod's WatchSessions stream, probes all pods on a "
            "miss, and places new sessions on a chosen pod."
        ),
        epilog="Every flag can also be set as MACP_ROUTER_<FLAG>, e.g. MACP_ROUTER_PODS.",
    )
    parser.add_argument("--version", action="version", version=f"macp-router {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    serve = sub.add_parser(
        "serve", help="run the router",
        description="Run the router in front of runtime pods. Logs one line when ready; "
        "SIGTERM stops accepting calls, drains in-flight ones and exits.",
    )
    _flag(serve, "--listen", default="0.0.0.0:50051", metavar="HOST:PORT",
          help="where clients connect (gRPC)")
    _flag(serve, "--pods", metavar="NAME=HOST:PORT[,...]",
          help="runtime pods by stable name, e.g. a=10.0.0.5:50051,b=10.0.0.6:50051")
    _flag(serve, "--pods-dns", metavar="HOST:PORT",
          help="discover pods from a headless Service's DNS name instead of --pods")
    _flag(serve, "--redis-url", metavar="URL",
          help="share the session->pod store with other router replicas: "
          "redis://HOST:PORT/DB (rediss:// for TLS), "
          "redis+cluster://HOST:PORT[,HOST:PORT...] (Redis Cluster seeds; rediss+cluster://), "
          "or redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB] (sentinels; "
          "rediss+sentinel://); default: in-memory store")
    _flag(serve, "--redis-prefix", default="mrouter:", metavar="PREFIX",
          help="key prefix in Redis")
    _flag(serve, "--redis-required", action="store_true",
          help="exit instead of starting degraded when Redis is unreachable at start-up")
    _flag(serve, "--metrics-listen", metavar="HOST:PORT",
          help="serve Prometheus /metrics and /healthz, /readyz over HTTP here")
    _flag(serve, "--token", metavar="TOKEN",
          help="the router's own bearer token for its watch feeds, ListSessions reconciles, "
          "GetSession probes and registry replays (client calls always carry the client's "
          "token). The runtime authenticates all of these, so serve refuses to start without "
          "--token or --token-file. On each runtime give it an entry like {\"token\": \"...\", "
          "\"sender\": \"macp-router\", \"is_observer\": true, "
          "\"can_manage_mode_registry\": true}: observer so probes read any session, "
          "registry rights so registrations are replayed to new pods")
    _flag(serve, "--token-file", metavar="PATH",
          help="read the router's token from this file instead, and re-read it when it changes "
          "(rotated JWTs, a re-mounted Secret) without a restart; wins over --token")
    _flag(serve, "--admin-token", metavar="TOKEN",
          help="bearer token the admin API requires (drain always; reads unless "
          "--admin-open-reads)")
    _flag(serve, "--probe-timeout-ms", type=int, default=250, metavar="MS",
          help="how long a miss waits for each pod's status answer")
    _flag(serve, "--negative-cache-ms", type=int, default=1000, metavar="MS",
          help="how long 'no pod holds this session' is remembered")
    _flag(serve, "--retention-s", type=float, default=600.0, metavar="SECONDS",
          help="how long the router remembers which pod holds an ended (resolved, expired, "
          "cancelled) session, so calls on it get that pod's own answer. The runtime keeps an "
          "ended session in memory until MACP_SESSION_RETENTION_SECS (default 3600) after it "
          "STARTED and repeats it in every WatchSessions snapshot and ListSessions reply until "
          "then (a reconnect rewrites nothing the router already knows); after that the pod "
          "answers NOT_FOUND. Keep this at or below the runtime's retention: longer only "
          "remembers a pod that no longer has the session")
    _flag(serve, "--channels-per-pod", type=int, default=2, metavar="N",
          help="gRPC connections per pod at start (the runtime allows 128 streams and 64 "
          "requests in flight per connection; the pool grows with load)")
    _flag(serve, "--max-channels-per-pod", type=int, default=16, metavar="N",
          help="most connections the pool opens to one pod (100 streams / 48 unary calls in "
          "flight per connection before it adds one)")
    _flag(serve, "--max-list-bytes", type=int, default=256 * 1024 * 1024, metavar="N",
          help="receive limit for one pod's whole ListSessions reply (the runtime does not "
          "page it; ~300 bytes per in-memory session)")
    _flag(serve, "--placement", default="least-sessions-p2c",
          choices=["least-sessions-p2c", "round-robin"], help="placement policy for new sessions")
    _flag(serve, "--shutdown-grace-s", type=float, default=10.0, metavar="SECONDS",
          help="how long SIGTERM waits for in-flight calls")
    _flag(serve, "--workers", default="1", metavar="N|auto",
          help="router processes sharing the listen port (SO_REUSEPORT); auto = cores")
    _flag(serve, "--log-level", default="info", choices=["debug", "info", "warning", "error"],
          help="log verbosity (debug adds one access line per routed call)")
    _log_flags(serve)
    _flag(serve, "--otel", action="store_true",
          help="export traces (OpenTelemetry, the otel extra): a span per routed call with "
          "locate, probe fan-out, store and forward spans, continuing the client's "
          "traceparent; the exporter follows the OTEL_* variables (OTEL_TRACES_EXPORTER="
          "otlp|console|none, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...)")
    _flag(serve, "--acp-listen", metavar="HOST:PORT",
          help="also serve ACP agents here (ACP's Streamable HTTP / WebSocket transport, "
          "path /acp)")
    _flag(serve, "--acp-pods", metavar="NAME=http://HOST:PORT/acp[,...]",
          help="ACP agent pods by stable name (with --acp-listen)")
    _flag(serve, "--acp-upstream", default="ws", choices=["ws", "http"],
          help="how the router talks to ACP pods: ws (acp's WebSocket on the pod's endpoint; "
          "stock acp 0.12.1 pods need it for prompts after session/load) or http")
    security = serve.add_argument_group("security and limits")
    _flag(security, "--admin-listen", metavar="HOST:PORT",
          help="serve the admin API (router.v1.RouterAdmin) here too; without --admin-token "
          "the admin API is served only on loopback (this address, default 127.0.0.1:50052, or "
          "--listen when that is loopback)")
    _flag(security, "--admin-open-reads", action="store_true",
          help="let SessionStatus/ListPods through without --admin-token (drain always needs "
          "it)")
    _flag(security, "--tls-cert", metavar="PEM", help="TLS certificate for the client port")
    _flag(security, "--tls-key", metavar="PEM", help="TLS private key for the client port")
    _flag(security, "--tls-client-ca", metavar="PEM",
          help="require client certificates signed by this CA (mTLS)")
    _flag(security, "--pod-ca", metavar="PEM", help="dial pods over TLS, trusting this CA")
    _flag(security, "--pod-cert", metavar="PEM", help="client certificate for mTLS to pods")
    _flag(security, "--pod-key", metavar="PEM", help="client key for mTLS to pods")
    _flag(security, "--scope-discovery", action="store_true",
          help="show ListSessions/WatchSessions callers only sessions they take part in "
          "(participants, initiator) unless their token is an observer")
    _flag(security, "--observer-tokens", metavar="TOKEN[,TOKEN]",
          help="bearer tokens that may see every session under --scope-discovery")
    _flag(security, "--auth-tokens-file", metavar="PATH",
          help="the runtime's token entries (MACP_AUTH_TOKENS_FILE, or MACP_AUTH_TOKENS_JSON "
          "saved to a file), so --scope-discovery identifies static tokens as the pods do "
          "(token -> sender; is_observer entries see everything; unknown tokens see nothing). "
          "JWTs are identified by their sub claim. Without it: dev mode, the token is the "
          "sender")
    _flag(security, "--auth-tokens-json", metavar="PATH",
          help="older name of --auth-tokens-file")
    _flag(security, "--max-message-bytes", type=int, default=16 * 1024 * 1024, metavar="N",
          help="largest request or response the router passes")
    _flag(security, "--max-concurrent-streams", type=int, default=256, metavar="N",
          help="concurrent calls per client connection")

    pod = sub.add_parser(
        "pod", help="run a simulated MACP runtime pod (tests, demo, load tests)",
        description="A faithful in-memory MACP runtime pod for tests and demos.",
    )
    _flag(pod, "--listen", required=True, metavar="HOST:PORT", help="where the pod listens")
    _flag(pod, "--name", required=True, metavar="NAME", help="the pod's stable name")
    _flag(pod, "--state-file", metavar="PATH",
          help="persist sessions here so a restarted pod replays them")
    _flag(pod, "--auth-tokens-json", metavar="JSON",
          help="token entries in the runtime's MACP_AUTH_TOKENS_JSON shape: [{\"token\", "
               "\"sender\", \"is_observer\", \"can_manage_mode_registry\", ...}]")
    _flag(pod, "--auth-tokens-file", metavar="PATH",
          help="the same entries from a file (MACP_AUTH_TOKENS_FILE); the JSON flag wins")
    _flag(pod, "--allow-insecure", action="store_true", default=False,
          help="MACP_ALLOW_INSECURE=1: serve plaintext and, with no token entries, dev-mode "
               "auth (any bearer token is a full identity named by the token); without it and "
               "without token entries the pod refuses to start, as the runtime does")
    _flag(pod, "--session-start-limit-per-minute", type=int, default=60, metavar="N",
          help="per-sender SessionStart rate limit (the runtime's default: 60)")
    _flag(pod, "--message-limit-per-minute", type=int, default=600, metavar="N",
          help="per-sender message rate limit (the runtime's default: 600)")
    _flag(pod, "--policies-dir", metavar="DIR",
          help="as MACP_POLICIES_DIR: the policy registry becomes read-only "
               "(RegisterPolicy answers FAILED_PRECONDITION); the directory is not read")
    _flag(pod, "--session-retention-s", type=float, default=3600.0, metavar="S",
          help="terminal sessions leave memory this long after they started "
               "(MACP_SESSION_RETENTION_SECS)")
    _flag(pod, "--no-health", action="store_true", default=False,
          help="serve no grpc.health.v1 (a runtime built before it: Health/Check UNIMPLEMENTED)")
    _flag(pod, "--log-level", default="info", choices=["debug", "info", "warning", "error"],
          help="log verbosity")
    _log_flags(pod)

    acp_pod = sub.add_parser(
        "acp-pod", help="run a simulated ACP agent pod (tests, demo)",
        description="A simulated ACP agent served over ACP's Streamable HTTP transport "
        "(acp.http.AcpServer); session history in --sessions-dir, which pods may share.",
    )
    _flag(acp_pod, "--listen", required=True, metavar="HOST:PORT", help="where the pod listens")
    _flag(acp_pod, "--name", required=True, metavar="NAME", help="the pod's stable name")
    _flag(acp_pod, "--sessions-dir", default="acp-sessions", metavar="DIR",
          help="session history (shared by pods, so any pod can session/load any session)")
    _flag(acp_pod, "--log-level", default="info", choices=["debug", "info", "warning", "error"],
          help="log verbosity")
    _log_flags(acp_pod)

    demo = sub.add_parser(
        "demo", help="3 simulated pods + a router + the macp_sdk client, end to end",
        description="Start 3 simulated pods and a router on free loopback ports (in-memory "
        "store), drive a real session flow through the router with the macp_sdk client, and "
        "show which pod holds each session and how the router located it.",
    )
    _flag(demo, "--sessions", type=int, default=6, metavar="N",
          help="sessions to start (default 6)")
    _flag(demo, "--acp", action="store_true",
          help="show the ACP front door instead: 3 simulated ACP pods, the acp client's "
          "reconnect flow (status, prompt, pod restart, load)")

    status = sub.add_parser(
        "status", help="where does a session live? live | not_found | unknown",
        description="Ask a running router where a session lives (the answer it routes by).",
    )
    status.add_argument("session_id", metavar="SESSION_ID")
    _flag(status, "--router", default="127.0.0.1:50051", metavar="HOST:PORT",
          help="the router's gRPC address")
    _flag(status, "--probe", action="store_true",
          help="ask the pods now instead of answering from the cache")
    _flag(status, "--admin-token", metavar="TOKEN", help="bearer token for the admin API")

    pods = sub.add_parser("pods", help="the pod table: health, feeds, sessions, draining")
    _flag(pods, "--router", default="127.0.0.1:50051", metavar="HOST:PORT",
          help="the router's gRPC address")
    _flag(pods, "--admin-token", metavar="TOKEN", help="bearer token for the admin API")

    for name, verb in (("drain", "stop"), ("undrain", "resume")):
        drain = sub.add_parser(name, help=f"{verb} placing new sessions on a pod")
        drain.add_argument("pod", metavar="NAME")
        _flag(drain, "--router", default="127.0.0.1:50051", metavar="HOST:PORT",
              help="the router's gRPC address")
        _flag(drain, "--admin-token", metavar="TOKEN", help="bearer token for the admin API")
    return parser


READY_LOGGER = "macp_router.ready"


def _setup_logging(level: str, args: argparse.Namespace | None = None) -> None:
    from router.logs import setup_logging

    setup_logging(level, getattr(args, "log_format", "text"),
                  session_ids=bool(getattr(args, "log_session_ids", False)))
    # The ready line is printed at every log level: tools, tests and operators wait for it.
    logging.getLogger(READY_LOGGER).setLevel(logging.INFO)


def run_async(main: Callable[[], object]) -> object:
    """Run a coroutine function on uvloop when installed, else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())  # type: ignore[arg-type]


# -- serve -------------------------------------------------------------------------------------
def _config_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from router.config import RouterConfig, resolve_workers
    from router.pods import parse_pod_list

    pods = tuple(parse_pod_list(args.pods)) if args.pods else ()
    identities, observers = _token_identities(args.auth_tokens_file or args.auth_tokens_json)
    if args.observer_tokens:
        observers |= {t.strip() for t in args.observer_tokens.split(",") if t.strip()}
    return RouterConfig(
        listen=args.listen,
        pods=pods,
        pods_dns=args.pods_dns,
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        redis_password=os.environ.get(ENV_PREFIX + "REDIS_PASSWORD"),
        redis_required=args.redis_required,
        metrics_listen=args.metrics_listen,
        token=args.token,
        token_file=args.token_file or None,
        admin_token=args.admin_token,
        probe_timeout_ms=int(args.probe_timeout_ms),
        negative_cache_ms=int(args.negative_cache_ms),
        retention_s=float(args.retention_s),
        channels_per_pod=int(args.channels_per_pod),
        max_channels_per_pod=int(args.max_channels_per_pod),
        max_list_bytes=int(args.max_list_bytes),
        placement=args.placement,
        shutdown_grace_s=float(args.shutdown_grace_s),
        log_level=args.log_level,
        workers=resolve_workers(args.workers),
        reuse_port="MACP_ROUTER_WORKER_INDEX" in os.environ,
        admin_listen=args.admin_listen,
        admin_open_reads=args.admin_open_reads,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        pod_ca=args.pod_ca,
        pod_cert=args.pod_cert,
        pod_key=args.pod_key,
        scope_discovery=args.scope_discovery,
        observer_tokens=frozenset(observers),
        token_identities=identities,
        max_message_bytes=int(args.max_message_bytes),
        max_concurrent_streams=int(args.max_concurrent_streams),
        acp=_acp_config(args),
    )


def _acp_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if not args.acp_listen and not args.acp_pods:
        return None
    if not (args.acp_listen and args.acp_pods):
        raise ValueError("--acp-listen and --acp-pods go together")
    from router.acp.config import AcpConfig, parse_acp_pod_list, require_acp_extra

    require_acp_extra()
    return AcpConfig(
        listen=args.acp_listen,
        pods=tuple(parse_acp_pod_list(args.acp_pods)),
        upstream_transport=args.acp_upstream,
        placement=args.placement,
        probe_timeout_ms=int(args.probe_timeout_ms),
        negative_cache_ms=int(args.negative_cache_ms),
        retention_s=float(args.retention_s),
    )


def _token_identities(path: str | None) -> tuple[tuple[tuple[str, str], ...], set[str]]:
    """(token -> sender pairs, observer tokens) from a runtime MACP_AUTH_TOKENS_JSON file."""
    if not path:
        return (), set()
    import json

    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise ValueError(f"--auth-tokens-json: cannot read {path!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--auth-tokens-json: {path!r} is not JSON: {exc.msg}") from None
    entries = data.get("tokens", data) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError("--auth-tokens-json: expected a list of {token, sender, ...} objects")
    pairs, observers = [], set()
    for entry in entries:
        if not isinstance(entry, dict) or "token" not in entry or "sender" not in entry:
            raise ValueError("--auth-tokens-json: every entry needs 'token' and 'sender'")
        pairs.append((str(entry["token"]), str(entry["sender"])))
        if entry.get("is_observer"):
            observers.add(str(entry["token"]))
    return tuple(pairs), observers


async def _serve(config, otel: bool = False) -> int:  # type: ignore[no-untyped-def]
    from router import tracing
    from router.app import ListenError, Router
    from router.store import StoreUnavailable

    log = logging.getLogger("macp_router")
    ready_log = logging.getLogger(READY_LOGGER)
    if otel:  # per process: a worker's exporter threads do not survive a fork
        try:
            tracing.configure()
        except ValueError as exc:
            print(f"macp-router serve: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        router = Router(config)
    except ValueError as exc:
        print(f"macp-router serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        await router.start()
    except (ListenError, StoreUnavailable) as exc:
        print(f"macp-router serve: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pods = ", ".join(f"{p.name}={p.address}" for p in config.pods) or config.pods_dns
    ready_log.info(
        "ready: serving macp.v1.MACPRuntimeService on %s (pods %s; store %s%s%s)",
        router.address, pods, router.store.name,
        "; metrics on " + f"{config.metrics_listen.rpartition(':')[0]}:{router.metrics_port}"
        if config.metrics_listen else "",
        f"; pid {os.getpid()}",
    )
    if router.acp is not None:
        ready_log.info("ready: serving ACP agents on %s (pods %s)", router.acp.url,
                 ", ".join(f"{p.name}={p.url}" for p in router.acp.config.pods))
    await stop.wait()
    log.info("SIGTERM: no new calls; draining in-flight calls for up to %.1fs",
             config.shutdown_grace_s)
    await router.stop()
    tracing.shutdown()  # flushes spans still queued for the exporter
    log.info("stopped")
    return 0


def _check_router_identity(config) -> None:  # type: ignore[no-untyped-def]
    """A router without its own token cannot work in front of a real runtime: refuse."""
    if config.token_file:
        try:
            with open(config.token_file, encoding="utf-8") as handle:
                if not handle.read().strip():
                    raise ValueError(f"--token-file {config.token_file} is empty")
        except OSError as exc:
            raise ValueError(f"--token-file {config.token_file}: cannot read it "
                             f"({exc.strerror or exc})") from None
        return
    if not config.token:
        raise ValueError(
            "no router identity: give --token or --token-file. The runtime authenticates "
            "WatchSessions, ListSessions and GetSession, so without a token the router could "
            "neither watch nor locate a single session (every pod would reject it)")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = _config_from_args(args)
        _check_router_identity(config)
    except ValueError as exc:
        print(f"macp-router serve: error: {exc} (see macp-router serve --help)", file=sys.stderr)
        return EXIT_USAGE
    from router.logs import register_secrets

    register_secrets(config.token, config.admin_token, config.redis_password,
                     *config.observer_tokens, *(token for token, _ in config.token_identities))
    _setup_logging(config.log_level, args)
    if config.workers > 1 and not config.redis_url:
        logging.getLogger("macp_router").warning(
            "--workers %d without --redis-url: each worker keeps its own store, so two workers "
            "could place a retried SessionStart on different pods; use Redis with workers",
            config.workers,
        )
    if config.workers > 1:
        from router.workers import run_workers

        return run_workers(config, lambda: int(run_async(lambda: _serve(config, args.otel))))  # type: ignore[arg-type]
    return int(run_async(lambda: _serve(config, args.otel)))  # type: ignore[arg-type]


# -- pod ---------------------------------------------------------------------------------------
def _run_sim(args: argparse.Namespace, serve: Callable[[], Awaitable[None]]) -> int:
    """Run a simulated pod until SIGTERM/SIGINT; one clear line when it cannot serve."""
    from router.config import parse_host_port

    command = f"macp-router {args.command}"
    try:
        parse_host_port(args.listen, "--listen")
    except ValueError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(args.log_level, args)

    async def main() -> int:
        task = asyncio.ensure_future(serve())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            return 0
        except (OSError, RuntimeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            print(f"{command}: error: cannot serve on {args.listen}: {reason}", file=sys.stderr)
            return EXIT_FAILURE
        return 0

    return int(run_async(main))  # type: ignore[arg-type]


def cmd_pod(args: argparse.Namespace) -> int:
    from router.sim import serve_pod
    from router.sim.auth import load_token_file, parse_token_entries

    command = "macp-router pod"
    problem = None
    try:
        if args.auth_tokens_json:
            parse_token_entries(args.auth_tokens_json)
        elif args.auth_tokens_file:
            load_token_file(args.auth_tokens_file)
    except (OSError, ValueError) as exc:
        problem = f"bad token entries: {exc}"
    if problem is None and not (args.auth_tokens_json or args.auth_tokens_file
                                or args.allow_insecure):
        problem = ("no authentication configured: give --auth-tokens-json or --auth-tokens-file, "
                   "or --allow-insecure for dev-mode auth (the runtime refuses to start without "
                   "MACP_AUTH_TOKENS_* or MACP_ALLOW_INSECURE=1)")
    if problem is None and not args.allow_insecure:
        problem = ("the simulated pod serves plaintext only: give --allow-insecure (the runtime "
                   "requires TLS without MACP_ALLOW_INSECURE=1)")
    if problem is None and (args.session_start_limit_per_minute <= 0
                            or args.message_limit_per_minute <= 0):
        problem = "rate limits must be positive integers"
    if problem is not None:
        print(f"{command}: error: {problem} (see {command} --help)", file=sys.stderr)
        return EXIT_USAGE
    options = {
        "auth_tokens": args.auth_tokens_json or None,
        "auth_tokens_file": args.auth_tokens_file or None,
        "allow_insecure": args.allow_insecure,
        "start_limit_per_minute": args.session_start_limit_per_minute,
        "message_limit_per_minute": args.message_limit_per_minute,
        "policies_dir": args.policies_dir or None,
        "session_retention_s": args.session_retention_s,
        "health": not args.no_health,
    }
    return _run_sim(args, lambda: serve_pod(args.listen, args.name, args.state_file, **options))


# -- admin clients -----------------------------------------------------------------------------
def _admin_call(args: argparse.Namespace, method: str, request: object) -> object:
    from router.v1 import router_pb2_grpc

    metadata = [("authorization", f"Bearer {args.admin_token}")] if args.admin_token else []
    with grpc.insecure_channel(args.router) as channel:
        stub = router_pb2_grpc.RouterAdminStub(channel)
        return getattr(stub, method)(request, metadata=metadata, timeout=10)


def _admin_error(command: str, args: argparse.Namespace, exc: grpc.RpcError) -> int:
    code = exc.code()  # type: ignore[attr-defined]
    if code is grpc.StatusCode.UNAVAILABLE:
        hint = f"is a router listening on {args.router}? (--router HOST:PORT)"
    elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        hint = "pass the router's admin token with --admin-token"
    else:
        hint = exc.details()  # type: ignore[attr-defined]
    print(f"macp-router {command}: error: {code.name}: {hint}", file=sys.stderr)
    return EXIT_FAILURE


def cmd_status(args: argparse.Namespace) -> int:
    from router.v1 import router_pb2

    try:
        reply = _admin_call(args, "SessionStatus",
                            router_pb2.SessionStatusRequest(session_id=args.session_id,
                                                            probe=args.probe))
    except grpc.RpcError as exc:
        return _admin_error("status", args, exc)
    line = f"{args.session_id}: {reply.status}"  # type: ignore[attr-defined]
    if reply.pod:  # type: ignore[attr-defined]
        line += f" on pod {reply.pod}"  # type: ignore[attr-defined]
    line += f" (source: {reply.source}"  # type: ignore[attr-defined]
    if reply.state:  # type: ignore[attr-defined]
        line += f", state: {reply.state}"  # type: ignore[attr-defined]
    line += ")"
    print(line)
    if reply.detail:  # type: ignore[attr-defined]
        print(f"  {reply.detail}")  # type: ignore[attr-defined]
    return 0 if reply.status != "unknown" else 3  # type: ignore[attr-defined]


def format_pod_table(reply) -> str:  # type: ignore[no-untyped-def]
    from router.credentials import FIX_HINT

    header = ("POD", "ADDRESS", "HEALTH", "FEED", "DRAINING", "OPEN", "CACHED", "LAST ERROR")
    rows = [header]
    for pod in reply.pods:
        rows.append((
            pod.name, pod.address, "healthy" if pod.healthy else "DOWN",
            "up" if pod.feed_up else "down", "yes" if pod.draining else "no",
            str(pod.open_sessions), str(pod.cached_sessions),
            ("rejects the router's credentials" if pod.credentials_rejected
             else pod.last_error[:60]),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    for pod in reply.pods:
        if pod.credentials_rejected:
            lines.append(f"pod {pod.name} rejects the router's credentials "
                         f"({pod.credentials_rejected}): {FIX_HINT}")
        elif pod.healthy and pod.not_placeable:
            lines.append(f"pod {pod.name} takes no new sessions: {pod.not_placeable} "
                         "(its own sessions still route)")
    store = f"store: {reply.store}" + (" (DEGRADED)" if reply.store_degraded else "")
    lines.append(f"{store}; cached sessions: {reply.cached_sessions}; router {reply.version}")
    return "\n".join(lines)


def cmd_pods(args: argparse.Namespace) -> int:
    from router.v1 import router_pb2

    try:
        reply = _admin_call(args, "ListPods", router_pb2.ListPodsRequest())
    except grpc.RpcError as exc:
        return _admin_error("pods", args, exc)
    print(format_pod_table(reply))
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    from router.v1 import router_pb2

    method = "DrainPod" if args.command == "drain" else "UndrainPod"
    try:
        reply = _admin_call(args, method, router_pb2.DrainPodRequest(name=args.pod))
    except grpc.RpcError as exc:
        return _admin_error(args.command, args, exc)
    pod = reply.pod  # type: ignore[attr-defined]
    state = "draining: no new sessions" if pod.draining else "accepting new sessions"
    print(f"pod {pod.name}: {state}; {pod.open_sessions} open sessions keep routing")
    return 0


def cmd_acp_pod(args: argparse.Namespace) -> int:
    from router.acp.config import require_acp_extra

    try:
        require_acp_extra()
    except ValueError as exc:
        print(f"macp-router acp-pod: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from router.sim.acp_pod import serve_acp_pod

    return _run_sim(args, lambda: serve_acp_pod(args.listen, args.name, args.sessions_dir))


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging("warning")
    if args.acp:
        from router.acp.demo import run_acp_demo

        return int(run_async(run_acp_demo))  # type: ignore[arg-type]
    from router.demo import run_demo

    return int(run_async(lambda: run_demo(sessions=args.sessions)))  # type: ignore[arg-type]


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "pod": cmd_pod,
    "acp-pod": cmd_acp_pod,
    "demo": cmd_demo,
    "status": cmd_status,
    "pods": cmd_pods,
    "drain": cmd_drain,
    "undrain": cmd_drain,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    with contextlib.suppress(KeyboardInterrupt):
        return COMMANDS[args.command](args)
    return 130


if __name__ == "__main__":
    sys.exit(main())
