"""Logging set-up of every `macp-router` command: text or JSON lines, and what may be logged.

`setup_logging(level, fmt)` configures the root logger once per process: `text` is the
human format (`time LEVEL logger: message`), `json` is one JSON object per line
(python-json-logger) with `time`, `level`, `logger`, `message` and every field passed with
`extra=` (`pod`, `method`, `code`, `duration_ms`, `session`...).

Invariants: a bearer token is never logged (the router never passes one to a log call, and the
JSON formatter drops any field whose name says token/password/authorization); a session id
is logged only shortened (`short_sid`: first 8 characters and "…") unless the operator opted
in with `--log-session-ids` (`set_full_session_ids(True)`).
"""

from __future__ import annotations

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
