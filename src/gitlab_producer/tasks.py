"""Background tasks that live beside a body of work."""

from __future__ import annotations

import asyncio
import contextlib

# How often a task that is still running after its cancellation is cancelled again.
RECANCEL_S = 1.0


async def cancel_and_wait(task: asyncio.Task[object]) -> None:
    """Cancel ``task`` and wait until it has ended (its cancellation is not an error).

    A task whose cancellation was swallowed (the library it awaited turned it into an error
    the task then suppressed, and went on) is cancelled again every :data:`RECANCEL_S`:
    seen in a round job's heartbeat, which kept beating after its job's reads were done, so
    the job stayed active, neither finished nor swept, and the round never completed."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_S)
    with contextlib.suppress(asyncio.CancelledError):
        task.result()
