"""Merge concurrent batch calls into fewer, larger ones (automatic pipelining).

Each page of events costs two Redis commands (look up, then mark). With many readers the
fixed cost of a command in redis-py (connection checkout, packing, timeouts, a wake-up of the
event loop) outweighed the per-key cost, so calls made while one is in flight are merged into
the next one. A lone call goes out at the next turn of the event loop, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_ITEMS = 2_000  # keys per merged command: bounds how long one command holds Redis


class Coalescer(Generic[T, R]):
    """Calls ``batch`` with the items of every call waiting at that moment, one call at a
    time, and gives each caller the results for its own items, in order. ``batch`` must
    return one result per item. A failure of a merged call fails every caller in it."""

    def __init__(self, batch: Callable[[list[T]], Awaitable[list[R]]],
                 max_items: int = MAX_ITEMS) -> None:
        self._batch = batch
        self._max_items = max_items
        self._waiting: list[tuple[Sequence[T], asyncio.Future[list[R]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def __call__(self, items: Sequence[T]) -> list[R]:
        if not items:
            return []
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self._waiting.append((items, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        group: list[tuple[Sequence[T], asyncio.Future[list[R]]]] = []
        try:
            while self._waiting:
                group = self._take()
                merged = [item for items, _ in group for item in items]
                try:
                    results = await self._batch(merged)
                except Exception as exc:  # each caller raises it, as if it had called alone
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for items, future in group:
                    if not future.done():  # a caller cancelled meanwhile
                        future.set_result(results[start:start + len(items)])
                    start += len(items)
        except BaseException:  # cancelled (shutdown): no caller may wait forever
            for _, future in group + self._waiting:
                future.cancel()
            self._waiting.clear()
            raise
        finally:
            self._flusher = None

    def _take(self) -> list[tuple[Sequence[T], asyncio.Future[list[R]]]]:
        """The oldest callers, up to ``max_items`` items (at least one caller)."""
        count = size = 0
        for items, _ in self._waiting:
            if count and size + len(items) > self._max_items:
                break
            count += 1
            size += len(items)
        group, self._waiting = self._waiting[:count], self._waiting[count:]
        return group
