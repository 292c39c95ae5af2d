"""The backfill's supervision: lost jobs and a waiter chain that gave up are started again,
live ones are not doubled (the engine's keys)."""

from __future__ import annotations

from pathlib import Path

from gitlab_producer.objects.engine import LocalDispatcher
from gitlab_producer.objects.stages import RUN_JOB, WAIT_STAGE
from gitlab_producer.objects.state import JobRecord, ProjectRecord
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.unit.offline_importer import offline_importer


async def test_keep_waiting_restarts_what_was_lost_and_doubles_nothing(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    dispatcher = LocalDispatcher()
    importer, client = offline_importer(store, dispatcher)
    state = importer.state
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


async def test_a_project_amid_the_old_retry_stage_continues_as_a_retry_pass(
        tmp_path: Path) -> None:
    """A state saved by an earlier version at its single retry stage (0) is picked up: its
    jobs run again in their own stages, followed by the stages deriving from theirs."""
    store = SQLiteStore(tmp_path / "s.db")
    dispatcher = LocalDispatcher()
    importer, client = offline_importer(store, dispatcher)
    state = importer.state
    await state.save_job(JobRecord("7:s4:main", 7, 4, "list_merge_requests", gen=1))
    await state.save_job(JobRecord("7:s6:main", 7, 6, "list_issues", status="done"))
    await state.save_project(ProjectRecord(7, stage=0, jobs=["7:s4:main"]))
    await importer.start_project(7)
    project = await state.project(7)
    assert project is not None
    assert (project.stage, project.jobs, project.retrying) == (4, ["7:s4:main"], {"7:s4:main": 4})
    queued = {(e.function, e.key) for e in dispatcher._heap}
    assert queued == {(RUN_JOB, "7:s4:main:g1"), (WAIT_STAGE, "wait:7:s4:g0")}
    await client.aclose()
    await store.close()
