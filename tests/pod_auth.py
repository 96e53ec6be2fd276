"""The identities the test pods are configured with, as an operator configures a runtime.

Every simulated pod in the suite gets these token entries (the runtime's
MACP_AUTH_TOKENS_JSON shape) and `allow_insecure` (plaintext on loopback). Agents' tokens are
their names, so `AuthConfig.for_dev_agent(name)` / `Bearer <name>` authenticates as `name`.

- `router`: the router's own identity (`--token router`): observer, registry rights.
- `observer`, `ops`: observers without registry rights.
- `coordinator`: the admin agent of the tests (may manage the registries).
- `reviewer`, `alice`, `bob`, `carol`, `outsider`, `agent`: plain agents.
Any other token is UNAUTHENTICATED.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from router.sim.auth import agent_entry, router_entry

ROUTER_TOKEN = "router"
TOKEN_ENTRIES: list[dict[str, Any]] = [
    router_entry(ROUTER_TOKEN),
    {"token": "observer", "sender": "observer", "is_observer": True},
    {"token": "ops", "sender": "ops", "is_observer": True},
    agent_entry("coordinator", can_manage_mode_registry=True),
    *(agent_entry(name) for name in ("reviewer", "alice", "bob", "carol", "outsider", "agent")),
]


def pod_options(**overrides: Any) -> dict[str, Any]:
    """SimPod keyword arguments for a test pod: the token entries above, plaintext allowed."""
    return {"auth_tokens": TOKEN_ENTRIES, "allow_insecure": True, **overrides}


def write_token_file(directory: Path) -> Path:
    """The token entries as a MACP_AUTH_TOKENS_FILE for pods run as processes."""
    path = directory / "pod-tokens.json"
    path.write_text(json.dumps({"tokens": TOKEN_ENTRIES}))
    return path


def pod_cli_args(directory: Path, *, start_limit: int | None = None,
                 message_limit: int | None = None) -> list[str]:
    """`macp-router pod` flags for the same configuration (plus raised rate limits, if given)."""
    args = ["--auth-tokens-file", str(write_token_file(directory)), "--allow-insecure"]
    if start_limit is not None:
        args += ["--session-start-limit-per-minute", str(start_limit)]
    if message_limit is not None:
        args += ["--message-limit-per-minute", str(message_limit)]
    return args
