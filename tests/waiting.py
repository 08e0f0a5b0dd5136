"""Waiting for an event in a test: a bounded loop that fails saying what it waited for, so no test
sleeps and hopes, and none waits without a bound of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
INTERVAL = 0.05


def eventually(check: Callable[[], T], what: str | Callable[[], str], timeout: float = 30.0,
               interval: float = INTERVAL) -> T:
    """check() until it returns something true (returned), or fail after `timeout` seconds with
    `what` (a callable: called then, to show a log or state) and the last value check() gave."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(failure(what, timeout, result))
        time.sleep(interval)


async def eventually_async(check: Callable[[], T | Awaitable[T]], what: str | Callable[[], str],
                           timeout: float = 30.0, interval: float = INTERVAL) -> T:
    """eventually() inside an event loop: check() may be a coroutine function; the loop runs meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(failure(what, timeout, result))
        await asyncio.sleep(interval)


def failure(what: str | Callable[[], str], timeout: float, last: object) -> str:
    return f"not within {timeout:g} s: {what() if callable(what) else what} (last seen: {last!r})"
