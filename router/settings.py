"""Every setting of every `macp-router` subcommand, defined once, in one table (`SETTINGS`).

Job: one row per setting holds everything about it: its name, the type of its value, its
default, its help text, its validator, the subcommands that take it and the help section it is
shown in. From the row follow, with no second definition anywhere:
- the command-line flag: `--` + name with dashes (`probe_timeout_ms` -> `--probe-timeout-ms`);
- the environment variable: `MACP_ROUTER_` + NAME (`MACP_ROUTER_PROBE_TIMEOUT_MS`), the flag's
  default when set; a flag on the command line wins;
- the argparse argument (`router.cli` generates every subcommand's parser from this table);
- the `RouterConfig` field, for rows with `config=True` (`router.config` generates the frozen
  dataclass from them and builds it in one function, `config_from_options`).

Invariants:
- Flag and variable names are a contract (deploy files, tests and operators use them): a row's
  name never changes; a renamed flag keeps the old row as an alias with its own help line.
- A name may appear in several rows only for different subcommands (`listen` is the router's
  client port for `serve` and the pod's port for `pod`); within one subcommand names are unique.
- A row without a flag says why (`cli=ENV_ONLY`: a secret that must not show in `ps`;
  `cli=INTERNAL`: derived from other settings or set by the router itself).
- `check_setting(name, value)` is the one place a value of a `serve` setting is validated; both
  `RouterConfig` and `AcpConfig` call it, so a shared check exists once.
- This module imports only `router.validate` and `router.placement` (both leaves); domain parsers
  that need heavier modules import them when called, so any module may import this one.
- `unknown_variables` names every `MACP_ROUTER_*` variable that is no setting, with the closest
  setting's variable, so a typo in a deploy file is reported instead of silently ignored.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from router import validate as v
from router.placement import POLICIES

ENV_PREFIX = "MACP_ROUTER_"

SERVE, POD, ACP_POD, DEMO = "serve", "pod", "acp-pod", "demo"
STATUS, PODS, DRAIN, UNDRAIN = "status", "pods", "drain", "undrain"
ADMIN_CLIENTS = (STATUS, PODS, DRAIN, UNDRAIN)
SIM_PODS = (POD, ACP_POD)

FLAG, ENV_ONLY, INTERNAL = "flag", "env-only", "internal"

LOG_LEVELS = ("debug", "info", "warning", "error")

WORKER_ENV = ENV_PREFIX + "WORKER_INDEX"

# Variables with the prefix that are no setting of any subcommand, and who reads them.
OTHER_VARIABLES: dict[str, str] = {
    WORKER_ENV: "set by `serve --workers N` for each worker process (its index)",
    "MACP_ROUTER_TEST_REDIS": "the test suite: which Redis server its fixture starts",
    "MACP_ROUTER_STATUS_SCREENSHOT": "the test suite: where the status page screenshot goes",
}

# Help sections of `serve --help`, in order, with one line each on what they are for.
GROUPS: dict[str, str] = {
    "clients and pods": "where clients connect and which runtime pods the router fronts",
    "router identity": "the router's own credentials on the pods (one of the two is required)",
    "shared store": "the session->pod store shared by router replicas (MACP_ROUTER_REDIS_PASSWORD "
                    "in the environment sets a password not written in the URL)",
    "locating and placing sessions": "how a call finds the pod that holds its session",
    "connections to pods": "the gRPC connection pool to each pod",
    "processes and shutdown": "",
    "observability": "metrics, logs and traces",
    "admin API": "router.v1.RouterAdmin: session status, pod table, drain",
    "security and limits": "TLS, discovery scoping and request limits",
    "ACP front door": "also route ACP agents' sessions (the acp extra)",
    "": "",
}


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting; see the module docstring for what is derived from it."""

    name: str
    type: str
    """The value's type, as written in a dataclass annotation (`int`, `str | None`)."""
    default: Any
    help: str
    commands: tuple[str, ...] = (SERVE,)
    group: str = ""
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    check: v.Validator | None = None
    """Validator called as check(flag, value) on the final value (see router.validate)."""
    parse: Callable[[str], Any] | None = None
    """Text (flag or variable) -> value, for values that are not a plain int, float or str."""
    cli: str = FLAG
    why_no_flag: str = ""
    config: bool = True
    """A field of RouterConfig (else the subcommand reads the parsed value itself)."""
    secret: bool = False
    """Kept out of RouterConfig's repr; `serve` registers its value with the log redactor."""
    required: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def label(self) -> str:
        """How messages name the setting: its flag, or its variable when it has no flag."""
        return self.flag if self.cli == FLAG else self.env

    @property
    def is_switch(self) -> bool:
        return self.type == "bool"

    def from_text(self, text: str) -> Any:
        """A flag's or variable's text -> the setting's value (ValueError naming the flag)."""
        if self.is_switch:
            return v.truthy(text)
        if self.parse is not None:
            return self.parse(text)
        for name, kind in (("int", int), ("float", float)):
            if self.type.startswith(name):
                try:
                    return kind(text)
                except ValueError:
                    raise ValueError(f"{self.label}: {text!r} is not a number") from None
        return text

    def validate(self, value: Any) -> None:
        if self.choices and value is not None:
            v.one_of(self.choices)(self.label, value)
        if self.check is not None:
            self.check(self.label, value)


def _pods(text: str) -> tuple[Any, ...]:
    """`--pods` text -> pod specs; empty text (a blank variable beside --pods-dns) is none."""
    if not text.strip():
        return ()
    from router.pods import parse_pod_list  # imported when used: router.pods is not a leaf

    return tuple(parse_pod_list(text))


def _redis_url(label: str, url: str | None) -> None:
    if url:
        from router.redis_store import validate_url  # needs redis: imported when used

        validate_url(url)  # ValueError: one line naming the problem, never the password


MIB = 1024 * 1024

_ROUTER_TOKEN_HELP = (
    "the router's own bearer token for its watch feeds, ListSessions reconciles, GetSession "
    "probes and registry replays (client calls always carry the client's token). The runtime "
    "authenticates all of these, so serve refuses to start without --token or --token-file. "
    "On each runtime give it an entry like {\"token\": \"...\", \"sender\": \"macp-router\", "
    "\"is_observer\": true, \"can_manage_mode_registry\": true}: observer so probes read any "
    "session, registry rights so registrations are replayed to new pods"
)
_RETENTION_HELP = (
    "how long the router remembers which pod holds an ended (resolved, expired, cancelled) "
    "session, so calls on it get that pod's own answer. The runtime keeps an ended session in "
    "memory until MACP_SESSION_RETENTION_SECS (default 3600) after it STARTED and repeats it in "
    "every WatchSessions snapshot and ListSessions reply until then (a reconnect rewrites "
    "nothing the router already knows); after that the pod answers NOT_FOUND. Keep this at or "
    "below the runtime's retention: longer only remembers a pod that no longer has the session"
)
_CACHE_MAX_SESSIONS_HELP = (
    "most sessions the in-process near-cache holds (per protocol; the in-memory store, without "
    "--redis-url, holds as many at most). An open session costs about "
    "130 bytes, an ended one about 290, session id included (docs/operations.md, 'Memory "
    "bounds'): the default 1,000,000 is 130-290 MB. When full, ended sessions are evicted "
    "first, then the oldest live ones; an "
    "evicted live session is found again through the store or a probe on its next call "
    "(macp_router_cache_evictions_total{reason})"
)
_REDIS_URL_HELP = (
    "share the session->pod store with other router replicas: redis://HOST:PORT/DB (rediss:// "
    "for TLS), redis+cluster://HOST:PORT[,HOST:PORT...] (Redis Cluster seeds; "
    "rediss+cluster://), or redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB] "
    "(sentinels; rediss+sentinel://); default: in-memory store"
)
_AUTH_TOKENS_FILE_HELP = (
    "the runtime's token entries (MACP_AUTH_TOKENS_FILE, or MACP_AUTH_TOKENS_JSON saved to a "
    "file), so --scope-discovery identifies static tokens as the pods do (token -> sender; "
    "is_observer entries see everything; unknown tokens see nothing). JWTs are identified by "
    "their sub claim. Without it: dev mode, the token is the sender"
)
_OTEL_HELP = (
    "export traces (OpenTelemetry, the otel extra): a span per routed call with locate, probe "
    "fan-out, store and forward spans, continuing the client's traceparent; the exporter "
    "follows the OTEL_* variables (OTEL_TRACES_EXPORTER=otlp|console|none, "
    "OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...)"
)
_ADMIN_LISTEN_HELP = (
    "serve the admin API (router.v1.RouterAdmin) here too; without --admin-token the admin API "
    "is served only on loopback (this address, default 127.0.0.1:50052, or --listen when that "
    "is loopback)"
)

_MAX_INFLIGHT_CALLS_HELP = (
    "admission control: unary client calls (MACP unary, ACP requests) this router process "
    "works on at once; a call past it is refused at once with UNAVAILABLE and a "
    "grpc-retry-pushback-ms trailer (ACP: HTTP 503 + Retry-After, or a JSON-RPC error with "
    "data.retryAfterMs), never queued. It caps the process's work when many connections "
    "flood it together (one connection is already capped by --max-concurrent-streams, 256). "
    "Not lower than that without measuring: a refusal costs ~1/4 of a forwarded call, and a "
    "bound at the throughput knee (~32 on loopback) cost goodput against callers that do not "
    "back off (loadtest/RESULTS.md, 'Overload with admission control'). 0 = unbounded"
)
_MAX_INFLIGHT_STREAMS_HELP = (
    "admission control: client streams (MACP server, bidi and client streams; ACP SSE "
    "streams and WebSocket connections) open at once in this router process, bounded apart "
    "from calls so idle watchers cannot lock out unary calls nor the reverse; a new stream "
    "past it is refused like a call. Size it by memory, not throughput: an open "
    "StreamSession cost the router ~55 KiB RSS and 4 asyncio tasks (measured), so 4096 is "
    "~220 MiB. 0 = unbounded"
)

_LOGS = (SERVE, *SIM_PODS)

SETTINGS: tuple[Setting, ...] = (
    # -- serve: clients and pods ------------------------------------------------------------------
    Setting("listen", "str", "0.0.0.0:50051", "where clients connect (gRPC)",
            group="clients and pods", metavar="HOST:PORT", check=v.host_port),
    Setting("pods", "tuple[PodSpec, ...]", (),
            "runtime pods by stable name, e.g. a=10.0.0.5:50051,b=10.0.0.6:50051",
            group="clients and pods", metavar="NAME=HOST:PORT[,...]", parse=_pods,
            check=v.unique_names),
    Setting("pods_dns", "str | None", None,
            "discover pods from a headless Service's DNS name instead of --pods",
            group="clients and pods", metavar="HOST:PORT", check=v.host_port),
    Setting("dns_interval_s", "float", 5.0,
            "how often --pods-dns is resolved again (pods that joined or left)",
            group="clients and pods", metavar="SECONDS", check=v.positive),
    # -- serve: router identity -------------------------------------------------------------------
    Setting("token", "str | None", None, _ROUTER_TOKEN_HELP, group="router identity",
            metavar="TOKEN", secret=True),
    Setting("token_file", "str | None", None,
            "read the router's token from this file instead, and re-read it when it changes "
            "(rotated JWTs, a re-mounted Secret) without a restart; wins over --token",
            group="router identity", metavar="PATH"),
    # -- serve: shared store ----------------------------------------------------------------------
    Setting("redis_url", "str | None", None, _REDIS_URL_HELP, group="shared store",
            metavar="URL", check=_redis_url),
    Setting("redis_prefix", "str", "mrouter:", "key prefix in Redis", group="shared store",
            metavar="PREFIX",
            check=v.not_prefixed("macp:", "that namespace is the runtime's")),
    Setting("redis_required", "bool", False,
            "exit instead of starting degraded when Redis is unreachable at start-up",
            group="shared store"),
    Setting("redis_password", "str | None", None,
            "password for Redis when the URL carries none", cli=ENV_ONLY, secret=True,
            why_no_flag="a secret: a flag would show it in `ps` and shell history"),
    # -- serve: locating and placing sessions -----------------------------------------------------
    Setting("probe_timeout_ms", "int", 250, "how long a miss waits for each pod's status answer",
            group="locating and placing sessions", metavar="MS", check=v.between(1, 60_000)),
    Setting("negative_cache_ms", "int", 1000,
            "how long 'no pod holds this session' is remembered",
            group="locating and placing sessions", metavar="MS", check=v.at_least(0)),
    Setting("negative_cache_max_sessions", "int", 100_000,
            "most session ids remembered as held by no pod (the negative cache); past it the "
            "oldest is forgotten first (its next call probes again)",
            group="locating and placing sessions", metavar="N", check=v.between(0, 10_000_000)),
    Setting("retention_s", "float", 600.0, _RETENTION_HELP,
            group="locating and placing sessions", metavar="SECONDS", check=v.positive),
    Setting("cache_max_sessions", "int", 1_000_000, _CACHE_MAX_SESSIONS_HELP,
            group="locating and placing sessions", metavar="N", check=v.between(1, 100_000_000)),
    Setting("placement", "str", "least-sessions-p2c", "placement policy for new sessions",
            group="locating and placing sessions", choices=tuple(POLICIES)),
    Setting("health_interval_ms", "int", 1000,
            "how often each pod's health is checked (a pod found down takes no new sessions)",
            group="locating and placing sessions", metavar="MS", check=v.at_least(50)),
    # -- serve: connections to pods ---------------------------------------------------------------
    Setting("channels_per_pod", "int", 2,
            "gRPC connections per pod at start (the runtime allows 128 streams and 64 requests "
            "in flight per connection; the pool grows with load)",
            group="connections to pods", metavar="N", check=v.between(1, 64)),
    Setting("max_channels_per_pod", "int", 16,
            "most connections the pool opens to one pod (100 streams / 48 unary calls in flight "
            "per connection before it adds one); between --channels-per-pod and 256",
            group="connections to pods", metavar="N"),
    Setting("max_list_bytes", "int", 256 * MIB,
            "receive limit for one pod's whole ListSessions reply (the runtime does not page it; "
            "~300 bytes per in-memory session)", group="connections to pods", metavar="N",
            check=v.between(MIB, 2**31 - 1, low_text="1 MiB", high_text="2 GiB - 1")),
    Setting("list_snapshot_bytes", "int", 256 * MIB,
            "most bytes of ListSessions listings kept for paging (a listing's first page fans "
            "out once; its later pages read that snapshot); past it the least recently read "
            "listing is dropped (its next page is INVALID_ARGUMENT: list again)",
            group="security and limits", metavar="N",
            check=v.between(MIB, 2**40, low_text="1 MiB", high_text="1 TiB")),
    Setting("list_snapshots", "int", 256,
            "most ListSessions listings kept for paging at once (each costs one snapshot, "
            "bounded in bytes by --list-snapshot-bytes); past it the least recently read "
            "listing is dropped (its next page is INVALID_ARGUMENT: list again)",
            group="security and limits", metavar="N", check=v.between(1, 1_000_000)),
    Setting("list_snapshot_idle_s", "float", 60.0,
            "a ListSessions listing whose next page is not asked for this long is dropped",
            group="security and limits", metavar="SECONDS", check=v.positive),
    # -- serve: processes and shutdown ------------------------------------------------------------
    Setting("workers", "int", 1,
            "router processes sharing the listen port (SO_REUSEPORT); auto = cores",
            group="processes and shutdown", metavar="N|auto", parse=v.parse_workers,
            check=v.at_least(1)),
    Setting("shutdown_grace_s", "float", 10.0, "how long SIGTERM waits for in-flight calls",
            group="processes and shutdown", metavar="SECONDS"),
    Setting("drain_sync_s", "float", 2.0,
            "how often a drain made through another router (in the shared store) is picked up",
            group="processes and shutdown", metavar="SECONDS", check=v.positive),
    Setting("reuse_port", "bool", False, "share the listen port with sibling worker processes",
            cli=INTERNAL, why_no_flag="set for each worker of `serve --workers N` "
            "(MACP_ROUTER_WORKER_INDEX)"),
    # -- serve: observability ---------------------------------------------------------------------
    Setting("metrics_listen", "str | None", None,
            "serve Prometheus /metrics and /healthz, /readyz over HTTP here",
            group="observability", metavar="HOST:PORT", check=v.host_port),
    Setting("log_level", "str", "info", "log verbosity (debug adds one access line per routed "
            "call)", group="observability", choices=LOG_LEVELS, parse=str.lower),
    Setting("log_level", "str", "info", "log verbosity", commands=SIM_PODS,
            group="observability", choices=LOG_LEVELS, config=False),
    Setting("log_format", "str", "text", "text lines, or one JSON object per line (time, "
            "level, logger, message and fields such as pod, method, code, duration_ms)",
            commands=_LOGS, group="observability", choices=("text", "json"), config=False),
    Setting("log_session_ids", "bool", False, "log full session ids (default: the first 8 "
            "characters and '…'; ids can act as capabilities)", commands=_LOGS,
            group="observability", config=False),
    Setting("otel", "bool", False, _OTEL_HELP, group="observability", config=False),
    # -- serve: admin API -------------------------------------------------------------------------
    Setting("admin_listen", "str | None", None, _ADMIN_LISTEN_HELP, group="admin API",
            metavar="HOST:PORT", check=v.host_port),
    Setting("admin_token", "str | None", None, "bearer token the admin API requires (drain "
            "always; reads unless --admin-open-reads)", group="admin API", metavar="TOKEN",
            secret=True),
    Setting("admin_open_reads", "bool", False, "let SessionStatus/ListPods through without "
            "--admin-token (drain always needs it)", group="admin API"),
    # -- serve: security and limits ---------------------------------------------------------------
    Setting("tls_cert", "str | None", None, "TLS certificate for the client port",
            group="security and limits", metavar="PEM", check=v.file_exists),
    Setting("tls_key", "str | None", None, "TLS private key for the client port",
            group="security and limits", metavar="PEM", check=v.file_exists),
    Setting("tls_client_ca", "str | None", None,
            "require client certificates signed by this CA (mTLS)",
            group="security and limits", metavar="PEM", check=v.file_exists),
    Setting("pod_ca", "str | None", None, "dial pods over TLS, trusting this CA",
            group="security and limits", metavar="PEM", check=v.file_exists),
    Setting("pod_cert", "str | None", None, "client certificate for mTLS to pods",
            group="security and limits", metavar="PEM", check=v.file_exists),
    Setting("pod_key", "str | None", None, "client key for mTLS to pods",
            group="security and limits", metavar="PEM", check=v.file_exists),
    Setting("scope_discovery", "bool", False, "show ListSessions/WatchSessions callers only "
            "sessions they take part in (participants, initiator) unless their token is an "
            "observer", group="security and limits"),
    Setting("observer_tokens", "frozenset[str]", frozenset(),
            "bearer tokens that may see every session under --scope-discovery",
            group="security and limits", metavar="TOKEN[,TOKEN]", parse=v.comma_list,
            secret=True),
    Setting("auth_tokens_file", "str | None", None, _AUTH_TOKENS_FILE_HELP,
            group="security and limits", metavar="PATH", config=False),
    Setting("auth_tokens_json", "str | None", None, "older name of --auth-tokens-file",
            group="security and limits", metavar="PATH", config=False),
    Setting("token_identities", "tuple[tuple[str, str], ...]", (),
            "token -> sender for --scope-discovery; else a token is its own sender",
            cli=INTERNAL, secret=True,
            why_no_flag="read from the file --auth-tokens-file names"),
    Setting("max_message_bytes", "int", 16 * MIB,
            "largest request or response the router passes", group="security and limits",
            metavar="N", check=v.between(1024, 1024 * MIB, low_text="1 KiB", high_text="1 GiB")),
    Setting("max_concurrent_streams", "int", 256, "concurrent calls per client connection "
            "(HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)", group="security and limits",
            metavar="N", check=v.between(1, 100_000)),
    Setting("max_inflight_calls", "int", 256, _MAX_INFLIGHT_CALLS_HELP,
            group="security and limits", metavar="N", check=v.between(0, 1_000_000)),
    Setting("max_inflight_streams", "int", 4096, _MAX_INFLIGHT_STREAMS_HELP,
            group="security and limits", metavar="N", check=v.between(0, 1_000_000)),
    Setting("admission_pushback_ms", "int", 100,
            "what a refused call is told to wait before it retries (the grpc-retry-pushback-ms "
            "trailer; HTTP Retry-After rounds it up to whole seconds; ACP WebSocket errors "
            "carry it as data.retryAfterMs)", group="security and limits", metavar="MS",
            check=v.between(1, 60_000)),
    # -- serve: ACP front door --------------------------------------------------------------------
    Setting("acp_listen", "str | None", None,
            "also serve ACP agents here (ACP's Streamable HTTP / WebSocket transport, path /acp)",
            group="ACP front door", metavar="HOST:PORT", config=False),
    Setting("acp_pods", "str | None", None, "ACP agent pods by stable name (with --acp-listen)",
            group="ACP front door", metavar="NAME=http://HOST:PORT/acp[,...]", config=False),
    Setting("acp_upstream", "str", "ws", "how the router talks to ACP pods: ws (acp's "
            "WebSocket on the pod's endpoint; stock acp 0.12.1 pods need it for prompts after "
            "session/load) or http", group="ACP front door", choices=("ws", "http"),
            config=False),
    Setting("acp_idle_timeout_s", "float", 300.0,
            "close an ACP client connection (HTTP or WebSocket) that had no open stream, no "
            "call in flight and no message either way for this long, and a client's "
            "connection to a pod that carried nothing this long and holds none of its "
            "sessions (a client that vanished without closing; a stock acp pod ends a "
            "connection's sessions with it, so keep it above your clients' quiet periods)",
            group="ACP front door", metavar="SECONDS", check=v.positive, config=False),
    Setting("acp", "AcpConfig | None", None, "the ACP front door; None = MACP only",
            cli=INTERNAL, why_no_flag="built from --acp-listen, --acp-pods, --acp-upstream"),
    # -- pod, acp-pod: simulated pods -------------------------------------------------------------
    Setting("listen", "str", None, "where the pod listens", commands=SIM_PODS,
            metavar="HOST:PORT", required=True, config=False),
    Setting("name", "str", None, "the pod's stable name", commands=SIM_PODS, metavar="NAME",
            required=True, config=False),
    Setting("state_file", "str | None", None,
            "persist sessions here so a restarted pod replays them", commands=(POD,),
            metavar="PATH", config=False),
    Setting("auth_tokens_json", "str | None", None,
            "token entries in the runtime's MACP_AUTH_TOKENS_JSON shape: [{\"token\", "
            "\"sender\", \"is_observer\", \"can_manage_mode_registry\", ...}]",
            commands=(POD,), metavar="JSON", config=False),
    Setting("auth_tokens_file", "str | None", None,
            "the same entries from a file (MACP_AUTH_TOKENS_FILE); the JSON flag wins",
            commands=(POD,), metavar="PATH", config=False),
    Setting("allow_insecure", "bool", False,
            "MACP_ALLOW_INSECURE=1: serve plaintext and, with no token entries, dev-mode auth "
            "(any bearer token is a full identity named by the token); without it and without "
            "token entries the pod refuses to start, as the runtime does",
            commands=(POD,), config=False),
    Setting("session_start_limit_per_minute", "int", 60,
            "per-sender SessionStart rate limit (the runtime's default: 60)", commands=(POD,),
            metavar="N", config=False),
    Setting("message_limit_per_minute", "int", 600,
            "per-sender message rate limit (the runtime's default: 600)", commands=(POD,),
            metavar="N", config=False),
    Setting("policies_dir", "str | None", None,
            "as MACP_POLICIES_DIR: the policy registry becomes read-only (RegisterPolicy "
            "answers FAILED_PRECONDITION); the directory is not read", commands=(POD,),
            metavar="DIR", config=False),
    Setting("session_retention_s", "float", 3600.0,
            "terminal sessions leave memory this long after they started "
            "(MACP_SESSION_RETENTION_SECS)", commands=(POD,), metavar="S", config=False),
    Setting("no_health", "bool", False,
            "serve no grpc.health.v1 (a runtime built before it: Health/Check UNIMPLEMENTED)",
            commands=(POD,), config=False),
    Setting("sessions_dir", "str", "acp-sessions",
            "session history (shared by pods, so any pod can session/load any session)",
            commands=(ACP_POD,), metavar="DIR", config=False),
    # -- demo -------------------------------------------------------------------------------------
    Setting("sessions", "int", 6, "sessions to start", commands=(DEMO,), metavar="N",
            config=False),
    Setting("acp", "bool", False, "show the ACP front door instead: 3 simulated ACP pods, the "
            "acp client's reconnect flow (status, prompt, pod restart, load)", commands=(DEMO,),
            config=False),
    # -- admin clients: status, pods, drain, undrain ----------------------------------------------
    Setting("router", "str", "127.0.0.1:50051", "the router's gRPC address",
            commands=ADMIN_CLIENTS, metavar="HOST:PORT", config=False),
    Setting("probe", "bool", False, "ask the pods now instead of answering from the cache",
            commands=(STATUS,), config=False),
    Setting("admin_token", "str | None", None, "bearer token for the admin API",
            commands=ADMIN_CLIENTS, metavar="TOKEN", config=False),
)

CONFIG_SETTINGS: dict[str, Setting] = {s.name: s for s in SETTINGS if s.config}
"""The rows that are `RouterConfig` fields, by field name (all of them `serve` settings)."""


def for_command(command: str) -> list[Setting]:
    """The rows `command` takes, in table order."""
    return [s for s in SETTINGS if command in s.commands]


def setting(name: str, command: str = SERVE) -> Setting:
    for row in SETTINGS:
        if row.name == name and command in row.commands:
            return row
    raise KeyError(f"{command} has no setting {name!r}")


def check_setting(name: str, value: Any) -> None:
    """Validate one `serve` setting's value (ValueError naming its flag)."""
    setting(name).validate(value)


def known_variables() -> set[str]:
    return {s.env for s in SETTINGS if s.cli != INTERNAL} | set(OTHER_VARIABLES)


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """(variable, closest setting's variable or None) for each unknown `MACP_ROUTER_*`."""
    known = known_variables()
    # Compared without the shared prefix, which would make every name look close.
    candidates = sorted(name.removeprefix(ENV_PREFIX) for name in known - set(OTHER_VARIABLES))
    unknown = sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)
    result: list[tuple[str, str | None]] = []
    for name in unknown:
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), candidates, n=1)
        result.append((name, ENV_PREFIX + close[0] if close else None))
    return result


def env_only(command: str) -> Iterable[Setting]:
    return (s for s in for_command(command) if s.cli == ENV_ONLY)
