"""Router configuration: one frozen, validated dataclass, generated from the settings table.

`RouterConfig`'s fields are the rows of `router.settings.SETTINGS` marked `config=True`: name,
type and default come from the table, nowhere else. `config_from_options` is the one function
that builds it from a subcommand's parsed options and the environment (`router.cli` calls it);
tests and embedders construct `RouterConfig(...)` directly.

Invariants:
- Only `router.cli` reads flags and `MACP_ROUTER_*` variables; everything else receives a
  `RouterConfig`.
- Validation happens in `__post_init__`, so a bad value fails at start-up with one line naming
  the flag, never deep inside a running router: first the rules that relate settings
  (`_check_combinations`: a missing partner is named before a missing file), then each field's
  own validator from the table.
- Secrets (tokens, the Redis password) are kept out of the dataclass repr.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from router.acp.config import AcpConfig, acp_config_from_options
from router.pods import PodSpec
from router.settings import CONFIG_SETTINGS, ENV_ONLY, FLAG, WORKER_ENV, Setting
from router.validate import parse_host_port

__all__ = ["AcpConfig", "PodSpec", "RouterConfig", "config_from_options", "parse_host_port",
           "secret_values"]


class _RouterConfigBehaviour:
    """What a RouterConfig does beyond holding its fields (the fields are the table's)."""

    listen: str
    token: str | None
    admin_token: str | None
    probe_timeout_ms: int
    token_identities: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        _check_combinations(self)
        for name, row in CONFIG_SETTINGS.items():
            row.validate(getattr(self, name))

    @property
    def probe_timeout_s(self) -> float:
        return self.probe_timeout_ms / 1000

    @property
    def admin_on_main_port(self) -> bool:
        """Admin calls are served on the client port only with a token, or on loopback."""
        host, _ = parse_host_port(self.listen, "--listen")
        return bool(self.admin_token) or host in ("127.0.0.1", "localhost", "::1")

    def identity_of(self, token: str) -> str:
        for known, sender in self.token_identities:
            if known == token:
                return sender
        return token

    def read_file(self, path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as handle:
            return handle.read()

    @property
    def router_metadata(self) -> tuple[tuple[str, str], ...]:
        """The router's own credentials, for feeds, probes and replays only."""
        if not self.token:
            return ()
        return (("authorization", f"Bearer {self.token}"),)


def _check_combinations(config: Any) -> None:
    """The rules that relate two settings (each field is already valid on its own)."""
    if config.acp is not None and config.workers > 1:
        raise ValueError("--acp-listen needs --workers 1 (ACP client connections live in "
                         "one process)")
    if not config.pods and not config.pods_dns:
        raise ValueError("no pods: give --pods NAME=HOST:PORT[,...] or --pods-dns HOST:PORT")
    if not config.channels_per_pod <= config.max_channels_per_pod <= 256:
        raise ValueError("--max-channels-per-pod must be between --channels-per-pod and 256")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if bool(config.pod_cert) != bool(config.pod_key):
        raise ValueError("--pod-cert and --pod-key go together")
    if (config.pod_cert or config.pod_key) and not config.pod_ca:
        raise ValueError("--pod-cert/--pod-key (mTLS to pods) need --pod-ca")
    if config.tls_client_ca and not config.tls_cert:
        raise ValueError("--tls-client-ca needs --tls-cert/--tls-key")


def _field(row: Setting) -> tuple[str, str, dataclasses.Field[Any]]:
    default = row.default
    if isinstance(default, (list, dict, set)):
        raise TypeError(f"setting {row.name}: a mutable default would be shared")
    return row.name, row.type, dataclasses.field(default=default, repr=not row.secret)


RouterConfig = dataclasses.make_dataclass(
    "RouterConfig",
    [_field(row) for row in CONFIG_SETTINGS.values()],
    bases=(_RouterConfigBehaviour,),
    frozen=True,
    namespace={"__module__": __name__, "__doc__": (
        "The router's settings (one field per `config=True` row of router.settings.SETTINGS), "
        "validated when constructed.")},
)


def config_from_options(options: Mapping[str, Any],
                        environ: Mapping[str, str] | None = None) -> Any:
    """`serve`'s parsed options (flags, already defaulted from their variables) -> RouterConfig.

    Rows with a flag take the parsed value (text is converted by the row); environment-only rows
    read their variable; internal rows are derived here: the token identities from
    `--auth-tokens-file`, `reuse_port` for a worker of `--workers`, the ACP front door.
    ValueError names the flag at fault.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, row in CONFIG_SETTINGS.items():
        if row.cli == FLAG:
            raw = options.get(name, row.default)
        elif row.cli == ENV_ONLY:
            raw = environ.get(row.env, row.default)
        else:
            continue
        values[name] = row.from_text(raw) if isinstance(raw, str) else raw
    identities, observers = read_token_identities(
        options.get("auth_tokens_file") or options.get("auth_tokens_json"))
    values["token_identities"] = identities
    values["observer_tokens"] = frozenset(values.get("observer_tokens", ())) | observers
    values["reuse_port"] = WORKER_ENV in environ
    values["acp"] = acp_config_from_options(options, values)
    if not values.get("token_file"):
        values["token_file"] = None
    return RouterConfig(**values)


def secret_values(config: Any) -> list[str]:
    """Every value of the table's secret settings (tokens, passwords), for the log redactor.

    A pair (token, sender) contributes its token only: senders are names, not secrets.
    """
    found: list[str] = []
    for name, row in CONFIG_SETTINGS.items():
        value = getattr(config, name)
        if not row.secret or not value:
            continue
        if isinstance(value, str):
            found.append(value)
        else:
            found.extend(item[0] if isinstance(item, tuple) else item for item in value)
    return found


def read_token_identities(path: str | None) -> tuple[tuple[tuple[str, str], ...], set[str]]:
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

