"""Small asyncio helpers that behave on Python 3.11.

`asyncio.wait_for` on 3.11 swallows a cancellation that arrives while the awaited future is
already done, so a background loop waiting on an Event with `wait_for` can ignore `cancel()` and
hang its owner's `aclose()`. `asyncio.timeout` does not have that flaw; use these instead.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` seconds pass; True if it was set."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
