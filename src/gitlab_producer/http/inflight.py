"""A cap on the bytes that webhook requests hold at once (``WEBHOOK_MAX_INFLIGHT_BYTES``).

A request reserves its declared body size before reading it and returns it once answered, so
twenty 24 MiB bodies arriving together are read a few at a time instead of all at once.
Waiters are served in arrival order: a large body is not starved by a stream of small ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class ByteBudget:
    """``capacity`` bytes shared by all requests; :meth:`acquire` waits for room."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, size: int) -> None:
        """Reserve ``size`` bytes (at most ``capacity``), waiting in line for room; the caller
        bounds the wait (``asyncio.timeout``) and calls :meth:`release` once done."""
        if size > self.capacity:
            raise ValueError(f"{size} bytes can never fit in {self.capacity}")
        if not self._waiters and self.used + size <= self.capacity:
            self.used += size
            return
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except BaseException:
            if entry[1].done() and not entry[1].cancelled():
                self.release(size)  # granted just as the wait was given up
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()  # the ones behind may fit now
            raise

    def release(self, size: int) -> None:
        self.used -= size
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            size, future = self._waiters.popleft()
            if not future.done():
                self.used += size
                future.set_result(None)
