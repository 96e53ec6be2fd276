"""Shared fixtures: real servers on loopback (simulated pods, routers, Redis)."""

pytest_plugins = ["tests.redis_fixture"]
