"""Simulated MACP runtime pods for tests, the demo and load tests (see `router.sim.pod`)."""

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
