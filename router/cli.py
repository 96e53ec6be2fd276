"""`macp-router`: the command line. The only module that reads flags and the environment.

Every subcommand's parser is generated from the settings table (`router.settings.SETTINGS`):
each row is a flag (`--redis-url`) whose default comes from its variable
(`MACP_ROUTER_REDIS_URL`) when set; a flag on the command line wins. `serve` turns its options
into a `RouterConfig` in one call (`router.config.config_from_options`).

Invariants:
- Bad input exits with status 2 and one line saying what is wrong and what to do.
- A `MACP_ROUTER_*` variable that is no setting is reported once at start (a warning naming the
  closest setting), never silently ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Awaitable, Callable, Mapping, Sequence

import grpc

from router import __version__
from router.settings import (
    ACP_POD,
    DEMO,
    DRAIN,
    FLAG,
    GROUPS,
    POD,
    PODS,
    SERVE,
    STATUS,
    UNDRAIN,
    Setting,
    env_only,
    for_command,
    unknown_variables,
)
from router.validate import truthy

EXIT_USAGE = 2
EXIT_FAILURE = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs (examples) keep their lines; flag help is wrapped."""


def _shown_default(row: Setting) -> str:
    if row.is_switch or row.required or row.default in (None, (), frozenset()):
        return ""
    return f"default {row.default}; "


def _argument(row: Setting, environ: Mapping[str, str]) -> dict[str, object]:
    """argparse keywords for one row: its variable, when set, is the default."""
    text = environ.get(row.env)
    help_text = f"{row.help} [{_shown_default(row)}env {row.env}]".replace("%", "%%")
    kwargs: dict[str, object] = {"help": help_text, "dest": row.name}
    if row.is_switch:
        kwargs.update(action="store_true", default=truthy(text) if text is not None
                      else row.default)
        return kwargs
    kwargs.update(default=text if text is not None else row.default, metavar=row.metavar)
    if row.choices:
        kwargs.update(choices=row.choices, metavar=None)
    if row.parse is None and row.type in ("int", "float"):
        kwargs["type"] = int if row.type == "int" else float
    if row.required and text is None:
        kwargs["required"] = True
    return kwargs


def add_settings(parser: argparse.ArgumentParser, command: str,
                 environ: Mapping[str, str] | None = None) -> None:
    """Add `command`'s rows of the settings table to `parser`, grouped as the table says."""
    environ = os.environ if environ is None else environ
    groups: dict[str, argparse._ArgumentGroup] = {}
    for row in for_command(command):
        if row.cli != FLAG:
            continue
        target: argparse._ActionsContainer = parser
        if row.group:
            if row.group not in groups:
                about = _text(GROUPS[row.group]) if GROUPS[row.group] else None
                groups[row.group] = parser.add_argument_group(row.group, about)
            target = groups[row.group]
        target.add_argument(row.flag, **_argument(row, environ))  # type: ignore[arg-type]


def _text(paragraph: str) -> str:
    return textwrap.fill(" ".join(paragraph.split()), width=96)


SERVE_EXAMPLES = """\
examples:
  # two pods by address, the router's token from a mounted Secret
  macp-router serve --pods a=10.0.0.5:50051,b=10.0.0.6:50051 --token-file /run/secrets/token

  # in Kubernetes: pods from the headless Service, replicas sharing Redis, metrics on :9090
  MACP_ROUTER_PODS_DNS=macp-runtime.macp.svc:50051 MACP_ROUTER_TOKEN_FILE=/run/secrets/token \\
  MACP_ROUTER_REDIS_URL=redis://redis:6379/0 MACP_ROUTER_METRICS_LISTEN=0.0.0.0:9090 \\
  macp-router serve
"""

POD_EXAMPLES = """\
examples:
  # a dev-mode pod (any bearer token is an identity), then a router in front of it
  macp-router pod --listen 127.0.0.1:50061 --name a --allow-insecure
  macp-router serve --listen 127.0.0.1:50051 --pods a=127.0.0.1:50061 --token router
"""

ACP_POD_EXAMPLES = """\
examples:
  # two ACP pods sharing one history directory, and a router's ACP front door before them
  macp-router acp-pod --listen 127.0.0.1:8801 --name a --sessions-dir /tmp/acp-sessions
  macp-router acp-pod --listen 127.0.0.1:8802 --name b --sessions-dir /tmp/acp-sessions
  macp-router serve ... --acp-listen 127.0.0.1:8765 \\
      --acp-pods a=http://127.0.0.1:8801/acp,b=http://127.0.0.1:8802/acp
"""


def _serve_epilog() -> str:
    lines = [SERVE_EXAMPLES, "set only in the environment:"]
    lines += [textwrap.fill(f"{row.env}: {row.help} ({row.why_no_flag})", width=96,
                            initial_indent="  ", subsequent_indent="    ")
              for row in env_only(SERVE)]
    return "\n".join(lines)


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="macp-router", formatter_class=_HelpFormatter,
        description=_text(
            "Route MACP sessions to the runtime pod that holds them. Clients talk to the "
            "router exactly as to one runtime (macp.v1.MACPRuntimeService); the router keeps a "
            "session->pod cache fed by each pod's WatchSessions stream, probes all pods on a "
            "miss, and places new sessions on a chosen pod."),
        epilog="Every flag can also be set as MACP_ROUTER_<FLAG>, e.g. MACP_ROUTER_PODS; a flag\n"
        "on the command line wins. A MACP_ROUTER_* variable that is no setting is warned about\n"
        "at start, naming the closest setting.",
    )
    parser.add_argument("--version", action="version", version=f"macp-router {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, description: str = "",
                epilog: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=_text(description or help),
                              epilog=epilog, formatter_class=_HelpFormatter)

    serve = command(
        SERVE, "run the router",
        "Run the router in front of runtime pods. Logs one line when ready; SIGTERM stops "
        "accepting calls, drains in-flight ones and exits.", epilog=_serve_epilog())
    pod = command(POD, "run a simulated MACP runtime pod (tests, demo, load tests)",
                  "A faithful in-memory MACP runtime pod for tests and demos.", epilog=POD_EXAMPLES)
    acp_pod = command(
        ACP_POD, "run a simulated ACP agent pod (tests, demo)",
        "A simulated ACP agent served over ACP's Streamable HTTP transport (acp.http.AcpServer); "
        "session history in --sessions-dir, which pods may share.", epilog=ACP_POD_EXAMPLES)
    demo = command(
        DEMO, "3 simulated pods + a router + the macp_sdk client, end to end",
        "Start 3 simulated pods and a router on free loopback ports (in-memory store), drive a "
        "real session flow through the router with the macp_sdk client, and show which pod "
        "holds each session and how the router located it.")
    status = command(STATUS, "where does a session live? live | not_found | unknown",
                     "Ask a running router where a session lives (the answer it routes by).")
    status.add_argument("session_id", metavar="SESSION_ID")
    pods = command(PODS, "the pod table: health, feeds, sessions, draining")
    drain = command(DRAIN, "stop placing new sessions on a pod")
    undrain = command(UNDRAIN, "resume placing new sessions on a pod")
    for each in (drain, undrain):
        each.add_argument("pod", metavar="NAME")
    parsers = {SERVE: serve, POD: pod, ACP_POD: acp_pod, DEMO: demo, STATUS: status,
               PODS: pods, DRAIN: drain, UNDRAIN: undrain}
    for name, each in parsers.items():
        add_settings(each, name, environ)
    return parser


def warn_unknown_variables(environ: Mapping[str, str] | None = None) -> None:
    """One warning per `MACP_ROUTER_*` variable that is no setting, naming the closest one."""
    log = logging.getLogger("macp_router")
    for name, closest in unknown_variables(os.environ if environ is None else environ):
        hint = f"did you mean {closest}?" if closest else "see macp-router COMMAND --help"
        log.warning("%s is not a macp-router setting and is ignored: %s", name, hint)


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
    from router.config import config_from_options

    try:
        config = config_from_options(vars(args))
        _check_router_identity(config)
    except ValueError as exc:
        print(f"macp-router serve: error: {exc} (see macp-router serve --help)", file=sys.stderr)
        return EXIT_USAGE
    from router.config import secret_values
    from router.logs import register_secrets

    register_secrets(*secret_values(config))
    _setup_logging(config.log_level, args)
    if not config.reuse_port:  # the supervisor of --workers warns; its workers do not repeat it
        warn_unknown_variables()
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
    warn_unknown_variables()

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
    down = [service for service in reply.services if not service.up]
    if reply.services:
        lines.append(f"background services: {len(reply.services) - len(down)} up, "
                     f"{len(down)} down")
    for service in down:
        lines.append(f"service {service.name} DOWN for {service.for_seconds:.0f}s, restarting "
                     f"(crashed {service.crashes} times; last: {service.last_error[:200]})")
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
