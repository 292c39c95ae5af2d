"""Jobs of one process share their user lookups under way: a user another job is reading is
waited for, not asked again; when that lookup fails, the waiting job fails too (and keeps the
user for its next try)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gitlab_producer.gitlab.errors import GitLabError
from gitlab_producer.objects.executor import Progress
from gitlab_producer.objects.users import Lookups, UserCache
from gitlab_producer.sinks.base import DeliveryError
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.unit.test_objects_delivery import FakeExecutor
from tests.waits import wait_until_async


async def until(check: Callable[[], bool], what: str) -> None:
    """Bounded (5 s): until ``check()`` holds, letting the jobs run meanwhile."""
    async def probe() -> bool:
        return check()

    await wait_until_async(probe, 5, what, interval_s=0.005)


class SlowExecutor(FakeExecutor):
    """Answers after ``release`` is set; ids in ``failing`` answer 500."""

    def __init__(self, failing: set[int] | None = None) -> None:
        super().__init__(missing=set())
        self.failing = failing or set()
        self.release = asyncio.Event()
        self.waiting: list[int] = []  # users whose read waits for ``release``

    async def read_one(self, stream: Any, scope: Any, progress: Progress,
                       fields: dict[str, str]) -> dict[str, Any]:
        self.waiting.append(int(fields["user"]))
        await self.release.wait()
        if int(fields["user"]) in self.failing:
            self.asked.append(int(fields["user"]))
            raise GitLabError("500", 500)
        return await super().read_one(stream, scope, progress, fields)


async def test_a_user_being_read_by_another_job_is_not_asked_again(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    executor = SlowExecutor()
    shared = Lookups()
    first = UserCache(store, executor, 100, shared)  # type: ignore[arg-type]
    second = UserCache(store, executor, 100, shared)  # type: ignore[arg-type]
    one = asyncio.create_task(first.import_users([1, 2], Progress()))
    await until(lambda: executor.waiting == [1], "the first job reading user 1 (2 claimed)")
    two = asyncio.create_task(second.import_users([2, 3], Progress()))
    await until(lambda: 3 in executor.waiting, "the second job reading user 3")
    assert not two.done()  # waits for user 2
    executor.release.set()
    await asyncio.wait_for(asyncio.gather(one, two), 5)
    assert sorted(executor.asked) == [1, 2, 3]
    assert second.stats.requests == 1 and second.stats.hits == 1
    assert shared._held == {}
    await store.close()


async def test_a_failed_lookup_fails_the_jobs_waiting_for_it(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    executor = SlowExecutor(failing={2})
    shared = Lookups()
    first = UserCache(store, executor, 100, shared)  # type: ignore[arg-type]
    second = UserCache(store, executor, 100, shared)  # type: ignore[arg-type]
    one = asyncio.create_task(first.import_users([2], Progress()))
    await until(lambda: executor.waiting == [2], "the first job reading user 2")
    two = asyncio.create_task(second.import_users([2], Progress()))
    await until(lambda: second.stats.hits == 1, "the second job waiting for user 2")
    executor.release.set()
    with pytest.raises(GitLabError):
        await asyncio.wait_for(one, 5)
    with pytest.raises(DeliveryError):
        await asyncio.wait_for(two, 5)
    assert shared._held == {}
    await store.close()
