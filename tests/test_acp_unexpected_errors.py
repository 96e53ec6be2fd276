"""A router bug while relaying an ACP pod's answer never fails silently: the client is answered
(INTERNAL naming it, not left waiting), the call records its request metric, the log has the
traceback and `macp_router_unexpected_errors_total` counts it; the front door keeps serving.

The answer of a `session/new` is relayed by a task of its own (the client's next message never
waits for it); the bug is injected there: the core step that adopts the new session's id raises
an exception no code path expects, on a real front door in front of simulated ACP pods, with
the real acp client.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from acp.exceptions import RequestError

from router.acp import jsonrpc as rpc
from router.acp.frontdoor import AcpFrontDoor
from tests.acp_support import acp_cluster
from tests.metric_samples import requests_total

pytestmark = pytest.mark.timeout(60)


def requests(frontdoor: AcpFrontDoor, method: str, code: str) -> float:
    """`macp_router_requests_total` of ACP `method` ended with `code`, any route and pod."""
    return requests_total(frontdoor.metrics.registry, "acp", method, code)


async def test_an_unexpected_exception_relaying_an_answer_is_answered_recorded_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with acp_cluster(tmp_path) as cluster:
        client = await cluster.client()
        frontdoor = cluster.frontdoor

        async def buggy(call, sid, pod):  # type: ignore[no-untyped-def]
            raise KeyError("pod-7")

        monkeypatch.setattr(frontdoor.core, "adopt", buggy)
        with caplog.at_level(logging.ERROR, logger="macp_router.core"):
            with pytest.raises(RequestError) as err:
                await client.new()  # bounded: the client gives up after acp_support.T
        assert err.value.code == rpc.INTERNAL_ERROR, err.value
        assert "macp-router internal error (KeyError" in str(err.value), err.value
        assert any(r.exc_info and "session/new" in r.getMessage() for r in caplog.records)
        assert cluster.metric("macp_router_unexpected_errors_total", protocol="acp",
                              method="session/new") == 1
        assert requests(frontdoor, "session/new", "INTERNAL") == 1
        assert requests(frontdoor, "session/new", "OK") == 0

        monkeypatch.undo()
        sid = await client.new()  # the front door still serves
        assert await client.prompt(sid, "hello") == "end_turn"
        assert requests(frontdoor, "session/new", "OK") == 1
