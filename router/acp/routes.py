"""ACP method -> route class: the whole client-facing routing surface as one table.

Route classes:
- `session`: names a live session (`params.sessionId`): go to the pod where it is live.
- `load`: session/load, session/resume: live somewhere -> that pod; nowhere -> reserve the sid
  and place it; a pod that did not answer -> retryable error, never a load.
- `new`: session/new: a pod chosen by the placement policy; the minted sid is recorded.
- `fork`: session/fork: the source session's pod; the new sid is recorded there.
- `status`: session/status: answered by the router's locator, never forwarded.
- `list`: session/list: every healthy pod, merged and de-duplicated.
- `session_or_any`: session/delete (a stored session): its live pod, else any healthy pod.
- `any`: connection-level methods: one healthy pod.
- `broadcast`: authenticate: every upstream this client has (and remembered for later ones).

`_`-prefixed extension methods route as `session` when they carry `params.sessionId`, else as
`any`. Any other method answers -32601 from the router, as a stock acp agent would.
"""

from __future__ import annotations

from acp.meta import AGENT_METHODS

SESSION = "session"
LOAD = "load"
NEW = "new"
FORK = "fork"
STATUS = "status"
LIST = "list"
SESSION_OR_ANY = "session_or_any"
ANY = "any"
BROADCAST = "broadcast"
INITIALIZE = "initialize"

STATUS_METHOD = "session/status"
INITIALIZE_METHOD = AGENT_METHODS["initialize"]

ROUTES: dict[str, str] = {
    AGENT_METHODS["initialize"]: INITIALIZE,
    AGENT_METHODS["authenticate"]: BROADCAST,
    AGENT_METHODS["session_new"]: NEW,
    AGENT_METHODS["session_load"]: LOAD,
    AGENT_METHODS["session_resume"]: LOAD,
    AGENT_METHODS["session_fork"]: FORK,
    AGENT_METHODS["session_list"]: LIST,
    AGENT_METHODS["session_delete"]: SESSION_OR_ANY,
    AGENT_METHODS["session_prompt"]: SESSION,
    AGENT_METHODS["session_cancel"]: SESSION,
    AGENT_METHODS["session_set_mode"]: SESSION,
    AGENT_METHODS["session_set_config_option"]: SESSION,
    AGENT_METHODS["session_close"]: SESSION,
    STATUS_METHOD: STATUS,
    AGENT_METHODS["logout"]: ANY,
    AGENT_METHODS["providers_list"]: ANY,
    AGENT_METHODS["providers_set"]: ANY,
    AGENT_METHODS["providers_disable"]: ANY,
    AGENT_METHODS["mcp_message"]: SESSION_OR_ANY,
    AGENT_METHODS["nes_start"]: SESSION,
    AGENT_METHODS["nes_suggest"]: SESSION,
    AGENT_METHODS["nes_accept"]: SESSION,
    AGENT_METHODS["nes_reject"]: SESSION,
    AGENT_METHODS["nes_close"]: SESSION,
    AGENT_METHODS["document_did_open"]: SESSION,
    AGENT_METHODS["document_did_change"]: SESSION,
    AGENT_METHODS["document_did_close"]: SESSION,
    AGENT_METHODS["document_did_save"]: SESSION,
    AGENT_METHODS["document_did_focus"]: SESSION,
}

# Methods whose success means "this session is now live on the pod that answered".
ESTABLISHING = frozenset({AGENT_METHODS["session_load"], AGENT_METHODS["session_resume"]})
# A successful reply means the session is no longer live there.
ENDING = frozenset({AGENT_METHODS["session_close"]})
# A successful reply ends the session for the client: its stream on the connection goes.
ENDS_SESSION = ENDING | {AGENT_METHODS["session_delete"]}


def route_of(method: str, has_session: bool) -> str | None:
    """The route class of `method`, or None when the router does not know it (-32601)."""
    route = ROUTES.get(method)
    if route is not None:
        return route
    if method.startswith("_"):
        return SESSION if has_session else ANY
    return None


def metric_methods() -> list[str]:
    """Method label values for `macp_router_requests_total{protocol="acp"}`."""
    return [*ROUTES, "_extension"]
