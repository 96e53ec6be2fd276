"""Structured logs: `--log-format text|json`, and what never reaches a log line.

The end-to-end test runs real `macp-router pod` and `macp-router serve --log-format json`
processes, makes calls through the router, and parses every line the router wrote.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from macp.v1 import core_pb2, envelope_pb2

from router import logs
from tests import macp_calls
from tests.procs import Process, free_port

CLIENT_TOKEN = "client-tok-4b1d9e72c3a8"
CLIENT = "alice-4b1d"
ROUTER_TOKEN = "router-tok-91f0c6d2e7b5"
TOKEN_ENTRIES = [
    {"token": ROUTER_TOKEN, "sender": "macp-router", "is_observer": True,
     "can_manage_mode_registry": True},
    {"token": CLIENT_TOKEN, "sender": CLIENT},
    {"token": "reviewer-tok-0000000", "sender": "reviewer"},
]


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger writing to a buffer; restored (and ids shortened again) afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buffer = io.StringIO()
    yield buffer
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    logs.set_full_session_ids(False)


def test_json_lines_carry_time_level_logger_message_and_extra_fields(captured):
    logs.setup_logging("info", "json", stream=captured)
    sid = str(uuid.uuid4())
    logging.getLogger("macp_router.test").info(
        "session %s placed", sid, extra={"pod": "a", "code": "OK", "duration_ms": 1.25,
                                         "token": "should-not-appear", "session": sid})
    (line,) = captured.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "INFO" and record["logger"] == "macp_router.test"
    assert record["time"].endswith("+00:00") and "T" in record["time"]
    assert record["message"] == f"session {sid[:8]}… placed"
    assert record["pod"] == "a" and record["code"] == "OK" and record["duration_ms"] == 1.25
    assert record["session"] == sid[:8] + "…"
    assert "token" not in record and "should-not-appear" not in line
    assert sid not in line


def test_text_format_shortens_ids_and_masks_configured_secrets(captured):
    logs.register_secrets("secret-admin-token-123")
    logs.setup_logging("info", "text", stream=captured)
    sid = str(uuid.uuid4())
    logging.getLogger("macp_router.test").warning("bad token secret-admin-token-123 for %s", sid)
    line = captured.getvalue().strip()
    assert " WARNING macp_router.test: " in line
    assert "secret-admin-token-123" not in line and "***" in line
    assert sid not in line and sid[:8] + "…" in line


def test_log_session_ids_keeps_full_ids(captured):
    logs.setup_logging("info", "json", session_ids=True, stream=captured)
    sid = str(uuid.uuid4())
    logging.getLogger("macp_router.test").info("session %s", sid)
    assert json.loads(captured.getvalue())["message"] == f"session {sid}"


def test_access_line_costs_nothing_when_debug_is_off(captured):
    logs.setup_logging("info", "json", stream=captured)
    logs.log_call("macp", "Send", "session", "a", "OK", 0.002)
    assert captured.getvalue() == ""
    logs.setup_logging("debug", "json", stream=captured)
    logs.log_call("macp", "Send", "session", "a", "OK", 0.002)
    record = json.loads(captured.getvalue())
    assert record["logger"] == logs.ACCESS_LOGGER
    assert (record["method"], record["pod"], record["code"]) == ("Send", "a", "OK")
    assert record["duration_ms"] == 2.0


def start_envelope(sid: str) -> envelope_pb2.Envelope:
    envelope = macp_calls.start_envelope(sid)
    payload = core_pb2.SessionStartPayload.FromString(envelope.payload)
    del payload.participants[:]
    payload.participants.extend([CLIENT, "reviewer"])
    envelope.payload = payload.SerializeToString()
    envelope.sender = CLIENT
    return envelope


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_serve_with_json_logs_writes_one_json_object_per_line_without_secrets(
    tmp_path: Path,
):
    entries = json.dumps(TOKEN_ENTRIES)
    pods = []
    for name in ("a", "b"):
        port = free_port()
        pod = Process(["pod", "--listen", f"127.0.0.1:{port}", "--name", name,
                       "--auth-tokens-json", entries, "--allow-insecure"],
                      tmp_path / f"pod-{name}.log")
        pods.append((pod, f"{name}=127.0.0.1:{port}"))
    router_port = free_port()
    router = Process(
        ["serve", "--listen", f"127.0.0.1:{router_port}",
         "--pods", ",".join(spec for _, spec in pods), "--token", ROUTER_TOKEN,
         "--admin-listen", f"127.0.0.1:{free_port()}", "--log-level", "debug"],
        tmp_path / "router.log", env={"MACP_ROUTER_LOG_FORMAT": "json"},  # the env form
    )
    try:
        for pod, _ in pods:
            await asyncio.to_thread(pod.start)
        await asyncio.to_thread(router.start)
        sid, missing = str(uuid.uuid4()), str(uuid.uuid4())
        metadata = (("authorization", f"Bearer {CLIENT_TOKEN}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router_port}") as channel:
            stub = macp_calls.stub(channel)
            reply = await stub.Send(core_pb2.SendRequest(envelope=start_envelope(sid)),
                                    metadata=metadata, timeout=10)
            assert reply.ack.ok, reply.ack
            await stub.GetSession(core_pb2.GetSessionRequest(session_id=sid),
                                  metadata=metadata, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                await stub.GetSession(core_pb2.GetSessionRequest(session_id=missing),
                                      metadata=metadata, timeout=10)
            assert lost.value.code() is grpc.StatusCode.NOT_FOUND
        assert await asyncio.to_thread(router.terminate) == 0
    finally:
        router.kill()
        for pod, _ in pods:
            pod.kill()

    output = router.output()
    records = []
    for line in output.splitlines():
        record = json.loads(line)  # every line is one JSON object
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        records.append(record)
    assert any(r["logger"] == "macp_router.ready" for r in records)
    calls = [r for r in records if r["logger"] == logs.ACCESS_LOGGER]
    send = [r for r in calls if r["method"] == "Send"]
    assert send and send[0]["code"] == "OK" and send[0]["pod"] in ("a", "b")
    assert isinstance(send[0]["duration_ms"], float)
    assert any(r["method"] == "GetSession" and r["code"] == "NOT_FOUND" for r in calls)
    for secret in (CLIENT_TOKEN, ROUTER_TOKEN, sid, missing):
        assert secret not in output, f"{secret} was logged"


def test_tracebacks_are_redacted_in_both_formats(captured):
    sid = str(uuid.uuid4())
    for fmt in ("text", "json"):
        captured.seek(0)
        captured.truncate()
        logs.setup_logging("info", fmt, stream=captured)
        try:
            raise KeyError(f"session {sid}")
        except KeyError:
            logging.getLogger("macp_router.test").exception("lookup failed")
        output = captured.getvalue()
        assert "KeyError" in output and sid[:8] + "…" in output
        assert sid not in output, fmt
