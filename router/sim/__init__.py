"""Simulated pods for tests, the demos and load tests: MACP runtime pods and ACP agent pods.

Modules:
- `pod`: a simulated MACP runtime pod (`SimPod`, `serve_pod`; `macp-router sim-pod`).
- `auth`: the runtime's token-entry format and identities, shared by the pod and its callers.
- `acp_pod`: a simulated ACP agent pod (`AcpSimPod`, `serve_acp_pod`; `macp-router acp-pod`).
  It needs the `acp` extra, so it is not imported here: import `router.sim.acp_pod` directly.
"""

from router.sim.auth import Identity, agent_entry, parse_token_entries, router_entry
from router.sim.pod import SessionRecord, SimPod, serve_pod, valid_session_id

__all__ = [
    "Identity",
    "SessionRecord",
    "SimPod",
    "agent_entry",
    "parse_token_entries",
    "router_entry",
    "serve_pod",
    "valid_session_id",
]
