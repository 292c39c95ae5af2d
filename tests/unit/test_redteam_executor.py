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
from gitlab_producer.simulator.server import free_port
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.unit.test_objects_delivery import ListSink


@pytest.fixture
async def endless() -> AsyncIterator[str]:
    """Every page of any list offers one more (a broken proxy, a misbehaving server)."""

    async def page(request: web.Request) -> web.Response:
        n = int(request.query.get("page", "1"))
        return web.json_response([], headers={"X-Next-Page": str(n + 1)})

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/api/v4"
    finally:
        await runner.cleanup()


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
