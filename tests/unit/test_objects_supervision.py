"""The backfill's supervision: lost jobs and a waiter chain that gave up are started again,
live ones are not doubled (the engine's keys)."""

from __future__ import annotations

from pathlib import Path

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.objects.delivery import ObjectDeliverer
from gitlab_producer.objects.engine import LocalDispatcher
from gitlab_producer.objects.stages import RUN_JOB, WAIT_STAGE, Importer, ImportOptions
from gitlab_producer.objects.state import JobRecord, ProjectRecord, StateStore
from gitlab_producer.objects.streams import KINDS
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.unit.test_objects_delivery import ListSink


async def test_keep_waiting_restarts_what_was_lost_and_doubles_nothing(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    state = StateStore(store)
    dispatcher = LocalDispatcher()
    client = GitLabClient("http://127.0.0.1:9/api/v4", "t", RateLimiter(10))
    importer = Importer(state, client, ObjectDeliverer(store, ListSink(), "p", "s", 60),
                        dispatcher, ImportOptions(frozenset(KINDS), 1.0, 60))
    await state.save_job(JobRecord("7:s6:main", 7, 6, "list_issues", gen=2))
    await state.save_job(JobRecord("7:s6:done", 7, 6, "list_issues", status="done"))
    await state.save_project(ProjectRecord(7, stage=6, jobs=["7:s6:main", "7:s6:done"],
                                           waiter_gen=4))
    await importer.keep_waiting(7)
    queued = {(e.function, e.key) for e in dispatcher._heap}
    assert queued == {(RUN_JOB, "7:s6:main:g2"), (WAIT_STAGE, "wait:7:s6:g4")}
    await importer.keep_waiting(7)  # both still pending: nothing doubled
    assert len(dispatcher._heap) == 2
    await client.aclose()
    await store.close()
