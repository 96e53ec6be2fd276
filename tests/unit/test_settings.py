"""The settings table: each setting defined once, the CLI and RouterConfig generated from it.

What is specified here: the table's own invariants (names, flags, variables, reasons for the
rows without a flag), that RouterConfig is exactly the table's config rows, every validator
(a bad value fails construction with one line naming the flag), that the ACP front door shares
the MACP side's checks, how flags and variables become a config, and the warning for a
`MACP_ROUTER_*` variable that is no setting.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from router import settings
from router.acp.config import SHARED_SETTINGS, AcpConfig, AcpPodSpec
from router.cli import build_parser, warn_unknown_variables
from router.config import RouterConfig, config_from_options, secret_values
from router.pods import PodSpec
from router.settings import (
    CONFIG_SETTINGS,
    ENV_ONLY,
    FLAG,
    INTERNAL,
    OTHER_VARIABLES,
    SERVE,
    SETTINGS,
    for_command,
    unknown_variables,
)

ROUTER = Path(__file__).resolve().parents[2] / "router"
PODS = (PodSpec("a", "127.0.0.1:1"),)

# The contract: deploy files, docs and operators use these names; none may disappear.
SERVE_FLAGS = """
listen pods pods-dns redis-url redis-prefix redis-required metrics-listen token token-file
admin-token probe-timeout-ms negative-cache-ms retention-s channels-per-pod max-channels-per-pod
max-list-bytes placement shutdown-grace-s workers log-level log-format log-session-ids otel
acp-listen acp-pods acp-upstream admin-listen admin-open-reads tls-cert tls-key tls-client-ca
pod-ca pod-cert pod-key scope-discovery observer-tokens auth-tokens-file auth-tokens-json
max-message-bytes max-concurrent-streams dns-interval-s drain-sync-s health-interval-ms
""".split()


def serve_options(*argv: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    return vars(build_parser(environ or {}).parse_args(["serve", *argv]))


# -- the table --------------------------------------------------------------------------------
def test_every_serve_flag_of_the_contract_is_a_row_with_its_variable() -> None:
    rows = {row.flag: row for row in for_command(SERVE) if row.cli == FLAG}
    for flag in SERVE_FLAGS:
        row = rows.get(f"--{flag}")
        assert row is not None, f"--{flag} is gone from serve"
        assert row.env == "MACP_ROUTER_" + flag.upper().replace("-", "_")


@pytest.mark.parametrize("command", ["serve", "pod", "acp-pod", "demo", "status", "pods",
                                     "drain", "undrain"])
def test_a_name_appears_once_per_subcommand(command: str) -> None:
    names = [row.name for row in for_command(command)]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_every_subcommand_the_table_names_has_a_parser() -> None:
    subcommands = build_parser({})._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {command for row in SETTINGS for command in row.commands} == set(subcommands)


def test_every_row_without_a_flag_says_why_and_only_serve_rows_are_config() -> None:
    for row in SETTINGS:
        if row.cli != FLAG:
            assert row.cli in (ENV_ONLY, INTERNAL) and row.why_no_flag, row.name
        if row.config:
            assert row.commands == (SERVE,), row.name


def test_router_config_fields_are_exactly_the_config_rows_with_their_defaults() -> None:
    fields = {field.name: field for field in dataclasses.fields(RouterConfig)}
    assert list(fields) == list(CONFIG_SETTINGS)
    for name, row in CONFIG_SETTINGS.items():
        assert fields[name].default == row.default, name
        assert fields[name].type == row.type, name
        assert fields[name].repr is not row.secret, name


def test_secrets_never_show_in_the_config_repr() -> None:
    config = RouterConfig(pods=PODS, token="tok-s3cret", admin_token="adm-s3cret",
                          redis_password="pw-s3cret", observer_tokens=frozenset({"obs-s3cret"}))
    assert "s3cret" not in repr(config)


def test_every_secret_value_goes_to_the_log_redactor_and_no_sender_does() -> None:
    config = RouterConfig(pods=PODS, token="tok", admin_token="adm", redis_password="pw",
                          observer_tokens=frozenset({"obs"}),
                          token_identities=(("t-agent", "agent-1"),))
    assert sorted(secret_values(config)) == ["adm", "obs", "pw", "t-agent", "tok"]
    assert secret_values(RouterConfig(pods=PODS)) == []


def test_validators_and_the_acp_config_import_no_router_module_that_imports_them_back() -> None:
    def router_imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        return {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module
                and node.module.startswith("router")}

    assert router_imports(ROUTER / "validate.py") == set(), "validate.py must stay a leaf"
    assert "router.config" not in router_imports(ROUTER / "acp" / "config.py")
    assert router_imports(ROUTER / "settings.py") <= {"router", "router.placement",
                                                       "router.pods", "router.redis_store"}


# -- validation: one line naming the flag ------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"listen": "nowhere"}, "--listen: 'nowhere' is not HOST:PORT"),
        ({"metrics_listen": "x:99999"}, "--metrics-listen"),
        ({"admin_listen": "x"}, "--admin-listen"),
        ({"pods_dns": "svc"}, "--pods-dns"),
        ({"pods": ()}, "no pods"),
        ({"pods": (*PODS, PodSpec("a", "127.0.0.1:2"))}, "--pods: duplicate pod names"),
        ({"probe_timeout_ms": 0}, "--probe-timeout-ms must be between 1 and 60000"),
        ({"probe_timeout_ms": 60_001}, "--probe-timeout-ms must be between 1 and 60000"),
        ({"negative_cache_ms": -1}, "--negative-cache-ms must be >= 0"),
        ({"retention_s": 0}, "--retention-s must be > 0"),
        ({"health_interval_ms": 49}, "--health-interval-ms must be >= 50"),
        ({"dns_interval_s": 0}, "--dns-interval-s must be > 0"),
        ({"drain_sync_s": 0}, "--drain-sync-s must be > 0"),
        ({"channels_per_pod": 0}, "--channels-per-pod must be between 1 and 64"),
        ({"channels_per_pod": 4, "max_channels_per_pod": 3},
         "--max-channels-per-pod must be between --channels-per-pod and 256"),
        ({"max_channels_per_pod": 257}, "--max-channels-per-pod"),
        ({"max_list_bytes": 1000}, "--max-list-bytes must be between 1 MiB and 2 GiB - 1"),
        ({"max_message_bytes": 10}, "--max-message-bytes must be between 1 KiB and 1 GiB"),
        ({"max_concurrent_streams": 0}, "--max-concurrent-streams must be between 1 and 100000"),
        ({"placement": "random"}, "--placement must be least-sessions-p2c or round-robin"),
        ({"log_level": "loud"}, "--log-level must be debug, info, warning or error"),
        ({"workers": 0}, "--workers must be >= 1"),
        ({"redis_prefix": "macp:x"}, "--redis-prefix must not be 'macp:'"),
        ({"redis_url": "notaurl://x"}, "'notaurl'"),
        ({"tls_cert": "/nonexistent/cert.pem"}, "--tls-cert and --tls-key go together"),
        ({"tls_cert": "/nonexistent/c.pem", "tls_key": __file__}, "--tls-cert: no such file"),
        ({"pod_cert": __file__}, "--pod-cert and --pod-key go together"),
        ({"pod_cert": __file__, "pod_key": __file__}, "need --pod-ca"),
        ({"tls_client_ca": __file__}, "--tls-client-ca needs --tls-cert"),
    ],
    ids=lambda value: next(iter(value)) if isinstance(value, dict) else None,
)
def test_a_bad_value_fails_construction_with_one_line_naming_the_flag(
    bad: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        RouterConfig(**{"pods": PODS, **bad})
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_defaults_are_a_valid_config_given_pods() -> None:
    config = RouterConfig(pods=PODS)
    assert (config.probe_timeout_s, config.workers, config.acp) == (0.25, 1, None)


@pytest.mark.parametrize(
    ("name", "bad"),
    [("probe_timeout_ms", 0), ("negative_cache_ms", -1), ("retention_s", 0.0),
     ("health_interval_ms", 10), ("placement", "random")],
)
def test_the_acp_front_door_fails_a_shared_setting_with_the_same_line(name: str, bad: Any) -> None:
    assert name in SHARED_SETTINGS
    with pytest.raises(ValueError) as macp:
        RouterConfig(pods=PODS, **{name: bad})
    with pytest.raises(ValueError) as acp:
        AcpConfig(listen="127.0.0.1:0", pods=(AcpPodSpec("a", "http://h:1/acp"),),
                  **{name: bad})
    assert str(acp.value) == str(macp.value)


def test_the_acp_front_door_takes_the_shared_defaults_from_the_table() -> None:
    defaults = {field.name: field.default for field in dataclasses.fields(AcpConfig)}
    for name in SHARED_SETTINGS:
        assert defaults[name] == CONFIG_SETTINGS[name].default, name


# -- flags and variables -> RouterConfig ---------------------------------------------------------
def test_a_variable_is_the_flags_default_and_the_flag_wins() -> None:
    environ = {"MACP_ROUTER_PODS": "a=127.0.0.1:1,b=127.0.0.1:2",
               "MACP_ROUTER_PROBE_TIMEOUT_MS": "75", "MACP_ROUTER_REDIS_REQUIRED": "yes"}
    from_env = config_from_options(serve_options(environ=environ), environ)
    assert [pod.name for pod in from_env.pods] == ["a", "b"]
    assert (from_env.probe_timeout_ms, from_env.redis_required) == (75, True)
    flag_wins = config_from_options(
        serve_options("--probe-timeout-ms", "90", environ=environ), environ)
    assert flag_wins.probe_timeout_ms == 90


def test_a_log_level_variable_is_read_in_any_case() -> None:
    environ = {"MACP_ROUTER_PODS": "a=127.0.0.1:1", "MACP_ROUTER_LOG_LEVEL": "WARNING"}
    assert config_from_options(serve_options(environ=environ), environ).log_level == "warning"


def test_a_blank_pods_variable_beside_pods_dns_is_no_pods() -> None:
    environ = {"MACP_ROUTER_PODS": "", "MACP_ROUTER_PODS_DNS": "runtime.ns.svc:50051"}
    config = config_from_options(serve_options(environ=environ), environ)
    assert (config.pods, config.pods_dns) == ((), "runtime.ns.svc:50051")


def test_the_environment_only_password_and_worker_index_reach_the_config() -> None:
    environ = {"MACP_ROUTER_REDIS_PASSWORD": "pw", "MACP_ROUTER_WORKER_INDEX": "1"}
    config = config_from_options(serve_options("--pods", "a=127.0.0.1:1"), environ)
    assert (config.redis_password, config.reuse_port) == ("pw", True)
    plain = config_from_options(serve_options("--pods", "a=127.0.0.1:1"), {})
    assert (plain.redis_password, plain.reuse_port) == (None, False)


def test_observers_come_from_the_flag_and_the_token_entries_file(tmp_path: Path) -> None:
    entries = tmp_path / "tokens.json"
    entries.write_text(json.dumps([{"token": "t-obs", "sender": "ops", "is_observer": True},
                                   {"token": "t-agent", "sender": "agent-1"}]))
    config = config_from_options(serve_options(
        "--pods", "a=127.0.0.1:1", "--scope-discovery", "--observer-tokens", "x, y,",
        "--auth-tokens-file", str(entries)), {})
    assert config.observer_tokens == {"x", "y", "t-obs"}
    assert config.identity_of("t-agent") == "agent-1"
    assert config.identity_of("unlisted") == "unlisted"


def test_workers_auto_is_a_count_and_a_typo_names_the_flag() -> None:
    auto = config_from_options(serve_options("--pods", "a=127.0.0.1:1", "--workers", "auto"), {})
    assert auto.workers >= 1
    with pytest.raises(ValueError, match="--workers: 'many'"):
        config_from_options(serve_options("--pods", "a=127.0.0.1:1", "--workers", "many"), {})


def test_acp_flags_go_together_and_share_the_macp_sides_settings() -> None:
    with pytest.raises(ValueError, match="--acp-listen and --acp-pods go together"):
        config_from_options(serve_options("--pods", "a=127.0.0.1:1",
                                          "--acp-listen", "127.0.0.1:0"), {})
    config = config_from_options(serve_options(
        "--pods", "a=127.0.0.1:1", "--acp-listen", "127.0.0.1:0",
        "--acp-pods", "x=http://127.0.0.1:9/acp", "--probe-timeout-ms", "40",
        "--health-interval-ms", "300"), {})
    assert config.acp is not None
    assert (config.acp.probe_timeout_ms, config.acp.health_interval_ms) == (40, 300)
    assert config.acp.pods == (AcpPodSpec("x", "http://127.0.0.1:9/acp"),)


def test_serve_help_shows_every_flag_its_variable_and_its_default() -> None:
    serve = build_parser({})._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = " ".join(serve.format_help().split())
    for row in for_command(SERVE):
        if row.cli == FLAG:
            assert row.flag in text and row.env in text, row.name
    assert "default 250; env MACP_ROUTER_PROBE_TIMEOUT_MS" in text
    assert "examples:" in text and "MACP_ROUTER_REDIS_PASSWORD" in text


# -- unknown variables -----------------------------------------------------------------------
def test_an_unknown_variable_is_named_with_the_closest_setting() -> None:
    environ = {"MACP_ROUTER_PROBE_TIMEOUT": "100", "MACP_ROUTER_REDIS_URI": "redis://h",
               "MACP_ROUTER_ZZZ": "1", "MACP_ROUTER_PODS": "a=h:1", "OTHER": "x",
               **dict.fromkeys(OTHER_VARIABLES, "1")}
    assert unknown_variables(environ) == [
        ("MACP_ROUTER_PROBE_TIMEOUT", "MACP_ROUTER_PROBE_TIMEOUT_MS"),
        ("MACP_ROUTER_REDIS_URI", "MACP_ROUTER_REDIS_URL"),
        ("MACP_ROUTER_ZZZ", None),
    ]


def test_each_unknown_variable_gets_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="macp_router"):
        warn_unknown_variables({"MACP_ROUTER_NEGATIVE_CACHE": "5", "MACP_ROUTER_LISTEN": "x"})
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["MACP_ROUTER_NEGATIVE_CACHE is not a macp-router setting and is ignored: "
                     "did you mean MACP_ROUTER_NEGATIVE_CACHE_MS?"]


def test_every_variable_the_repository_sets_or_reads_is_known() -> None:
    """Deploy files, docs, load tests and the router itself never trigger the typo warning
    (README and the CLI tests spell a typo on purpose, as an example)."""
    repo = ROUTER.parent
    files = [repo / "Dockerfile", *(repo / "k8s").rglob("*.yaml"), *(repo / "docs").rglob("*.md"),
             *(repo / "loadtest").rglob("*.py"), *(repo / "loadtest").rglob("*.md"),
             *ROUTER.rglob("*.py"), *(repo / "tests").glob("*.py")]
    named = {(path.relative_to(repo).as_posix(), var) for path in files
             if path.name != "test_cli.py"
             for var in re.findall(r"\bMACP_ROUTER_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text())}
    assert len(named) > 20, "the scan found the deploy files' variables"
    assert {(path, var) for path, var in named if var not in settings.known_variables()} == set()


def test_variables_of_every_subcommand_are_known_to_all() -> None:
    """`MACP_ROUTER_ROUTER` (status/pods) in a shell that also runs serve is no typo."""
    assert unknown_variables({"MACP_ROUTER_ROUTER": "h:1", "MACP_ROUTER_NAME": "a"}) == []
    assert settings.setting("router", "status").env == "MACP_ROUTER_ROUTER"
