"""The job engine under the import: SAQ over Redis, or an in-process dispatcher on the
embedded store. Both run the same handlers with the same contract:

- ``enqueue(function, key, kwargs, at)``: run ``function`` once at or after ``at`` (Unix
  time). A key already pending (queued, scheduled or running) is not enqueued again. A running
  job cannot re-enqueue its own key (SAQ refuses it): callers give every generation of a
  rescheduled job or a waiter a fresh key.
- ``pending(keys)``: which of ``keys`` are queued, scheduled or running.
- A handler that raises is retried with capped backoff until ``max_attempts``; the handler sees
  its attempt number and decides itself what the last failure means (the import records the
  job as failed in the store instead of raising, so nothing lands in a dead list).
- ``Call.heartbeat()`` refreshes the job's lease: SAQ's sweep declares a job whose worker died
  stuck after ``heartbeat_s`` (``BACKFILL_JOB_HEARTBEAT``) without one, and runs it again
  (``retries`` > attempts): a dead worker's job restarts within a heartbeat plus a sweep.

The queue only dispatches: the import's state lives in the store, and after a crash the
pending work is derived again from it (``Importer.resume``), so a lost queue loses nothing.
The in-process dispatcher keeps its queue in memory for exactly that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.exceptions import RedisError

from gitlab_producer.logs import get_logger

log = get_logger(__name__)

MAX_SWEEP_S = 30  # a SAQ worker looks for jobs whose worker died at least this often
# SAQ's sweep waits this long (its default: 5 s) for each stuck job's worker to abort it, one
# job after the other: 17 jobs of a killed worker took 85 s to be taken over. A dead worker
# never answers; a live one aborts within its abort timer (1 s), so a job may overlap its own
# retry briefly, which the handlers tolerate (claims, done checks).
SWEEP_ABORT_WAIT_S = 0.25
RETRY_BASE_S = 1.0
RETRY_CAP_S = 60.0


@dataclass(frozen=True)
class Call:
    """What a handler knows about its run."""

    attempt: int  # 1 on the first run
    max_attempts: int
    heartbeat: Callable[[], Awaitable[None]]

    @property
    def last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts


Handler = Callable[[Call, dict[str, Any]], Awaitable[None]]


class Dispatcher(Protocol):
    """Where jobs are enqueued (see the module docstring for the contract)."""

    async def enqueue(self, function: str, key: str, kwargs: dict[str, Any],
                      at: float = 0.0) -> None:
        """Run ``function(**kwargs)`` at or after ``at``, unless ``key`` is pending."""

    async def pending(self, keys: Iterable[str]) -> set[str]:
        """The keys among ``keys`` that are queued, scheduled or running."""


def _wake(sleeper: asyncio.Future[None]) -> None:
    if not sleeper.done():
        sleeper.set_result(None)


async def _no_heartbeat() -> None:
    return None


def backoff_s(attempt: int, rng: random.Random) -> float:
    return rng.uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2.0 ** max(0, attempt - 1)))


@dataclass(order=True)
class _Entry:
    at: float
    seq: int
    key: str = field(compare=False)
    function: str = field(compare=False)
    kwargs: dict[str, Any] = field(compare=False)
    attempt: int = field(compare=False, default=0)


class LocalDispatcher:
    """The embedded mode: a heap of scheduled calls served by ``concurrency`` tasks."""

    def __init__(self, handlers: dict[str, Handler] | None = None, concurrency: int = 8,
                 max_attempts: int = 3, rng: random.Random | None = None) -> None:
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self._heap: list[_Entry] = []
        self._keys: set[str] = set()
        self._seq = itertools.count()
        # One future per idle server: a new entry wakes one of them, not all (16 servers woken
        # for every enqueue cost more than the jobs they then did not find).
        self._sleepers: deque[asyncio.Future[None]] = deque()
        self._rng = rng or random.Random()
        self.running = 0

    async def enqueue(self, function: str, key: str, kwargs: dict[str, Any],
                      at: float = 0.0) -> None:
        if key in self._keys:
            return
        self._keys.add(key)
        heapq.heappush(self._heap, _Entry(at, next(self._seq), key, function, kwargs))
        self._wake_one()

    def _wake_one(self) -> None:
        while self._sleepers:
            sleeper = self._sleepers.popleft()
            if not sleeper.done():
                sleeper.set_result(None)
                return

    def _wake_all(self) -> None:
        while self._sleepers:
            sleeper = self._sleepers.popleft()
            if not sleeper.done():
                sleeper.set_result(None)

    async def pending(self, keys: Iterable[str]) -> set[str]:
        return {k for k in keys if k in self._keys}

    @property
    def idle(self) -> bool:
        return not self._keys

    async def run(self, stop: asyncio.Event) -> None:
        """Serve calls until ``stop`` is set."""
        async with asyncio.TaskGroup() as group:
            for _ in range(self.concurrency):
                group.create_task(self._serve(stop))
            await stop.wait()
            self._wake_all()

    async def _next(self, stop: asyncio.Event) -> _Entry | None:
        while not stop.is_set():
            now = time.time()
            if self._heap and self._heap[0].at <= now:
                entry = heapq.heappop(self._heap)
                if self._heap and self._heap[0].at <= now:
                    self._wake_one()  # more is ready: another sleeper takes it
                return entry
            loop = asyncio.get_running_loop()
            sleeper = loop.create_future()
            self._sleepers.append(sleeper)
            # A timer that wakes the sleeper (asyncio.wait_for costs a future, a callback and
            # a cancellation more, for each of the servers' thousands of naps).
            timer = (loop.call_later(self._heap[0].at - now, _wake, sleeper) if self._heap
                     else None)
            try:
                await sleeper
            finally:
                if timer is not None:
                    timer.cancel()
        return None

    async def _serve(self, stop: asyncio.Event) -> None:
        while True:
            entry = await self._next(stop)
            if entry is None:
                self._wake_all()  # let the other servers see the stop too
                return
            entry.attempt += 1
            self.running += 1
            try:
                await self.handlers[entry.function](
                    Call(entry.attempt, self.max_attempts, _no_heartbeat), entry.kwargs)
            except Exception as exc:
                if entry.attempt < self.max_attempts:
                    entry.at = time.time() + backoff_s(entry.attempt, self._rng)
                    heapq.heappush(self._heap, entry)
                    self._wake_one()
                    log.warning("job_retry", key=entry.key, attempt=entry.attempt,
                                error=str(exc) or type(exc).__name__)
                    continue
                log.error("job_gave_up", key=entry.key, attempts=entry.attempt,
                          error=str(exc) or type(exc).__name__)
                self._keys.discard(entry.key)
            else:
                self._keys.discard(entry.key)
            finally:
                self.running -= 1


class SaqDispatcher:
    """Jobs on SAQ over Redis: any number of ``gitlab-producer worker`` processes serve them.

    Every job sets its own ``timeout`` (SAQ's default is 10 s), a ``heartbeat`` and
    ``retries`` = attempts (a job swept after its worker died is aborted unless ``retries`` >
    attempts, so retries leave room for that). Keys carry the store's key prefix: SAQ's abort
    keys (``saq:abort:<key>``) are not namespaced by queue.
    """

    def __init__(self, redis_url: str, queue_name: str, key_prefix: str, timeout_s: int,
                 max_attempts: int, heartbeat_s: int, password: str = "") -> None:
        from redis import asyncio as aioredis

        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.heartbeat_s = heartbeat_s
        self.queue = _quickly_sweeping_queue()(
            aioredis.from_url(redis_url, password=password or None), name=queue_name)

    async def connect(self) -> None:
        await self.queue.connect()

    async def close(self) -> None:
        """Let go of the queue's connections. SAQ's disconnect talks to Redis: a Redis that
        never answered (or is gone) must not turn a clean exit into a traceback."""
        with contextlib.suppress(RedisError, OSError):
            await self.queue.disconnect()

    async def enqueue(self, function: str, key: str, kwargs: dict[str, Any],
                      at: float = 0.0) -> None:
        await self.queue.enqueue(
            function, key=self.key_prefix + key, scheduled=int(at + 0.999) if at else 0,
            timeout=self.timeout_s, heartbeat=self.heartbeat_s, retries=self.max_attempts + 1,
            retry_delay=RETRY_BASE_S, retry_backoff=RETRY_CAP_S, ttl=3600, **kwargs)

    async def pending(self, keys: Iterable[str]) -> set[str]:
        from saq.job import ACTIVE_STATUSES

        wanted = list(keys)
        jobs = await self.queue.jobs([self.key_prefix + k for k in wanted])
        return {k for k, job in zip(wanted, jobs, strict=True)
                if job is not None and job.status in ACTIVE_STATUSES}

    def worker(self, handlers: dict[str, Handler], concurrency: int,
               shutdown_grace_s: int = 5) -> Any:
        """A SAQ worker serving ``handlers`` (call ``start()`` / ``stop()``). Its ``stop()``
        waits ``shutdown_grace_s`` for its tasks, idle ones included, then cancels them (a
        cancelled job goes back to the queue)."""
        from saq import Worker

        def wrap(handler: Handler) -> Callable[..., Awaitable[None]]:
            async def run(ctx: dict[str, Any], **kwargs: Any) -> None:
                job = ctx["job"]
                # One attempt of the ``retries`` is kept for a sweep after a worker's death.
                await handler(Call(job.attempts, job.retries - 1, job.update), kwargs)
            return run

        return Worker(self.queue, [(name, wrap(h)) for name, h in handlers.items()],
                      concurrency=concurrency,
                      timers={"schedule": 1, "abort": 1, "worker_info": 10,
                              "sweep": max(1, min(MAX_SWEEP_S, self.heartbeat_s // 2))},
                      shutdown_grace_period_s=shutdown_grace_s)


async def stop_at_once(worker: Any) -> None:
    """Stop a SAQ worker of :meth:`SaqDispatcher.worker` without its grace, for when none of
    its jobs is in flight: SAQ's grace waits for every task of the worker, its endless upkeep
    timers included, so a grace always lasts to its end (a job taken meanwhile is cancelled
    and goes back to the queue, as at the grace's end)."""
    worker._shutdown_grace_period_s = 0
    await worker.stop()


@functools.cache
def _quickly_sweeping_queue() -> Any:
    """SAQ's Redis queue whose sweep waits :data:`SWEEP_ABORT_WAIT_S` per stuck job."""
    from saq.queue.redis import RedisQueue

    class QuicklySweepingQueue(RedisQueue):
        async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
            return await super().sweep(lock, min(abort, SWEEP_ABORT_WAIT_S))

    return QuicklySweepingQueue
