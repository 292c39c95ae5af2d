"""A round job's lease refresh ends with the job, even when it is cancelled in the middle of
a Redis command (redis-py's asyncio client then mostly lets the command return as if nothing
happened): a refresh that went on made the job wait for it forever, and its heartbeat kept
SAQ from sweeping the job, so the round never completed."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Coroutine
from typing import Any

import pytest

from gitlab_producer.objects.engine import Call
from gitlab_producer.store.redis_store import connect
from gitlab_producer.sync import shared_rounds
from gitlab_producer.tasks import cancel_and_wait
from tests.conftest import TEST_REDIS_DB

ROUNDS = 100


async def ends_within(body: Coroutine[Any, Any, None], timeout_s: float) -> None:
    """Run ``body``; fail unless it ends by itself within ``timeout_s`` (``wait_for`` would
    cancel it at the timeout, which ends a body stuck on a lost cancellation)."""
    task = asyncio.create_task(body)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        pytest.fail(f"still running after {timeout_s} s: {task!r}")
    task.result()


async def test_the_refresh_ends_with_the_job_when_cancelled_inside_a_redis_call(
        redis_address: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_rounds, "JOB_HEARTBEAT_S", 0.03)  # a refresh every 10 ms
    client = connect(redis_address, db=TEST_REDIS_DB)
    in_flight = asyncio.Event()

    async def heartbeat() -> None:  # what SAQ's job.update() does: a command or two
        in_flight.set()
        await client.set(f"{redis_prefix}lease", "1", px=60_000)

    async def job() -> None:
        in_flight.clear()
        async with shared_rounds.beating(Call(1, 1, heartbeat)):
            await in_flight.wait()  # the job ends while a refresh is on its way
            await asyncio.sleep(random.uniform(0, 0.002))

    try:
        for _ in range(ROUNDS):
            await ends_within(job(), 5)
    finally:
        await client.aclose()


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again() -> None:
    ended = asyncio.Event()

    async def stubborn() -> None:
        try:
            with contextlib.suppress(asyncio.CancelledError):  # as a library call may do
                await asyncio.sleep(60)
            await asyncio.sleep(60)
        finally:
            ended.set()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await ends_within(cancel_and_wait(task), 5)
    assert ended.is_set() and task.cancelled()


async def test_an_error_the_task_ended_with_is_raised() -> None:
    async def failing() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await cancel_and_wait(task)
