"""Logging set-up of every `macp-router` command: text or JSON lines, and what may be logged.

`setup_logging(level, fmt)` configures the root logger once per process: `text` is the
human format (`time LEVEL logger: message`), `json` is one JSON object per line
(python-json-logger) with `time`, `level`, `logger`, `message` and every field passed with
`extra=` (`pod`, `method`, `code`, `duration_ms`, `session`...).

Invariants: a bearer token is never logged (the router never passes one to a log call; the
filter masks the configured tokens and passwords (`register_secrets`) wherever they appear and
drops any `extra=` field whose name says token/password/authorization); a session id is
logged only shortened (`short_sid`: first 8 characters and "…") unless the operator opted
in with `--log-session-ids` (`set_full_session_ids(True)`).
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

SHORT_SID_CHARS = 8

_full_session_ids = False


def set_full_session_ids(enabled: bool) -> None:
    """`--log-session-ids`: log and show full session ids (they can be capabilities)."""
    global _full_session_ids
    _full_session_ids = enabled


def full_session_ids() -> bool:
    return _full_session_ids


def short_sid(sid: str) -> str:
    """`sid` as logs and the status page show it: shortened unless full ids were enabled."""
    if _full_session_ids or len(sid) <= SHORT_SID_CHARS:
        return sid
    return sid[:SHORT_SID_CHARS] + "…"

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "macp_router.access"
"""One debug line per routed call (protocol, method, route, pod, code, duration_ms)."""

# Session ids are lowercase UUIDs (v4/v7) chosen by clients; any UUID in a message is shortened.
_UUID = re.compile(r"\b([0-9a-fA-F]{8})-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{12}\b")
_SECRET_FIELD = re.compile(r"token|password|secret|authorization|credential", re.IGNORECASE)
_access = logging.getLogger(ACCESS_LOGGER)


_secrets: set[str] = set()
MIN_SECRET_CHARS = 8  # shorter values (dev tokens like "router") are words in messages


def register_secrets(*secrets: str | None) -> None:
    """Values that must never reach a log (tokens, passwords): replaced by `***` if they do."""
    _secrets.update(s for s in secrets if s and len(s) >= MIN_SECRET_CHARS)


def redact(text: str) -> str:
    """`text` with known secrets masked and session ids (UUIDs) shortened (unless enabled)."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    if _full_session_ids:
        return text
    return _UUID.sub(lambda m: m[1] + "…", text)


class RedactFilter(logging.Filter):
    """Shortens session ids in the message and in `extra=` string fields; drops secret fields.

    Runs on the handler, so it covers every logger (ours, grpc's, redis's) and both formats.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # a malformed call: the formatter reports it as logging always does
        redacted = redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, ()
        for key, value in list(record.__dict__.items()):
            if key in _STANDARD_ATTRS:
                continue
            if _SECRET_FIELD.search(key):
                del record.__dict__[key]
            elif isinstance(value, str):
                record.__dict__[key] = redact(value)
        return True


_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}


class _TextFormatter(logging.Formatter):
    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))  # tracebacks can quote session ids


def _json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    class Formatter(JsonFormatter):
        def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
            return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")

        def formatException(self, ei: Any) -> str:
            return redact(super().formatException(ei))

    return Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        json_ensure_ascii=False,
    )


def setup_logging(level: str, fmt: str = "text", *, session_ids: bool = False,
                  stream: Any = None) -> None:
    """Configure the root logger: `fmt` text or json, at `level`, redacting as documented."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    set_full_session_ids(session_ids)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_json_formatter() if fmt == "json" else _TextFormatter(TEXT_FORMAT))
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # debug is for the router's own loggers; libraries (grpc's asyncio engine) stay at info.
    numeric = getattr(logging, level.upper())
    root.setLevel(max(numeric, logging.INFO))
    logging.getLogger("macp_router").setLevel(numeric)


def log_call(protocol: str, method: str, route: str, pod: str | None, code: str,
             seconds: float) -> None:
    """The access line of one routed call (debug level: free when debug is off)."""
    if _access.isEnabledFor(logging.DEBUG):
        _access.debug(
            "%s %s -> %s %s %.2fms", method, route, pod or "-", code, seconds * 1000,
            extra={"protocol": protocol, "method": method, "route": route, "pod": pod or "",
                   "code": code, "duration_ms": round(seconds * 1000, 3)},
        )
