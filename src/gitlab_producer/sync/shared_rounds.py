"""The polling rounds shared by every instance on one Redis, as SAQ jobs (issue 15).

With ``REDIS_ADDRESS`` set, a round is not one process's work but a set of jobs on the queue
``{prefix}rounds`` that every ``run`` process serves:

1. Whichever instance is first when a round is due opens it (one Lua script: the next number,
   its start, and its discovery job ``round:<n>:discover`` recorded as open) and enqueues that
   job; the others find it open and wait for it. N instances create a round once.
2. The discovery job lists projects and users exactly as the in-process round does (the same
   :class:`~gitlab_producer.sync.round.SyncRound` code, with the retry set loaded), and turns
   the entities to read into batch jobs ``round:<n>:projects:<first id>.<digest>`` (or
   ``users``) of up to :data:`ENTITY_BATCH` entities, recorded as open before they are
   enqueued (the engine's cost is per job: batches make it a few microseconds per event).
3. Any instance takes those jobs; each reads its entities from their cursors and records the
   job as done with every entity's outcome in one script (synced, skipped or failed; a failed
   entity is kept in the retry set and fails the round).
4. The job that leaves the open set empty completes the round (same script): only when no job
   failed does its start become the next round's base (:mod:`gitlab_producer.sync.round_state`).

A killed instance's jobs stop their heartbeat (:data:`JOB_HEARTBEAT_S`); SAQ's sweep (every
half heartbeat) gives them to another instance, which reads the batch again from the stored
cursors (the entities the dead run finished have nothing new): only pages in flight repeat,
and the claims keep them from being produced twice. A job SAQ lost
(swept in the moment between dequeue and start, or never enqueued because its discoverer died)
is found by any waiting instance in the open set without a pending job, twice in a row, and
enqueued again from its recorded arguments (at most :data:`MAX_REQUEUES` times; then it counts
as failed and the entity is kept for retry). The queue only dispatches: the round's state is in
Redis, so a crash of any instance re-derives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import RedisError

from gitlab_producer.config import Settings
from gitlab_producer.gitlab.connect import client_from_settings
from gitlab_producer.gitlab.errors import FatalGitLabError
from gitlab_producer.logs import get_logger
from gitlab_producer.metrics import Metrics
from gitlab_producer.objects.engine import Call, Handler, SaqDispatcher
from gitlab_producer.sinks import open_sink
from gitlab_producer.store.base import Cursor, Store, StoreError
from gitlab_producer.store.redis_store import RedisStore
from gitlab_producer.sync.context import SINCE_KEY, sync_context
from gitlab_producer.sync.entities import Interrupted, SyncContext, Work
from gitlab_producer.sync.retries import Pending, RetrySet
from gitlab_producer.sync.round import (
    LAST_ROUND_KEY,
    LAST_USER_LISTING_KEY,
    RoundResult,
    SyncRound,
)
from gitlab_producer.sync.round_state import RoundState, RoundSummary
from gitlab_producer.tasks import cancel_and_wait

log = get_logger(__name__)
DISCOVER = "round_discover"
ENTITY = "round_entity"
JOB_HEARTBEAT_S = 10  # a dead instance's job is swept after this (plus a sweep: 5 s)
JOB_TIMEOUT_S = 6 * 3600  # a first read of a long history may take long: the heartbeat decides
JOB_ATTEMPTS = 10  # runs of one job (sweeps after deaths, stops of an instance)
MAX_REQUEUES = 3
WAIT_POLL_S = 0.25  # how often a waiting instance looks at the round
SUPERVISE_S = 5.0  # how often it looks for lost jobs
ADD_BATCH = 100  # entities recorded by one script
# Entities per job at most: the engine costs about half a millisecond of CPU per job, which on
# a job per entity came to a third of what the round itself costs per event. A job reads its
# entities at once (the instance's read slots bound them), so a batch need not be small for
# the instance to read at full concurrency.
ENTITY_BATCH = 25
# The entities recorded together are split into at least this many jobs, so that other
# instances have a share of them.
JOBS_PER_ADD = 4
FILL_S = 0.05  # how long a discovery reader lets a listing page fill a batch
WAIT_FOR_RUN_S = 1.0  # a worker started before any `run` instance looks again this often


def discover_key(number: int | str) -> str:
    return f"round:{number}:discover"


def batch_key(number: int, kind: str, ids: list[int]) -> str:
    """A batch's job key: its first entity and a digest of all of them (two batches of one
    round never share a key, whatever the grouping)."""
    digest = hashlib.blake2b(",".join(map(str, ids)).encode(), digest_size=4).hexdigest()
    return f"round:{number}:{kind}s:{ids[0]}.{digest}"


def job_key(number: int, args: dict[str, Any]) -> str:
    """The key of an entity job from its arguments (a job of one entity, as enqueued before
    batches: ``round:<n>:<kind>:<id>``)."""
    kind = str(args["kind"])
    if "entities" in args:
        return batch_key(number, kind, [int(e["id"]) for e in args["entities"]])
    return f"round:{number}:{kind}:{args['id']}"


def job_args(kind: str, works: list[tuple[Work, Pending | None]]) -> dict[str, Any]:
    """A batch job's arguments (JSON): per entity, the cursor discovery saw, its retry entry."""
    return {"kind": kind, "entities": [
        {"id": w.entity_id, "activity": w.activity,
         "cursor": [w.cursor.synced_at, w.cursor.activity] if w.cursor else None,
         "retry": retry.dumps() if retry else None} for w, retry in works]}


def works_from(args: dict[str, Any]) -> list[tuple[Work, str | None]]:
    """The entities of a job, each with its retry entry (serialized)."""
    kind = str(args["kind"])
    found = []
    for entry in args.get("entities", [args]):
        cursor = entry.get("cursor")
        found.append((Work(kind, int(entry["id"]), str(entry["activity"]),
                           Cursor(float(cursor[0]), str(cursor[1])) if cursor else None),
                      entry.get("retry")))
    return found


@contextlib.asynccontextmanager
async def round_runner(ctx: SyncContext, settings: Settings, once: bool = False
                       ) -> AsyncIterator[SyncRound | SharedRounds]:
    """The rounds of this process: shared through SAQ when the store is Redis, else the
    in-process :class:`SyncRound` as before. ``once`` (``run --once``): a round opens at once
    unless one is open, whenever the last one opened."""
    if not isinstance(ctx.store, RedisStore):
        yield SyncRound(ctx, settings.gitlab_concurrency, settings.sync_users)
        return
    shared = SharedRounds(ctx, settings, 0.0 if once else settings.scheduling_poll_interval)
    await shared.start()
    try:
        yield shared
    finally:
        await shared.close()


@contextlib.asynccontextmanager
async def round_jobs_served(settings: Settings, store: Store, metrics: Metrics
                            ) -> AsyncIterator[None]:
    """For ``gitlab-producer worker``: take the shared rounds' jobs as well while the body runs
    (a worker never opens a round). It starts once a ``run`` instance fixed the sync's start in
    the store; at the end, running jobs get ``SHUTDOWN_GRACE``, then go back to the queue."""
    stop = asyncio.Event()
    task = asyncio.create_task(_serve_round_jobs(settings, store, metrics, stop))
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(Exception):  # logged there
            await task


async def _serve_round_jobs(settings: Settings, store: Store, metrics: Metrics,
                            stop: asyncio.Event) -> None:
    since = None
    while since is None and not stop.is_set():
        try:
            since = await store.get_meta(SINCE_KEY)
        except StoreError as exc:
            log.warning("round_jobs_waiting", error=str(exc))
        if since is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WAIT_FOR_RUN_S)
    if since is None:
        return
    s = settings
    client = client_from_settings(s, metrics, max_connections=max(4, s.gitlab_concurrency * 2 + 2),
                                  rate_limit_retries=s.gitlab_rate_limit_retries)
    sink = open_sink(s)
    shared = SharedRounds(sync_context(s, client, store, sink, metrics, float(since), stop), s)
    try:
        await shared.start()
        await stop.wait()
    except Exception as exc:
        log.error("round_jobs_failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        await shared.close()
        await sink.close()
        await client.aclose()


@contextlib.asynccontextmanager
async def beating(call: Call) -> AsyncIterator[None]:
    """Refresh the job's lease while the body runs (a killed process stops refreshing it)."""
    async def beat() -> None:
        while True:
            await asyncio.sleep(JOB_HEARTBEAT_S / 3)
            with contextlib.suppress(RedisError, OSError):
                await call.heartbeat()

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        await cancel_and_wait(task)


class _Discovery(SyncRound):
    """The in-process round's discovery, whose readers enqueue jobs instead of reading."""

    def __init__(self, shared: SharedRounds, number: int) -> None:
        super().__init__(shared.ctx, shared.settings.gitlab_concurrency,
                         shared.settings.sync_users)
        self.shared = shared
        self.number = number
        self.listed_users = False
        self._gathered: dict[int, list[Work]] = {}

    async def _reader(self, queue: asyncio.Queue[Work | None], result: RoundResult) -> None:
        # The readers of one queue gather what discovery queued into one list and record it
        # in one script: whoever finds the queue empty lets a listing page fill it a moment
        # (so that its jobs are batches), then takes it all. Each reader takes one end mark.
        gathered = self._gathered.setdefault(id(queue), [])
        while (work := await queue.get()) is not None:
            gathered.append(work)
            if len(gathered) < ADD_BATCH:
                if queue.empty():
                    await asyncio.sleep(FILL_S)  # the listing's next entries may be coming
                if not queue.empty():
                    continue
            await self._record(gathered)
        while gathered:
            await self._record(gathered)

    async def _record(self, gathered: list[Work]) -> None:
        works = gathered[:ADD_BATCH]
        del gathered[:ADD_BATCH]
        if works and not self.ctx.stop.is_set():
            await self.shared.add_entities(self.number, [
                (w, self.retries.pending[w.kind].get(w.entity_id)) for w in works])

    async def _finish(self, result: RoundResult, listed_users: bool) -> None:
        self.listed_users = listed_users  # the base is written when the last job is done


class SharedRounds:
    """This instance's part in the shared rounds: serves their jobs, opens a round when one is
    due, and waits for the one it opened or joined (see the module docstring)."""

    def __init__(self, ctx: SyncContext, settings: Settings,
                 interval_s: float | None = None) -> None:
        assert isinstance(ctx.store, RedisStore)
        self.ctx = ctx
        self.settings = settings
        # The least time between two rounds' openings (across all instances).
        self.interval_s = settings.scheduling_poll_interval if interval_s is None else interval_s
        s = settings
        self.state = RoundState(ctx.store.client, s.redis_key_prefix, LAST_ROUND_KEY,
                                LAST_USER_LISTING_KEY)
        host, port, password = s.redis_endpoint
        self.dispatcher = SaqDispatcher(f"redis://{host}:{port}/{s.redis_db}",
                                        f"{s.redis_key_prefix}rounds", s.redis_key_prefix,
                                        JOB_TIMEOUT_S, JOB_ATTEMPTS, JOB_HEARTBEAT_S, password)
        self.handlers: dict[str, Handler] = {DISCOVER: self._counted(self.discover),
                                             ENTITY: self._counted(self.read_entities)}
        self.concurrency = s.gitlab_concurrency * (2 if s.sync_users else 1) + 1
        # The entities this instance reads at once, whatever the jobs: as many as the
        # in-process round's readers.
        self._reads = asyncio.Semaphore(self.concurrency - 1)
        self._worker: Any = None
        self._serving: asyncio.Task[Any] | None = None
        self._suspects: set[str] = set()  # open, not pending at the last look
        self.running = 0  # jobs running here
        self._idle = asyncio.Event()
        self._idle.set()
        self._produced = SyncRound(ctx, 1)._produced

    async def start(self) -> None:
        await self.dispatcher.connect()
        # No grace of SAQ's own: it would wait it out for idle tasks too (close() waits for
        # the running jobs instead).
        self._worker = self.dispatcher.worker(self.handlers, self.concurrency, 0)
        self._worker.SIGNALS = []  # SAQ would take SIGTERM from the service (its own stop)
        self._serving = asyncio.create_task(self._worker.start())
        # The worker's id is how SAQ's records of running jobs name this instance.
        log.info("shared_rounds_serving", queue=f"{self.settings.redis_key_prefix}rounds",
                 concurrency=self.concurrency, worker=str(self._worker.id))

    async def close(self) -> None:
        """Stop serving: running jobs get ``SHUTDOWN_GRACE`` (the service's stop interrupts
        their reads after the page in flight, and a job that starts now is handed back at
        once), then SAQ cancels what is left; either way a job goes back to the queue and
        another instance takes it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.settings.shutdown_grace)
        if self._worker is not None:
            await self._worker.stop()
        if self._serving is not None:
            self._serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._serving
        await self.dispatcher.close()

    def _counted(self, handler: Handler) -> Handler:
        async def run(call: Call, kwargs: dict[str, Any]) -> None:
            self.running += 1
            self._idle.clear()
            try:
                await handler(call, kwargs)
            finally:
                self.running -= 1
                if not self.running:
                    self._idle.set()
        return run

    # -- rounds --------------------------------------------------------------------------
    async def run(self) -> RoundResult:
        """Open the next round when due (or join the open one), wait until it is complete,
        wherever its jobs ran; its result (``produced``: by this instance meanwhile)."""
        produced_before = self._produced()
        try:
            number = await self._open_or_join()
            if number is None:
                return RoundResult(started=time.time(), ok=False, error="interrupted")
            summary = await self._wait(number)
        except (StoreError, RedisError, OSError) as exc:
            return RoundResult(started=time.time(), ok=False,
                               error=f"{type(exc).__name__}: {exc}")
        if summary is None:
            error = "interrupted" if self.ctx.stop.is_set() else f"round {number} lost in Redis"
            return RoundResult(started=time.time(), ok=False, error=error)
        result = RoundResult(started=summary.started_host, ok=summary.ok, error=summary.error,
                             duration_s=summary.duration_s)
        for outcome in ("queued", "synced", "failed", "skipped"):
            getattr(result, outcome).update(summary.counts[outcome])
        result.covered = summary.counts["covered"]["project"]
        result.produced = self._produced() - produced_before
        if not result.ok and not result.error and not any(result.failed.values()):
            result.error = "round failed"
        log.info("shared_round_complete", round=number, ok=result.ok)
        return result

    async def _open_or_join(self) -> int | None:
        clock = self.ctx.client.clock
        while not self.ctx.stop.is_set():
            started = time.time()
            number, state = await self.state.open(
                self.interval_s, clock.to_gitlab(started), started,
                discover_key("<n>"), {})
            if state == 1:
                log.info("shared_round_opened", round=number)
                await self.dispatcher.enqueue(DISCOVER, discover_key(number),
                                              {"round": number})
            if state >= 0:
                return number
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ctx.stop.wait(), min(-state / 1000, 5.0))
        return None

    async def _wait(self, number: int) -> RoundSummary | None:
        next_look = time.monotonic() + SUPERVISE_S
        self._suspects = set()
        while not self.ctx.stop.is_set():
            summary = await self.state.summary(number)
            if summary is None or summary.complete:
                return summary
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + SUPERVISE_S
                await self.supervise(number)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ctx.stop.wait(), WAIT_POLL_S)
        return None

    async def supervise(self, number: int) -> None:
        """Enqueue again the open jobs of round ``number`` that SAQ does not hold (seen so at
        two looks in a row: a job between being recorded and enqueued is not lost)."""
        jobs = await self.state.open_jobs(number)
        lost = set(jobs) - await self.dispatcher.pending(jobs)
        again, self._suspects = lost & self._suspects, lost
        for key in sorted(again):
            args = jobs[key]
            times = await self.state.requeued(number, key)
            if times > MAX_REQUEUES:
                await self._give_up(number, key, args)
                continue
            log.warning("round_job_requeued", key=key, times=times)
            self.ctx.metrics.round_jobs_requeued.inc()
            await self.dispatcher.enqueue(DISCOVER if key.endswith(":discover") else ENTITY,
                                          key, {"round": number, **args, "requeued": True})

    async def _give_up(self, number: int, key: str, args: dict[str, Any]) -> None:
        log.error("round_job_lost", key=key, detail="lost more than the allowed times; "
                  "counted as failed (an entity stays in the retry set)")
        if key.endswith(":discover"):
            await self.state.done(number, key, "failed", "round", "discovery lost")
            return
        works = works_from(args)
        retries = RetrySet(self.ctx.store, self.ctx.metrics, gauge=False)
        for work, _ in works:
            await retries.keep(work, "failed")
        await self.state.done(number, key, "failed", "", "job lost",
                              {f"failed:{args['kind']}": len(works)})

    # -- jobs ----------------------------------------------------------------------------
    async def add_entities(self, number: int, works: list[tuple[Work, Pending | None]]
                           ) -> None:
        """Record entities to read in round ``number`` (with their retry entries) as batch
        jobs and enqueue them (those not done already). A batch holds at most
        :data:`ENTITY_BATCH` entities of one kind, fewer when there are few (at least
        :data:`JOBS_PER_ADD` jobs), so that other instances have work too."""
        jobs: dict[str, dict[str, Any]] = {}
        for kind in dict.fromkeys(w.kind for w, _ in works):
            group = [(w, retry) for w, retry in works if w.kind == kind]
            size = max(1, min(ENTITY_BATCH, math.ceil(len(group) / JOBS_PER_ADD)))
            for start in range(0, len(group), size):
                batch = group[start:start + size]
                jobs[batch_key(number, kind, [w.entity_id for w, _ in batch])] = \
                    job_args(kind, batch)
        for key in await self.state.add_jobs(number, jobs):
            await self.dispatcher.enqueue(ENTITY, key, {"round": number, **jobs[key]})

    async def _job(self, call: Call, number: int, key: str, kwargs: dict[str, Any]) -> bool:
        """Whether the job is to run: not done before (a job run again or enqueued again may
        have been, before its last run ended), and this instance not stopping."""
        if (call.attempt > 1 or kwargs.get("requeued")) and await self.state.is_done(number, key):
            return False
        if self.ctx.stop.is_set():
            raise Interrupted(key)  # back to the queue: another instance takes it
        if call.attempt > 1:
            self.ctx.metrics.round_jobs_taken_over.inc()
            log.info("round_job_taken_over", key=key, attempt=call.attempt)
        return True

    async def discover(self, call: Call, kwargs: dict[str, Any]) -> None:
        number = int(kwargs["round"])
        key = discover_key(number)
        if not await self._job(call, number, key, kwargs):
            return
        discovery = _Discovery(self, number)
        async with beating(call):
            result = await discovery.run()
        if self.ctx.stop.is_set():
            raise Interrupted(key)  # not all listed: run again (what was added stays)
        counts = {f"queued:{kind}": n for kind, n in result.queued.items()}
        counts["covered"] = result.covered
        if result.ok:
            await self.state.done(number, key, "discovered", "round", counts=counts,
                                  listed_users=discovery.listed_users)
        else:
            log.warning("round_discovery_failed", round=number, error=result.error)
            await self.state.done(number, key, "failed", "round",
                                  result.error or "discovery failed", counts)
        self.ctx.metrics.round_jobs.labels("discover").inc()

    async def read_entities(self, call: Call, kwargs: dict[str, Any]) -> None:
        """A batch job: read its entities at once (within the instance's read slots), then
        record the job done with every outcome in one script. Run again (a takeover, a
        requeue), it reads each entity from its stored cursor: those the earlier run finished
        have nothing new."""
        number = int(kwargs["round"])
        kind = str(kwargs["kind"])
        key = job_key(number, kwargs)
        if not await self._job(call, number, key, kwargs):
            return
        works = works_from(kwargs)
        if call.attempt > 1 or kwargs.get("requeued"):
            stored = await self.ctx.store.cursors(kind, [w.entity_id for w, _ in works])
            works = [(Work(kind, w.entity_id, w.activity, stored.get(w.entity_id, w.cursor)), r)
                     for w, r in works]
        reader = SyncRound(self.ctx, 1, self.settings.sync_users)
        reader.retries = RetrySet(self.ctx.store, self.ctx.metrics, gauge=False)
        for work, retry in works:
            if retry:
                reader.retries.pending[kind][work.entity_id] = Pending.loads(retry)
        result = RoundResult(started=time.time())
        error = ""

        async def read(work: Work) -> None:
            async with self._reads:
                await reader.read_one(work, result)

        try:
            async with beating(call), asyncio.TaskGroup() as group:
                for work, _ in works:
                    group.create_task(read(work))
        except* FatalGitLabError as fatal:  # the token: the others would fail alike
            result.failed[kind] += 1
            error = str(fatal.exceptions[0])
        counts = {f"{outcome}:{kind}": found[kind] for outcome, found in
                  (("synced", result.synced), ("skipped", result.skipped),
                   ("failed", result.failed)) if found[kind]}
        if not error and sum(counts.values()) < len(works):
            raise Interrupted(key)  # the service stops: another instance reads the batch
        await self.state.done(number, key, "failed" if result.failed[kind] else "synced", "",
                              error, counts)
        self.ctx.metrics.round_jobs.labels(kind).inc()
