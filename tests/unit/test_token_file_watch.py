"""The router's token file: watched as a supervised service; a bad file keeps the last token."""

from __future__ import annotations

import logging
from pathlib import Path

from router.credentials import RouterCredentials
from router.supervisor import Supervisor
from tests.waiting import eventually


async def test_the_watch_runs_as_the_token_file_service_and_takes_a_rotated_token(
    tmp_path: Path,
) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    credentials = RouterCredentials(token_file=str(path), poll_s=0.01)
    supervisor = Supervisor()
    credentials.start(supervisor)
    await eventually(lambda: (state := supervisor.state("token_file")) is not None and state.up,
                     timeout=10, what="the watch running")
    path.write_text("second\n")
    await eventually(lambda: credentials.token == "second", timeout=10, what="rotated token")
    assert dict(credentials.metadata) == {"authorization": "Bearer second"}
    await credentials.aclose()
    assert supervisor.state("token_file") is None and not supervisor.closing
    await supervisor.aclose()


def test_a_token_file_that_is_not_utf8_keeps_the_last_token_and_says_so_once(
    tmp_path: Path, caplog
) -> None:
    """(Before, the UnicodeDecodeError escaped the watch loop and ended it without a word.)"""
    path = tmp_path / "token"
    path.write_text("good\n")
    credentials = RouterCredentials(token_file=str(path))
    path.write_bytes(b"\xff\xfe binary garbage \x80")
    with caplog.at_level(logging.ERROR, logger="macp_router.credentials"):
        assert credentials.check_now() is False
        path.write_bytes(b"\xff\xfe other garbage \x80\x81")  # still bad: no second line
        assert credentials.check_now() is False
    assert credentials.token == "good"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"router token file: cannot read {path} (not UTF-8 text); keeping the "
                     "last token"]
    path.write_text("fixed\n")
    assert credentials.check_now() is True and credentials.token == "fixed"


async def test_a_router_without_a_token_file_runs_no_watch() -> None:
    supervisor = Supervisor()
    credentials = RouterCredentials(token="static")
    credentials.start(supervisor)
    assert list(supervisor.states()) == []
    await credentials.aclose()
    await supervisor.aclose()
