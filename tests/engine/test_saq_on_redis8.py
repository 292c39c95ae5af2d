"""The slice of SAQ's behaviour the backfill relies on, run on the project's redis-py 8.

SAQ's ``redis`` extra pins redis-py below 8; the project installs SAQ without it. These tests
are the proof that what we use works on redis-py 8 against a real redis-server: idempotent
enqueue by key, retries, timeouts, heartbeats and the sweep of a dead worker's job, scheduled
jobs, and the pitfalls the engine layer works around (the 10 s default timeout, swept jobs
aborted unless ``retries`` > attempts, a running job cannot re-enqueue its own key).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
from saq import Job, Queue, Worker
from saq.job import Status


def test_redis_py_is_8() -> None:
    assert int(redis.__version__.split(".")[0]) == 8


@pytest.fixture
async def queue(own_redis: str) -> AsyncIterator[Queue]:
    q = Queue.from_url(own_redis, name=f"t-{uuid.uuid4().hex[:8]}")
    await q.connect()
    yield q
    await q.disconnect()


async def wait_until(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    pytest.fail("condition not reached in time")


async def started(w: Worker) -> asyncio.Task[None]:
    """Start ``w`` and return once its first sweep ran (it takes the sweep lock key)."""
    task = asyncio.create_task(w.start())

    async def swept() -> bool:
        return bool(await w.queue.redis.exists(f"saq:{w.queue.name}:sweep"))  # type: ignore[attr-defined]

    await wait_until(swept)
    return task


def worker(queue: Queue, functions: list[Any], **kwargs: Any) -> Worker:
    # Registered under explicit names: SAQ otherwise uses __qualname__ ("f.<locals>.g").
    # SAQ's sweep aborts a job it finds in the active list still marked "queued", which it is
    # between a worker's dequeue and its status update: seen here when the worker's first
    # sweep (at start) met the first dequeue. Tests enqueue after that sweep (``started``);
    # the engine re-dispatches jobs lost this way from the store's state.
    named = [(f.__name__, f) for f in functions]
    sweep_s = kwargs.pop("sweep_s", 60)
    return Worker(queue, named, concurrency=kwargs.pop("concurrency", 4),
                  timers={"schedule": 1, "sweep": sweep_s, "abort": 1, "worker_info": 1},
                  **kwargs)


async def test_enqueue_with_a_key_is_idempotent_while_pending(queue: Queue) -> None:
    first = await queue.enqueue("noop", key="k1")
    again = await queue.enqueue("noop", key="k1")
    other = await queue.enqueue("noop", key="k2")
    assert first is not None and other is not None
    assert again is None  # the pending job was kept, not doubled
    assert await queue.count("queued") == 2


async def test_default_timeout_is_ten_seconds_and_retries_count_attempts(queue: Queue) -> None:
    assert Job(function="x").timeout == 10  # the pitfall: every job must set its own
    calls: list[int] = []

    async def flaky(ctx: dict[str, Any]) -> str:
        calls.append(ctx["job"].attempts)
        if len(calls) < 3:
            raise RuntimeError("transient")
        return "ok"

    w = worker(queue, [flaky])
    task = await started(w)
    job = await queue.enqueue("flaky", key="f", retries=3, timeout=30)
    assert job is not None
    await wait_until(lambda: _status(queue, "f", Status.COMPLETE))
    assert calls == [1, 2, 3]
    await w.stop()
    task.cancel()


async def test_a_timeout_fails_the_attempt(queue: Queue) -> None:
    async def slow(ctx: dict[str, Any]) -> None:
        await asyncio.sleep(30)

    w = worker(queue, [slow])
    task = await started(w)
    await queue.enqueue("slow", key="s", timeout=1, retries=1)
    await wait_until(lambda: _status(queue, "s", Status.FAILED))
    await w.stop()
    task.cancel()


async def test_scheduled_job_waits_for_its_time(queue: Queue) -> None:
    ran_at: list[float] = []

    async def later(ctx: dict[str, Any]) -> None:
        ran_at.append(time.time())

    w = worker(queue, [later])
    task = await started(w)
    at = time.time() + 2
    await queue.enqueue("later", key="l", scheduled=int(at) + 1, timeout=10)
    await wait_until(lambda: _status(queue, "l", Status.COMPLETE))
    assert ran_at[0] >= int(at) + 1 - 0.05
    await w.stop()
    task.cancel()


async def test_a_running_job_cannot_enqueue_its_own_key(queue: Queue) -> None:
    seen: dict[str, Any] = {}

    async def self_requeue(ctx: dict[str, Any]) -> None:
        job: Job = ctx["job"]
        seen["same_key"] = await queue.enqueue("self_requeue", key=job.key)
        seen["fresh_key"] = await queue.enqueue("noop2", key=f"{job.key}:g2")

    async def noop2(ctx: dict[str, Any]) -> None:
        return None

    w = worker(queue, [self_requeue, noop2])
    task = await started(w)
    await queue.enqueue("self_requeue", key="r", timeout=10)
    await wait_until(lambda: _status(queue, "r:g2", Status.COMPLETE))
    assert seen["same_key"] is None  # refused: the engine uses a fresh key per generation
    assert seen["fresh_key"] is not None
    await w.stop()
    task.cancel()


async def _heartbeat_job_is_swept(queue: Queue, url: str, retries: int) -> Status:
    """A worker process is killed (SIGKILL: no finish, no retry written) while its heartbeat
    job runs; a second worker's sweep finds the job stuck after its heartbeat, and retries it
    or aborts it. Returns ACTIVE when the job ran again."""
    runs_key = f"{queue.name}:runs"
    dying = subprocess.Popen([sys.executable, str(Path(__file__).with_name("dying_worker.py")),
                              url, queue.name])
    try:
        async def swept() -> bool:  # enqueue after its first sweep (see ``started``)
            return bool(await queue.redis.exists(f"saq:{queue.name}:sweep"))  # type: ignore[attr-defined]

        await wait_until(swept)
        await queue.enqueue("beating", key="hb", timeout=0, heartbeat=1, retries=retries)

        async def running() -> bool:
            return bool(await queue.redis.llen(runs_key))  # type: ignore[attr-defined]

        await wait_until(running)
    finally:
        dying.kill()
        dying.wait(10)
    runs: list[str] = []

    async def beating(ctx: dict[str, Any]) -> None:
        runs.append(ctx["worker"].id)
        await asyncio.sleep(3600)

    second = worker(queue, [beating], id="alive", sweep_s=1)
    second_task = await started(second)

    async def decided() -> bool:
        job = await queue.job("hb")
        return job is not None and (job.status == Status.ABORTED or bool(runs))

    await wait_until(decided, 30)
    job = await queue.job("hb")
    assert job is not None
    await second.stop()
    second_task.cancel()
    return Status.ACTIVE if runs else job.status


async def test_swept_job_is_aborted_unless_retries_exceed_attempts(queue: Queue,
                                                                   own_redis: str) -> None:
    assert await _heartbeat_job_is_swept(queue, own_redis, retries=1) == Status.ABORTED


async def test_swept_job_with_retries_left_runs_again(own_redis: str) -> None:
    q = Queue.from_url(own_redis, name=f"t-{uuid.uuid4().hex[:8]}")
    await q.connect()
    try:
        assert await _heartbeat_job_is_swept(q, own_redis, retries=3) == Status.ACTIVE
    finally:
        await q.disconnect()


async def _status(queue: Queue, key: str, status: Status) -> bool:
    job = await queue.job(key)
    return job is not None and job.status == status
