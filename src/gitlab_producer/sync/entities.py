"""The four processes of a round: discover projects and users, read each one's events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from gitlab_producer.gitlab import listings
from gitlab_producer.gitlab.calendar import after_param, earliest_date
from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.errors import FatalGitLabError, ForbiddenError
from gitlab_producer.gitlab.events import Event, EventPage, decode_events
from gitlab_producer.logs import get_logger
from gitlab_producer.metrics import Metrics
from gitlab_producer.store.base import Cursor, Store
from gitlab_producer.sync.delivery import Deliverer
from gitlab_producer.sync.windows import (
    WindowRules,
    iso,
    lower_bound,
    project_is_warm,
    project_needs_sync,
    user_needs_sync,
)

log = get_logger(__name__)
Events = list[Event]


class Interrupted(Exception):
    """The service is stopping: the entity was left before its end (its cursor is not saved)."""


@dataclass(frozen=True)
class Work:
    """One project or user whose events should be read."""

    kind: str  # "project" or "user"
    entity_id: int
    activity: str
    cursor: Cursor | None


class ProjectCursors:
    """Project cursors as this process last saw them, for the user-list filter.

    Only this process writes cursors, and a cached cursor can only be older than the stored
    one, so a stale entry makes the filter keep an event (dedup then decides), never drop one.
    """

    def __init__(self, store: Store, max_entries: int = 200_000) -> None:
        self._store = store
        self._known: dict[int, Cursor | None] = {}
        self._max = max_entries

    async def get(self, project_ids: set[int]) -> dict[int, Cursor | None]:
        missing = [p for p in project_ids if p not in self._known]
        if missing:
            if len(self._known) + len(missing) > self._max:
                self._known.clear()
            found = await self._store.cursors("project", missing)
            for pid in missing:
                self._known[pid] = found.get(pid)
        return {p: self._known[p] for p in project_ids}

    def saved(self, project_id: int, cursor: Cursor) -> None:
        if project_id in self._known or len(self._known) < self._max:
            self._known[project_id] = cursor


@dataclass
class SyncContext:
    """What every process of a round shares."""

    client: GitLabClient
    store: Store
    deliverer: Deliverer
    metrics: Metrics
    rules: WindowRules
    per_page: int
    since: float
    stop: asyncio.Event
    project_cursors: ProjectCursors = field(init=False)

    def __post_init__(self) -> None:
        self.project_cursors = ProjectCursors(self.store)

    async def save_cursor(self, work: Work, cursor: Cursor) -> None:
        await self.store.save_cursors(work.kind, {work.entity_id: cursor})
        if work.kind == "project":
            self.project_cursors.saved(work.entity_id, cursor)

    def malformed(self, list_name: str, reasons: list[str], **where: object) -> None:
        """Count and log records left out of a page (see ``gitlab/listings.py``)."""
        if reasons:
            self.metrics.malformed_records.labels(list_name).inc(len(reasons))
            for reason in reasons[:5]:
                log.warning("malformed_record_skipped", list=list_name, reason=reason, **where)


async def listing_pages(ctx: SyncContext, path: str, params: dict[str, object]
                        ) -> AsyncIterator[list[object]]:
    """The pages of ``GET /projects`` or ``GET /users``. A 403 there is not one entity's
    problem but the token's: the listing (so the round) fails as fatal, with that reason."""
    try:
        async for page in ctx.client.pages(path, params, path, keyset=True):
            yield page
    except ForbiddenError as exc:
        raise FatalGitLabError(f"listing {path} was refused (403): the token's account may "
                               f"not list {path}; check its scopes and state ({exc})",
                               403) from exc


async def discover_projects(ctx: SyncContext, listing_after: float,
                            out: asyncio.Queue[Work | None], warm: list[Work] | None = None,
                            retry: set[int] | None = None) -> int:
    """List projects active since ``listing_after`` (keyset, so no 50,000-row limit) and queue
    those whose cursors do not cover their activity. Returns how many were queued. With
    ``warm``, projects that need reading only because they are warm go there instead. Listed
    projects in ``retry`` are queued whatever their activity, and removed from it (the caller
    queues those the listing did not show)."""
    params: dict[str, object] = {
        "pagination": "keyset", "order_by": "id", "sort": "asc", "simple": "true",
        "per_page": ctx.per_page, "last_activity_after": iso(listing_after)}
    queued = 0
    now = ctx.client.clock.now()
    retry = retry if retry is not None else set()
    async for page in listing_pages(ctx, "projects", params):
        listed = listings.projects(page)
        ctx.malformed("projects", listed.malformed)
        cursors = await ctx.store.cursors("project", [pid for pid, _ in listed.entries])
        for pid, activity in listed.entries:
            cursor = cursors.get(pid)
            forced = pid in retry
            retry.discard(pid)
            if not forced and not project_needs_sync(ctx.rules, cursor, activity):
                continue
            work = Work("project", pid, activity, cursor)
            if (warm is not None and not forced
                    and project_is_warm(ctx.rules, cursor, activity, now)):
                warm.append(work)
            else:
                await out.put(work)
                queued += 1
        if ctx.stop.is_set():
            break
    return queued


@dataclass
class UserListing:
    """What a pass over the users found."""

    queued: int = 0
    pages: int = 0
    recent: int = 0  # users active since about an hour ago: what covering warm projects reads
    dated: bool = True  # every user showed last_activity_on (an administrator's token)


async def discover_users(ctx: SyncContext, out: asyncio.Queue[Work | None],
                         cover_from: str | None = None, retry: set[int] | None = None
                         ) -> UserListing:
    """List users and queue those whose activity date says they may have unread events; with
    ``cover_from`` (a date), also every user active since then: their lists cover the warm
    projects this round does not read. Listed users in ``retry`` are queued in any case, and
    removed from it."""
    params: dict[str, object] = {"pagination": "keyset", "order_by": "id", "sort": "asc",
                                 "per_page": ctx.per_page}
    listing = UserListing()
    now = ctx.client.clock.now()
    # The day a cover would start from (see cover_day): warm cursors are about that old.
    recent_from = earliest_date(now - ctx.rules.project_lag_s - ctx.rules.overlap_s)
    retry = retry if retry is not None else set()
    async for page in listing_pages(ctx, "users", params):
        listing.pages += 1
        listed = listings.users(page)
        ctx.malformed("users", listed.malformed)
        cursors = await ctx.store.cursors("user", [uid for uid, _ in listed.entries])
        for uid, activity in listed.entries:
            listing.recent += activity >= recent_from
            listing.dated = listing.dated and bool(activity)
            cursor = cursors.get(uid)
            covers = cover_from is not None and (not activity or activity >= cover_from)
            forced = uid in retry
            retry.discard(uid)
            if forced or covers or user_needs_sync(ctx.rules, cursor, activity, ctx.since,
                                                   now):
                await out.put(Work("user", uid, activity, cursor))
                listing.queued += 1
        if ctx.stop.is_set():
            break
    return listing


async def read_events(ctx: SyncContext, work: Work,
                      select: Callable[[Events], Awaitable[Events]] | None = None) -> Cursor:
    """Read one entity's events newest first, down to its lower bound, delivering each page.
    Returns the cursor to save once everything was acknowledged.

    A page is delivered while the next one is fetched (one delivery in flight per reader):
    GitLab still sees one request at a time from each reader. The cursor is the start in
    GitLab's time (the earlier of its conversions at the start and at the end)."""
    started = ctx.client.clock.wall()
    started_gitlab = ctx.client.clock.now()
    lower = lower_bound(ctx.rules, work.cursor, ctx.since)
    path = f"{work.kind}s/{work.entity_id}/events"
    params = {"after": after_param(lower), "sort": "desc", "per_page": ctx.per_page}
    endpoint = f"{work.kind}s/:id/events"
    fetched = ctx.metrics.events_fetched.labels(work.kind)
    delivering: asyncio.Task[int] | None = None
    try:
        async for page in ctx.client.pages(path, params, endpoint, decode=decode_events):
            fetched.inc(len(page))
            if isinstance(page, EventPage) and page.malformed:
                ctx.malformed(endpoint, page.malformed, kind=work.kind, id=work.entity_id)
            wanted = [e for e in page if e.created_ts >= lower]
            if wanted and select is not None:
                wanted = await select(wanted)
            if delivering is not None:
                await delivering
            delivering = asyncio.create_task(ctx.deliverer.deliver(wanted)) if wanted else None
            # Newest first: once a page reaches below the bound, the rest is older still.
            # (A short or empty page says nothing; only the headers end the list.)
            if page and min(e.created_ts for e in page) < lower:
                break
            if ctx.stop.is_set():
                raise Interrupted(f"{work.kind} {work.entity_id}")
        if delivering is not None:
            await delivering
    except BaseException:
        # Let the page already handed over finish (what it produced gets its marks), then
        # report the first failure.
        if delivering is not None and not delivering.done():
            await asyncio.wait([delivering])
        if delivering is not None and not delivering.cancelled():
            delivering.exception()
        raise
    ctx.metrics.entities_synced.labels(work.kind).inc()
    # The earlier of the start converted now and as GitLab's time then: the skew learnt at
    # the end corrects a start taken before GitLab ever answered, the one at the start
    # keeps a host clock stepped back during the read from moving the cursor into the future.
    return Cursor(min(ctx.client.clock.to_gitlab(started), started_gitlab), work.activity)


def covered_by_projects(ctx: SyncContext) -> Callable[[Events], Awaitable[Events]]:
    """For user event lists: drop project events that the project's own cursor covers, so the
    same event is not re-sent from a user's list after its dedup mark expired."""

    async def select(events: Events) -> Events:
        cursors = await ctx.project_cursors.get(
            {e.project_id for e in events if e.project_id is not None})
        keep = []
        for event in events:
            cursor = cursors.get(event.project_id) if event.project_id is not None else None
            if cursor is None or event.created_ts >= cursor.synced_at - ctx.rules.overlap_s:
                keep.append(event)
        return keep

    return select
