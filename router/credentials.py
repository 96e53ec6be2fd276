"""The router's own identity toward the pods: `--token` or `--token-file`, re-read on change.

Job: hold the bearer token the router uses for its own calls (watch feeds, ListSessions
reconciles, GetSession probes, registry replays) and hand it out as gRPC metadata that always
carries the current token. With `--token-file` the file is checked every `poll_s` seconds and
re-read when its modification time, size or inode changes (a rotated JWT, a re-mounted
Kubernetes Secret); the next call uses the new token, no restart needed.

Invariants:
- The token itself is never logged; log lines name the file and what happened.
- A file that cannot be read, is not UTF-8 text, or reads empty, keeps the last good token
  (and says so once).
- The file watch runs as the router supervisor's service `token_file`: an unexpected exception
  is logged with its traceback, counted and the watch restarted; it never stops silently.
- `metadata` is a live view: code that stored it sends the current token on every call.
- The runtime reads `authorization: Bearer <token>`; a token entry for the router on a
  v0.6.1 runtime is `{"token": "...", "sender": "macp-router", "is_observer": true,
  "can_manage_mode_registry": true}` (observer: GetSession on every session; registry rights:
  replays of RegisterPolicy / RegisterExtMode / PromoteMode).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator, Sequence
from typing import overload

from router.logs import register_secrets
from router.supervisor import Supervisor

log = logging.getLogger("macp_router.credentials")

FIX_HINT = ("give the router a token the runtime accepts with --token or --token-file (a "
            "runtime token entry with \"is_observer\": true and \"can_manage_mode_registry\": "
            "true)")
"""What to do when a pod rejects the router's credentials (logs, errors, docs)."""


class _LiveMetadata(Sequence[tuple[str, str]]):
    """gRPC metadata that reads the current token on every use."""

    __slots__ = ("_owner",)

    def __init__(self, owner: RouterCredentials) -> None:
        self._owner = owner

    def _current(self) -> tuple[tuple[str, str], ...]:
        token = self._owner.token
        return (("authorization", f"Bearer {token}"),) if token else ()

    def __len__(self) -> int:
        return len(self._current())

    @overload
    def __getitem__(self, index: int) -> tuple[str, str]: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[tuple[str, str]]: ...
    def __getitem__(self, index: int | slice) -> object:
        return self._current()[index]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._current())

    def __repr__(self) -> str:  # never the token
        return "<router credentials metadata>"


class RouterCredentials:
    """The router's token from `--token` or `--token-file` (the file wins and is watched)."""

    def __init__(self, token: str | None = None, token_file: str | None = None,
                 poll_s: float = 2.0) -> None:
        self.token_file = token_file
        self.poll_s = poll_s
        self.token: str | None = token or None
        self.reloads = 0
        self._stamp: tuple[int, int, int] | None = None
        self._read_error = ""
        self._supervisor: Supervisor | None = None
        self.service = "token_file"
        self.metadata: Sequence[tuple[str, str]] = _LiveMetadata(self)
        if token_file:
            self._load(initial=True)

    @property
    def configured(self) -> bool:
        return bool(self.token)

    def describe(self) -> str:
        """Where the token comes from, for log lines and errors (never the token)."""
        if self.token_file:
            return f"--token-file {self.token_file}"
        return "--token" if self.token else "no token"

    def _load(self, *, initial: bool = False) -> bool:
        """Read the file if it changed; True when a new token was taken."""
        path = self.token_file
        assert path is not None
        try:
            stat = os.stat(path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp == self._stamp:
                return False
            with open(path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            if initial:
                raise
            reason = (exc.strerror or exc) if isinstance(exc, OSError) else "not UTF-8 text"
            problem = f"cannot read {path} ({reason}); keeping the last token"
            if problem != self._read_error:
                log.error("router token file: %s", problem)
                self._read_error = problem
            return False
        self._stamp = stamp
        if not token:
            if initial:
                raise ValueError(f"token file {path} is empty")
            if self._read_error != "empty":
                log.error("router token file %s is empty; keeping the last token", path)
                self._read_error = "empty"
            return False
        self._read_error = ""
        changed = token != self.token
        register_secrets(token)  # masked if it ever reaches a log line
        self.token = token
        if changed and not initial:
            self.reloads += 1
            log.info("router token re-read from %s (changed); new calls use it", path)
        return changed

    def start(self, supervisor: Supervisor) -> None:
        """Watch the token file (if any) as `supervisor`'s service `token_file`."""
        if self.token_file and not supervisor.running(self.service):
            self._supervisor = supervisor
            supervisor.spawn(self.service, self._watch)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            self._load()

    def check_now(self) -> bool:
        """Re-read the file now if it changed (tests, SIGHUP); True when the token changed."""
        return bool(self.token_file) and self._load()

    async def aclose(self) -> None:
        if self._supervisor is not None:
            await self._supervisor.stop(self.service)
            self._supervisor = None
