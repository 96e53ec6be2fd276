"""The MACP front door: a raw-bytes grpc.aio proxy for `macp.v1.MACPRuntimeService`.

The router reads only the fields it routes on (`router.wire`) and forwards the client's bytes,
metadata and deadline unchanged; the pod's status, details and trailing metadata come back
unchanged. One module per route class (see `router.macp.handlers` for the map); the session
flow itself (locate, place, stale retry, confirm, release) is `router.core.SessionRouter`, driven
through `router.macp.backend.MacpBackend`.

Invariants:
- Client calls carry the client's own credentials upstream; the router's token is used only for
  its own feeds and probes.
- A session is forwarded only to the pod that holds it; if no pod answers for it, the caller
  gets UNAVAILABLE naming the silent pods, never a guess.
- A reservation is released only when its pod provably did not accept the start.
"""

from router.macp.handlers import MacpProxy

__all__ = ["MacpProxy"]
