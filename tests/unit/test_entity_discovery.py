"""Discovery and the retry set on a scripted GitLab and a real SQLite store: bad records are
left out, a 403 on a listing is the token's problem, kept entities are queued whatever their
activity, and a lasting 404 means gone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gitlab_producer.gitlab.errors import FatalGitLabError
from gitlab_producer.metrics import Metrics
from gitlab_producer.store import Cursor, SQLiteStore
from gitlab_producer.sync.delivery import Deliverer
from gitlab_producer.sync.entities import SyncContext, Work, discover_projects, discover_users
from gitlab_producer.sync.retries import GONE_AFTER_S, Pending, RetrySet
from gitlab_producer.sync.windows import WindowRules
from tests.unit.test_gitlab_client import answer, make_client, scripted
from tests.unit.test_store_and_delivery import RecordingSink

OLD = "2026-01-01T00:00:00.000Z"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    made = SQLiteStore(tmp_path / "state.sqlite3")
    yield made
    await made.close()


def context(store: SQLiteStore, *pages: object) -> SyncContext:
    client, _ = make_client(scripted(*[answer(200, p) for p in pages]))
    metrics = Metrics()
    return SyncContext(client, store, Deliverer(store, RecordingSink(), 60, metrics, "t"),
                       metrics, WindowRules(), 100, 0.0, asyncio.Event())


def drained(queue: asyncio.Queue[Work | None]) -> list[Work]:
    found = []
    while not queue.empty():
        item = queue.get_nowait()
        assert item is not None
        found.append(item)
    return found


def malformed(ctx: SyncContext, name: str) -> float:
    return ctx.metrics.malformed_records.labels(name)._value.get()


async def test_bad_listing_records_are_left_out_and_counted(store: SQLiteStore) -> None:
    ctx = context(store, [{"id": 1, "last_activity_at": OLD}, {"name": "no id"},
                          {"id": 2, "last_activity_at": None}, {"id": "3", "last_activity_at": OLD},
                          None, {"id": True}, {"id": 4}, {"id": 5, "last_activity_at": "soon"},
                          {"id": 6, "last_activity_at": OLD}])
    queue: asyncio.Queue[Work | None] = asyncio.Queue()
    assert await discover_projects(ctx, 0.0, queue) == 2
    assert [w.entity_id for w in drained(queue)] == [1, 6]
    assert malformed(ctx, "projects") == 7

    ctx = context(store, [{"id": 1, "last_activity_on": None}, {"username": "x"},
                          {"id": 2, "last_activity_on": 7}, {"id": 3, "last_activity_on": "x"},
                          {"id": 4, "last_activity_on": "2026-11-30"}])
    listing = await discover_users(ctx, queue)
    assert [w.entity_id for w in drained(queue)] == [1, 4]
    assert listing.queued == 2 and malformed(ctx, "users") == 3


@pytest.mark.parametrize("listing", ["projects", "users"])
async def test_a_403_on_a_listing_is_fatal_not_an_entity_skip(store: SQLiteStore,
                                                              listing: str) -> None:
    client, _ = make_client(scripted(answer(403, {"message": "403 Forbidden"})))
    ctx = context(store)
    ctx.client = client
    queue: asyncio.Queue[Work | None] = asyncio.Queue()
    with pytest.raises(FatalGitLabError, match=f"listing {listing} was refused"):
        if listing == "projects":
            await discover_projects(ctx, 0.0, queue)
        else:
            await discover_users(ctx, queue)


async def test_kept_entities_are_queued_whatever_their_activity(store: SQLiteStore) -> None:
    # Project 1's cursor covers its (old, unchanged) activity: normally it is not read.
    await store.save_cursors("project", {1: Cursor(time.time(), OLD), 2: Cursor(time.time(), OLD)})
    ctx = context(store, [{"id": 1, "last_activity_at": OLD}, {"id": 2, "last_activity_at": OLD}])
    queue: asyncio.Queue[Work | None] = asyncio.Queue()
    retry = {1, 9}
    warm: list[Work] = []
    assert await discover_projects(ctx, 0.0, queue, warm, retry) == 1
    assert [w.entity_id for w in drained(queue)] == [1]
    assert retry == {9} and warm == []  # 9 was not listed: the round queues it itself


async def test_a_lasting_404_means_gone_and_a_403_is_kept(store: SQLiteStore) -> None:
    retries = RetrySet(store, Metrics())
    gone, forbidden = Work("project", 5, OLD, None), Work("user", 6, "2026-11-30", None)
    assert await retries.keep(gone, "not_found") and await retries.keep(forbidden, "forbidden")
    await retries.load()
    assert set(retries.pending["project"]) == {5} and set(retries.pending["user"]) == {6}
    assert await retries.keep(gone, "not_found")  # a second 404 soon after: still kept
    # The first 404 was GONE_AFTER_S ago: dropped.
    old = Pending(OLD, "not_found", time.time() - GONE_AFTER_S - 1)
    await store.save_retries("project", {5: old.dumps()})
    await retries.load()
    assert not await retries.keep(gone, "not_found")
    assert await store.retries("project") == {}
    # A 403 is kept however long it lasts, until a read succeeds.
    await store.save_retries("user", {6: Pending("d", "forbidden", 0.0).dumps()})
    await retries.load()
    assert await retries.keep(forbidden, "forbidden")
    await retries.succeeded(forbidden)
    assert await store.retries("user") == {}
