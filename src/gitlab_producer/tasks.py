"""Background tasks that live beside a body of work."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
# How long a cancelled task has to end before it is cancelled again.
RECANCEL_S = 0.1


async def cancel_and_wait(task: asyncio.Task[object]) -> None:
    """Cancel ``task`` and wait until it has ended (its cancellation is not an error; another
    exception it ended with is raised).

    A cancellation can be lost: redis-py's asyncio client (8.1) lets a command cancelled
    mid-flight return normally in most cases, so a loop of Redis calls went on, and the caller
    waited for it forever (a round job whose lease refresh was cancelled that way never
    finished, and its heartbeat kept it from being swept). The task is cancelled again until
    it ends: the next cancellation meets its next wait."""
    try:
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=RECANCEL_S)
    except asyncio.CancelledError:  # the caller is cancelled: the task must not outlive it
        task.cancel()
        raise
    if not task.cancelled():
        task.result()


class Stopped(Exception):
    """A stop signal came before the work was done (the work was cancelled)."""


async def unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T:
    """``work``'s result; :class:`Stopped` (``work`` cancelled) as soon as ``stop`` is set.
    What the cancelled work raises on its way out is of no interest once stopped."""
    task = asyncio.ensure_future(work)
    stop_wait = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_wait.cancel()
    if task.done():
        return task.result()
    with contextlib.suppress(Exception):
        await cancel_and_wait(task)
    raise Stopped
