"""Simulated pods for tests, the demos and load tests: MACP runtime pods and ACP agent pods.

Modules:
- `pod`: a simulated MACP runtime pod (`SimPod`, `serve_pod`; `macp-router sim-pod`), composed
  of `protocol`, `admission`, `engine` (over `record`), `registries`, `bus`, `persistence`,
  `limits`, `servicer` and `stream` (see `pod`'s docstring for the map).
- `auth`: the runtime's token-entry format and identities, shared by the pod and its callers.
- `acp_pod`: a simulated ACP agent pod (`AcpSimPod`, `serve_acp_pod`; `macp-router acp-pod`).
  It needs the `acp` extra, so it is not imported here: import `router.sim.acp_pod` directly.
"""

from router.sim.auth import Identity, agent_entry, parse_token_entries, router_entry
from router.sim.pod import SimPod, serve_pod
from router.sim.protocol import valid_session_id
from router.sim.record import SessionRecord

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
