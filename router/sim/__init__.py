"""Simulated MACP runtime pods for tests, the demo and load tests (see `router.sim.pod`)."""

from router.sim.pod import SessionRecord, SimPod, serve_pod

__all__ = ["SessionRecord", "SimPod", "serve_pod"]
