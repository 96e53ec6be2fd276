"""The ACP front door: route ACP agents' sessions over ACP's remote (Streamable HTTP) transport.

Requires the `acp` extra (`pip install 'macp-router[acp]'`). Modules, one concept each:
- `asgi`: serve an ASGI app with hypercorn on a socket bound up front.
- `jsonrpc`: JSON-RPC message shapes and the router's error answers.
- `routes`: ACP method -> route class (a table).
- `upstream`: one JSON-RPC connection from the router to one pod (ids rewritten).
- `pods`: ACP pods by name, their control connection, health and `session/status` probe.
- `connection`: a client's virtual connection (streams, sessions, lazily opened upstreams).
- `frontdoor`: the server the clients talk to; reuses the protocol-neutral locator, store,
  placement and metrics unchanged.
- `demo`: the reconnect flow end to end against simulated ACP pods (`router.sim.acp_pod`).
"""
