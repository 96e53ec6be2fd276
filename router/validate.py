"""Validators for settings: small pure functions that say exactly what is wrong with a value.

Job: every check a setting's value goes through, once. `router.settings` names a validator per
setting; `RouterConfig` and `AcpConfig` run them, so a check shared by both exists here only.

Invariants:
- A leaf module: it imports the standard library only, never the rest of `router`, so every
  module (configs, the CLI, the table) can use it without an import cycle.
- A validator is called as `check(label, value)`; `label` is what the operator typed (a flag
  such as `--probe-timeout-ms`). It returns None or raises ValueError with one line that names
  the label and the accepted range, so start-up fails with a message that says what to change.
- Validators never read files' contents, the network or the environment; `file_exists` only
  asks whether the path is a file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from typing import Any

Validator = Callable[[str, Any], None]


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) -> (host, port); ValueError naming `what`."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{what}: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def host_port(label: str, value: str | None) -> None:
    """A `HOST:PORT` address (unset is fine: whether it is required is another check)."""
    if value:
        parse_host_port(value, label)


def between(low: float, high: float, *, low_text: str | None = None,
            high_text: str | None = None) -> Validator:
    """`low <= value <= high`; the message can spell the bounds (`1 MiB`) instead of digits."""
    def check(label: str, value: float) -> None:
        if not low <= value <= high:
            raise ValueError(f"{label} must be between {low_text or low} and {high_text or high}")
    return check


def at_least(low: float) -> Validator:
    """`value >= low`."""
    def check(label: str, value: float) -> None:
        if value < low:
            raise ValueError(f"{label} must be >= {low}")
    return check


def positive(label: str, value: float) -> None:
    """`value > 0`."""
    if value <= 0:
        raise ValueError(f"{label} must be > 0")


def one_of(choices: Collection[str], *, fold_case: bool = False) -> Validator:
    """One of `choices` (optionally ignoring case)."""
    def check(label: str, value: str) -> None:
        if (value.lower() if fold_case else value) not in choices:
            names = list(choices)
            spelled = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
            raise ValueError(f"{label} must be {spelled}")
    return check


def file_exists(label: str, value: str | None) -> None:
    """Unset, or the path of an existing file."""
    if value and not os.path.isfile(value):
        raise ValueError(f"{label}: no such file {value!r}")


def not_prefixed(prefix: str, reason: str) -> Validator:
    """A text that must not start with `prefix` (`reason` says why)."""
    def check(label: str, value: str) -> None:
        if value.startswith(prefix):
            raise ValueError(f"{label} must not be {prefix!r} ({reason})")
    return check


def unique_names(label: str, value: Collection[Any]) -> None:
    """Items with a `name` attribute (pod specs): no name twice."""
    names = [item.name for item in value]
    if len(set(names)) != len(names):
        raise ValueError(f"{label}: duplicate pod names")


def parse_named_targets(
    text: str, *, what: str, form: str, check: Callable[[str, str], str | None]
) -> list[tuple[str, str]]:
    """Parse `NAME=TARGET[,NAME=TARGET...]` (a pod list flag); ValueError naming the bad part.

    `check(name, target)` returns what is wrong with one target, or None. Names and targets
    must each be unique, and the list must not be empty.
    """
    entries: list[tuple[str, str]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, target = item.partition("=")
        name, target = name.strip(), target.strip()
        if not sep or not name or not target:
            raise ValueError(f"{what} entry {item!r} is not {form}")
        problem = check(name, target)
        if problem:
            raise ValueError(problem)
        if any(name == seen for seen, _ in entries):
            raise ValueError(f"{what} name {name!r} appears twice")
        if any(target == seen for _, seen in entries):
            raise ValueError(f"{what} {'URL' if '://' in target else 'address'} {target!r} "
                             "appears twice")
        entries.append((name, target))
    if not entries:
        raise ValueError(f"no {what}s given (expected {form}[,...])")
    return entries


def parse_workers(value: str | int) -> int:
    """`--workers N|auto` -> a process count (auto = the CPUs this process may run on)."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else (os.cpu_count() or 1))
    try:
        workers = int(value)
    except ValueError:
        raise ValueError(f"--workers: {value!r} is not a number or 'auto'") from None
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    return workers


def comma_list(text: str | None) -> frozenset[str]:
    """`A,B, C` -> {"A", "B", "C"} (blank items dropped; unset -> empty)."""
    return frozenset(item.strip() for item in (text or "").split(",") if item.strip())


def truthy(text: str) -> bool:
    """An environment variable's text as a switch: 1/true/yes/on (any case) mean on."""
    return text.strip().lower() in ("1", "true", "yes", "on")
