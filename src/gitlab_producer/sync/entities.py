"""The four processes of a round: discover projects and users, read each one's events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.events import Event, decode_events
from gitlab_producer.metrics import Metrics
from gitlab_producer.store.base import Cursor, Store
from gitlab_producer.sync.delivery import Deliverer
from gitlab_producer.sync.windows import (
    WindowRules,
    after_param,
    iso,
    lower_bound,
    project_needs_sync,
    user_needs_sync,
)

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


async def discover_projects(ctx: SyncContext, listing_after: float,
                            out: asyncio.Queue[Work | None]) -> int:
    """List projects active since ``listing_after`` (keyset, so no 50,000-row limit) and queue
    those whose cursors do not cover their activity. Returns how many were queued."""
    params = {"pagination": "keyset", "order_by": "id", "sort": "asc", "simple": "true",
              "per_page": ctx.per_page, "last_activity_after": iso(listing_after)}
    queued = 0
    async for page in ctx.client.pages("projects", params, "projects", keyset=True):
        cursors = await ctx.store.cursors("project", [int(p["id"]) for p in page])
        for project in page:
            pid, activity = int(project["id"]), str(project["last_activity_at"])
            if project_needs_sync(ctx.rules, cursors.get(pid), activity):
                await out.put(Work("project", pid, activity, cursors.get(pid)))
                queued += 1
        if ctx.stop.is_set():
            break
    return queued


async def discover_users(ctx: SyncContext, out: asyncio.Queue[Work | None]) -> int:
    """List users and queue those whose activity date says they may have unread events."""
    params = {"pagination": "keyset", "order_by": "id", "sort": "asc",
              "per_page": ctx.per_page}
    queued = 0
    now = time.time()
    async for page in ctx.client.pages("users", params, "users", keyset=True):
        cursors = await ctx.store.cursors("user", [int(u["id"]) for u in page])
        for user in page:
            uid, activity = int(user["id"]), user.get("last_activity_on") or ""
            if user_needs_sync(ctx.rules, cursors.get(uid), activity, ctx.since, now):
                await out.put(Work("user", uid, activity, cursors.get(uid)))
                queued += 1
        if ctx.stop.is_set():
            break
    return queued


async def read_events(ctx: SyncContext, work: Work,
                      select: Callable[[Events], Awaitable[Events]] | None = None) -> Cursor:
    """Read one entity's events newest first, down to its lower bound, delivering each page.
    Returns the cursor to save once everything was acknowledged."""
    started = time.time()
    lower = lower_bound(ctx.rules, work.cursor, ctx.since)
    path = f"{work.kind}s/{work.entity_id}/events"
    params = {"after": after_param(lower), "sort": "desc", "per_page": ctx.per_page}
    fetched = ctx.metrics.events_fetched.labels(work.kind)
    async for page in ctx.client.pages(path, params, f"{work.kind}s/:id/events",
                                       decode=decode_events):
        fetched.inc(len(page))
        wanted = [e for e in page if e.created_ts >= lower]
        if wanted and select is not None:
            wanted = await select(wanted)
        await ctx.deliverer.deliver(wanted)
        # Newest first: once a page reaches below the bound, the rest is older still.
        # (A short or empty page says nothing; only the headers end the list.)
        if page and min(e.created_ts for e in page) < lower:
            break
        if ctx.stop.is_set():
            raise Interrupted(f"{work.kind} {work.entity_id}")
    ctx.metrics.entities_synced.labels(work.kind).inc()
    return Cursor(started, work.activity)


def covered_by_projects(ctx: SyncContext) -> Callable[[Events], Awaitable[Events]]:
    """For user event lists: drop project events that the project's own cursor covers, so the
    same event is not re-sent from a user's list after its dedup mark expired."""

    async def select(events: Events) -> Events:
        pids = sorted({e.project_id for e in events if e.project_id is not None})
        cursors = await ctx.store.cursors("project", pids)
        keep = []
        for event in events:
            cursor = cursors.get(event.project_id) if event.project_id is not None else None
            if cursor is None or event.created_ts >= cursor.synced_at - ctx.rules.overlap_s:
                keep.append(event)
        return keep

    return select
