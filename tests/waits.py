"""Bounded waits for a condition. A wait that times out fails the test (AssertionError naming
what was awaited); it never returns as if the condition had been met."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str,
               interval_s: float = 0.1,
               ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Poll ``predicate`` until it returns something truthy (returned to the caller); fail
    with ``what`` after ``timeout_s``. Exceptions in ``ignore`` count as "not yet"."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except ignore as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{detail}")
        time.sleep(interval_s)


async def wait_until_async(predicate: Callable[[], Awaitable[T]], timeout_s: float, what: str,
                           interval_s: float = 0.05) -> T:
    """:func:`wait_until` for a coroutine predicate, without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


class Stalled:
    """A predicate that holds once ``probe()`` has returned the same value for ``quiet_s``:
    "the process has stopped making progress" (e.g. readers blocked on a paused broker)."""

    def __init__(self, probe: Callable[[], object], quiet_s: float) -> None:
        self.probe = probe
        self.quiet_s = quiet_s
        self._last: object = object()
        self._since = time.monotonic()

    def __call__(self) -> bool:
        value = self.probe()
        now = time.monotonic()
        if value != self._last:
            self._last, self._since = value, now
            return False
        return now - self._since >= self.quiet_s
