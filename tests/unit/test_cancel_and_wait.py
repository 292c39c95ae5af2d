"""cancel_and_wait ends a task even when the task swallowed its first cancellation."""

from __future__ import annotations

import asyncio

import pytest

from gitlab_producer.tasks import cancel_and_wait


async def test_a_task_that_swallowed_its_cancellation_is_cancelled_again() -> None:
    swallowed = 0
    beating = asyncio.Event()

    async def beat() -> None:
        nonlocal swallowed
        while True:
            beating.set()
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:  # once, as a library that made it an error would
                if swallowed:
                    raise
                swallowed += 1

    task = asyncio.create_task(beat())
    await asyncio.wait_for(beating.wait(), 5)  # cancelled inside its loop, not before it ran
    # Bounded without cancelling the waiter (wait_for would wait for it to take its own
    # cancellation, which is the very wait that must not hang).
    waiter = asyncio.create_task(cancel_and_wait(task))
    await asyncio.wait({waiter}, timeout=10)
    assert waiter.done() and task.done() and swallowed == 1


async def test_an_error_of_the_task_is_raised() -> None:
    started = asyncio.Event()

    async def failing() -> None:
        try:
            started.set()
            await asyncio.sleep(60)
        finally:
            raise ValueError("while stopping")

    task = asyncio.create_task(failing())
    await asyncio.wait_for(started.wait(), 10)
    with pytest.raises(ValueError):
        await asyncio.wait_for(cancel_and_wait(task), 10)
