"""Red-team findings on the object executor: an object list that never ends is abandoned after
GITLAB_MAX_PAGES pages, as every other list is (README, "GitLab client")."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.errors import PaginationError
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.objects.delivery import ObjectDeliverer
from gitlab_producer.objects.executor import Executor, Progress
from gitlab_producer.objects.objsync import NoPositions
from gitlab_producer.objects.streams import KINDS, Scope, stream
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.local_http import listening
from tests.unit.test_objects_delivery import ListSink


@pytest.fixture
async def endless() -> AsyncIterator[str]:
    """Every page of any list offers one more (a broken proxy, a misbehaving server)."""

    async def page(request: web.Request) -> web.Response:
        n = int(request.query.get("page", "1"))
        return web.json_response([], headers={"X-Next-Page": str(n + 1)})

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    async with listening(app) as port:
        yield f"http://127.0.0.1:{port}/api/v4"


async def test_an_endless_object_list_is_abandoned_after_max_pages(
        endless: str, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    client = GitLabClient(endless, "t", RateLimiter(10_000), max_pages=5)
    executor = Executor(client, ObjectDeliverer(store, ListSink(), "p", "s", 60),
                        frozenset(KINDS))
    try:
        with pytest.raises(PaginationError, match="labels"):
            await asyncio.wait_for(executor.read(stream("labels"), Scope(1), Progress(),
                                                 NoPositions(), "labels"), 5)
    finally:
        await client.aclose()
        await store.close()


@pytest.fixture
async def odd_threads() -> AsyncIterator[str]:
    """A discussions page whose second thread holds a note without an id and whose third
    holds ``notes`` that are not a list, between good ones."""
    good = {"id": "a1", "notes": [{"id": 11, "body": "ok", "updated_at": "2026-01-01T00:00:00Z"}]}
    bad = {"id": "b2", "notes": [{"body": "no id"}]}
    odd = {"id": "c3", "notes": {"id": 13}}
    last = {"id": "d4", "notes": [{"id": 14, "body": "ok", "updated_at": "2026-01-01T00:00:00Z"}]}

    async def page(request: web.Request) -> web.Response:
        return web.json_response([good, bad, odd, last], headers={"X-Next-Page": ""})

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    async with listening(app) as port:
        yield f"http://127.0.0.1:{port}/api/v4"


async def test_a_malformed_note_in_a_thread_is_skipped_not_fatal(
        odd_threads: str, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    client = GitLabClient(odd_threads, "t", RateLimiter(10_000))
    sink = ListSink()
    executor = Executor(client, ObjectDeliverer(store, sink, "p", "s", 60), frozenset(KINDS))
    progress = Progress()
    try:
        await executor.read(stream("discussions"), Scope(1, "issues", 5), progress,
                            NoPositions(), "discussions")
    finally:
        await client.aclose()
        await store.close()
    keys = {m.key.decode() for m in sink.sent}
    assert {"projects/1/issues/5/notes/11", "projects/1/issues/5/notes/14"} <= keys
    assert {f"projects/1/issues/5/discussions/{d}" for d in ("a1", "b2", "c3", "d4")} <= keys
    assert progress.malformed == 2
