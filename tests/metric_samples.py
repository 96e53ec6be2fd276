"""Reading the router's request metric in tests, straight from its registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry


def requests_total(registry: CollectorRegistry, protocol: str, method: str, code: str) -> float:
    """`macp_router_requests_total` of `protocol` `method` ended with `code`, any route and pod."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            labels = sample.labels
            if (sample.name == "macp_router_requests_total" and labels["protocol"] == protocol
                    and labels["method"] == method and labels["code"] == code):
                total += sample.value
    return total
