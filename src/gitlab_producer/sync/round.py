"""One sync round: four concurrent processes joined by bounded queues (seed 000).

discover projects -> queue -> N project readers
discover users    -> queue -> N user readers

A round succeeds only when every queued entity was read and delivered, or skipped (a 403 or
404 on its events, or a 429 that outlasted its endpoint's backoff: that entity's problem) and
kept in the store for retry; only then does the
start of the round become the base of the next round's windows. Entities kept for retry are
queued by every later round whatever the windows say, and read from their own cursors
(:mod:`gitlab_producer.sync.retries`), so advancing the base loses none of their events.
Cursors of entities that did succeed are saved as they finish, so a failed or interrupted
round repeats little.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field

import orjson

from gitlab_producer.gitlab.errors import (
    FatalGitLabError,
    ForbiddenError,
    GitLabError,
    NotFoundError,
    RetriesExhaustedError,
)
from gitlab_producer.logs import get_logger
from gitlab_producer.sinks.base import DeliveryError
from gitlab_producer.store.base import StoreError
from gitlab_producer.sync.entities import (
    Interrupted,
    SyncContext,
    UserListing,
    Work,
    covered_by_projects,
    discover_projects,
    discover_users,
    read_events,
)
from gitlab_producer.sync.retries import RetrySet
from gitlab_producer.sync.windows import cover_day, iso, project_listing_after

log = get_logger(__name__)
LAST_ROUND_KEY = "last_round_started"
LAST_USER_LISTING_KEY = "last_user_listing"
USER_COUNTS_KEY = "user_listing_counts"  # pages and recent users of the last full pass
RECOVERABLE = (GitLabError, DeliveryError, StoreError)


@dataclass
class RoundResult:
    """What a round did."""

    started: float  # the host's clock (durations, the gauge); stored in GitLab's time
    ok: bool = True
    queued: dict[str, int] = field(default_factory=lambda: {"project": 0, "user": 0})
    synced: dict[str, int] = field(default_factory=lambda: {"project": 0, "user": 0})
    failed: dict[str, int] = field(default_factory=lambda: {"project": 0, "user": 0})
    skipped: dict[str, int] = field(default_factory=lambda: {"project": 0, "user": 0})
    covered: int = 0  # warm projects left to their authors' lists
    produced: int = 0
    error: str = ""
    duration_s: float = 0.0
    started_gitlab: float = math.inf  # GitLab's time at the start, as the skew was known then


class SyncRound:
    """Runs one round with ``concurrency`` readers per kind."""

    def __init__(self, ctx: SyncContext, concurrency: int, sync_users: bool = True) -> None:
        self.ctx = ctx
        self.concurrency = concurrency
        self.sync_users = sync_users
        self._last_user_listing: UserListing | None = None  # this process's last full pass
        self.retries = RetrySet(ctx.store, ctx.metrics)

    async def run(self) -> RoundResult:
        """The round; a store, sink or GitLab failure fails it (never raises them)."""
        result = RoundResult(started=time.time(), started_gitlab=self.ctx.client.clock.now())
        began = time.monotonic()  # a host clock stepped back must not make it negative
        try:
            await self._run(result)
        except RECOVERABLE as exc:  # outside the task group: reading or writing round state
            result.ok, result.error = False, f"{type(exc).__name__}: {exc}"
        result.duration_s = time.monotonic() - began
        return result

    async def _run(self, result: RoundResult) -> None:
        ctx = self.ctx
        last = await ctx.store.get_meta(LAST_ROUND_KEY)
        listing_after = project_listing_after(ctx.rules, float(last) if last else None,
                                              ctx.since)
        log.info("round_started", projects_active_after=iso(listing_after))
        produced_before = self._produced()
        listing_due = self.sync_users and await self._user_listing_due(ctx.client.clock.now())
        if self.sync_users and self._last_user_listing is None:  # once per process, mostly
            self._last_user_listing = await self._stored_user_counts()
        # Set by project discovery: the day from which users cover the warm projects, or None.
        # Settled at once when no earlier pass over the users can price a cover, so that user
        # discovery need not wait for the project listing.
        cover: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        if not self._can_cover():
            cover.set_result(None)
        listed_users = False
        try:
            await self.retries.load()
            async with asyncio.TaskGroup() as group:
                projects: asyncio.Queue[Work | None] = asyncio.Queue(self.concurrency * 4)
                group.create_task(self._discover_projects(listing_after, projects, cover,
                                                          result))
                readers = [projects]
                if self.sync_users:
                    users: asyncio.Queue[Work | None] = asyncio.Queue(self.concurrency * 4)
                    listing = group.create_task(self._discover_users(listing_due, users, cover,
                                                                     result))
                    readers.append(users)
                for queue in readers:
                    for _ in range(self.concurrency):
                        group.create_task(self._reader(queue, result))
            listed_users = self.sync_users and listing.result()
        except* FatalGitLabError as fatal:
            result.ok, result.error = False, str(fatal.exceptions[0])
        except* RECOVERABLE as failed:
            result.ok, result.error = False, str(failed.exceptions[0])
        if ctx.stop.is_set():
            result.ok, result.error = False, result.error or "interrupted"
        if any(result.failed.values()):
            result.ok = False
        result.produced = self._produced() - produced_before
        await self._finish(result, listed_users)

    async def _finish(self, result: RoundResult, listed_users: bool) -> None:
        """A round that succeeded becomes the base of the next one's windows."""
        if result.ok:
            # In GitLab's time: the next round's windows compare it with GitLab's timestamps.
            # The earlier conversion (see read_events): never a base in GitLab's future.
            base = repr(min(self.ctx.client.clock.to_gitlab(result.started),
                            result.started_gitlab))
            await self.ctx.store.set_meta(LAST_ROUND_KEY, base)
            if listed_users:
                await self.ctx.store.set_meta(LAST_USER_LISTING_KEY, base)

    def _can_cover(self) -> bool:
        seen = self._last_user_listing
        return self.sync_users and seen is not None and seen.dated

    def _cover_from(self, warm: list[Work]) -> str | None:
        """Cover the warm projects by their authors' lists when that costs fewer requests
        (listing pages plus recently active users, as the last full pass counted them)."""
        seen = self._last_user_listing
        if not warm or seen is None or seen.pages + seen.recent >= len(warm):
            return None
        return cover_day(self.ctx.rules, [w.cursor for w in warm if w.cursor is not None])

    async def _stored_user_counts(self) -> UserListing | None:
        stored = await self.ctx.store.get_meta(USER_COUNTS_KEY)
        if not stored:
            return None
        try:
            counts = orjson.loads(stored)
            return UserListing(pages=int(counts["pages"]), recent=int(counts["recent"]),
                               dated=bool(counts["dated"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None  # written by another version: the next full pass rewrites it

    async def _user_listing_due(self, now: float) -> bool:
        """Users are listed at most every ``USER_RESYNC_INTERVAL``: their ``last_activity_on``
        is a date, and what it says is acted on no more often than that (listing 20,000 users
        costs 200 requests, every round otherwise)."""
        last = await self.ctx.store.get_meta(LAST_USER_LISTING_KEY)
        return last is None or now - float(last) >= self.ctx.rules.user_resync_s

    def _produced(self) -> int:
        return int(sum(sample.value for metric in self.ctx.metrics.events_produced.collect()
                       for sample in metric.samples if sample.name.endswith("_total")))

    async def _discover_projects(self, listing_after: float, queue: asyncio.Queue[Work | None],
                                 cover: asyncio.Future[str | None], result: RoundResult
                                 ) -> None:
        warm: list[Work] = []
        retry = set(self.retries.pending["project"])
        try:
            queued = await discover_projects(self.ctx, listing_after, queue,
                                             None if cover.done() else warm, retry)
        except BaseException:
            cover.cancel()
            raise
        queued += await self._queue_retries("project", retry, queue)
        cover_from = self._cover_from(warm)
        if not cover.done():
            cover.set_result(cover_from)
        if cover_from is None:
            for work in warm:
                await queue.put(work)
            queued += len(warm)
        else:
            result.covered = len(warm)
        result.queued["project"] = queued
        await self._end(queue)

    async def _discover_users(self, listing_due: bool, queue: asyncio.Queue[Work | None],
                              cover: asyncio.Future[str | None], result: RoundResult) -> bool:
        """Returns whether the users were listed (all of them, under the usual rules)."""
        cover_from = await cover
        listed = listing_due or cover_from is not None
        retry = set(self.retries.pending["user"])
        if listed:
            listing = await discover_users(self.ctx, queue, cover_from, retry)
            result.queued["user"] = listing.queued
            if not self.ctx.stop.is_set():
                self._last_user_listing = listing
                await self.ctx.store.set_meta(USER_COUNTS_KEY, orjson.dumps(
                    {"pages": listing.pages, "recent": listing.recent,
                     "dated": listing.dated}).decode())
        result.queued["user"] += await self._queue_retries("user", retry, queue)
        await self._end(queue)
        return listed

    async def _queue_retries(self, kind: str, ids: set[int], queue: asyncio.Queue[Work | None]
                             ) -> int:
        """Queue the entities kept for retry that discovery did not queue, from their own
        cursors: the listing windows may have moved past them."""
        if not ids or self.ctx.stop.is_set():
            return 0
        pending = self.retries.pending[kind]
        cursors = await self.ctx.store.cursors(kind, sorted(ids))
        queued = 0
        for entity_id in sorted(ids):
            entry = pending.get(entity_id)
            if entry is not None:
                await queue.put(Work(kind, entity_id, entry.activity, cursors.get(entity_id)))
                queued += 1
        return queued

    async def _end(self, queue: asyncio.Queue[Work | None]) -> None:
        # Not in a `finally`: after a failure the task group cancels the readers, and a put
        # into their full queue would wait forever.
        for _ in range(self.concurrency):
            await queue.put(None)

    async def _reader(self, queue: asyncio.Queue[Work | None], result: RoundResult) -> None:
        ctx = self.ctx
        while True:
            work = await queue.get()
            ctx.metrics.queue_depth.labels("users" if work and work.kind == "user"
                                           else "projects").set(queue.qsize())
            if work is None:
                return
            if ctx.stop.is_set():
                continue  # drain without working: the round ends early
            await self.read_one(work, result)

    async def read_one(self, work: Work, result: RoundResult) -> None:
        """Read one entity's events and count the outcome in ``result`` (synced, skipped or
        failed; none of them when the service stopped first). Raises only
        :class:`FatalGitLabError` (the token was rejected: the round cannot go on)."""
        ctx = self.ctx
        try:
            select = covered_by_projects(ctx) if work.kind == "user" else None
            cursor = await read_events(ctx, work, select)
            await ctx.save_cursor(work, cursor)
            await self.retries.succeeded(work)
            result.synced[work.kind] += 1
            log.debug("entity_synced", kind=work.kind, id=work.entity_id)
        except Interrupted:
            log.info("entity_interrupted", kind=work.kind, id=work.entity_id)
        except (ForbiddenError, NotFoundError, RetriesExhaustedError) as exc:
            # That entity's problem: skip it, keep it for the next rounds (stored before
            # the round can count as complete), keep everything else flowing.
            reason = _skip_reason(exc)
            if reason is None:  # 5xx or timeouts to the end: the round fails
                await self._failed_kept(work, exc, result)
                return
            try:
                kept = await self.retries.keep(work, reason)
            except StoreError as store_exc:  # not kept: the round must not count it done
                self._failed(work, store_exc, result)
                return
            result.skipped[work.kind] += 1
            ctx.metrics.entities_skipped.labels(work.kind, reason).inc()
            log.warning("entity_skipped" if kept else "entity_gone", kind=work.kind,
                        id=work.entity_id, reason=reason, error=str(exc),
                        retried_next_round=kept)
        except FatalGitLabError:
            raise
        except Exception as exc:  # one entity's failure must not stop the others
            await self._failed_kept(work, exc, result)

    async def _failed_kept(self, work: Work, exc: Exception, result: RoundResult) -> None:
        self._failed(work, exc, result)
        with contextlib.suppress(StoreError):  # the round fails: retried in any case
            await self.retries.keep(work, "failed")

    def _failed(self, work: Work, exc: Exception, result: RoundResult) -> None:
        result.failed[work.kind] += 1
        self.ctx.metrics.entity_failures.labels(work.kind).inc()
        log.warning("entity_failed", kind=work.kind, id=work.entity_id,
                    error=f"{type(exc).__name__}: {exc}", exc_info=not isinstance(exc, RECOVERABLE))


def _skip_reason(exc: GitLabError) -> str | None:
    """Why an entity is skipped (kept for retry) rather than failed, or None."""
    if isinstance(exc, ForbiddenError):
        return "forbidden"
    if isinstance(exc, NotFoundError):
        return "not_found"
    # Its endpoint kept answering 429 (a per-endpoint limit): waiting longer here would hold up
    # the round; a later round reads it from its own cursor.
    return "throttled" if exc.status == 429 else None
