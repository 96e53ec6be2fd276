"""Load tests for macp-router: direct-to-pod vs a bare passthrough hop vs the router, one run.

`python -m loadtest run --scenario hit|stream|miss|start|mixed|pod-kill|scale|workers|memory|all`
starts simulated pods, the passthrough proxy and the router as subprocesses on loopback,
drives them from an asyncio grpc.aio generator (open and closed loop), and writes a terminal
table, a JSON file and a self-contained HTML report. See loadtest/RESULTS.md.
"""
