"""The protocol-neutral session core shared by the MACP and ACP front doors.

- `status`: `LocateStatus`, the one vocabulary for "where is this session" answers.
- `call`: `Call`, one object per client call (route class, chosen pod, timings, metric labels).
- `errors`: `Abort` and `outcome_of`, the one place an exception becomes a status and a metric.
- `session_router`: `SessionRouter` (locate, place, forward with one stale retry, confirm,
  release) driven through the `Backend` protocol each front door implements.
- `health`: `PodHealth`, the one health state machine of a pod (both protocols).

Nothing here imports a front door (`router.macp`, `router.acp`): the dependency points inward.
"""
