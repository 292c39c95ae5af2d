"""The import's bookkeeping read once per job: a stage's single job advances its project from
the records in hand, its status is saved with its last positions, and the stop flag is read
from the store at most once a second per process (this process's own stop at once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.objects.engine import Call, LocalDispatcher
from gitlab_producer.objects.stages import RUN_JOB, Importer
from gitlab_producer.objects.state import JobRecord, ProjectRecord, StateStore
from gitlab_producer.store.base import StoreError
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.unit.offline_importer import offline_importer


async def _nothing() -> None:
    return None


def _importer(store: SQLiteStore, dispatcher: LocalDispatcher) -> tuple[Importer, GitLabClient]:
    return offline_importer(store, dispatcher, frozenset({"projects", "issues"}), 60.0)


async def _project_read(state: StateStore) -> None:
    # The project was read already (its position says so): the job needs no GitLab.
    await state.save_job(JobRecord("7:s1:main", 7, 1, "project",
                                   positions={"project": {"done": True}}))
    await state.save_project(ProjectRecord(7, stage=1, jobs=["7:s1:main"]))


async def test_a_single_job_saves_itself_done_then_advances_its_project(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    dispatcher = LocalDispatcher()
    importer, client = _importer(store, dispatcher)
    state = importer.state
    await _project_read(state)
    await importer.run_job(Call(1, 3, _nothing), {"job_id": "7:s1:main", "gen": 0})
    job = await state.job("7:s1:main")
    project = await state.project(7)
    assert job is not None and job.status == "done"
    assert job.positions == {"project": {"done": True}}
    assert project is not None and project.stage == 6 and project.jobs == ["7:s6:main"]
    assert project.failed == [] and project.stage_durations.keys() == {"project"}
    nxt = await state.job("7:s6:main")
    assert nxt is not None and nxt.status == "queued" and nxt.task == "list_issues"
    assert (RUN_JOB, "7:s6:main:g0") in {(e.function, e.key) for e in dispatcher._heap}
    await client.aclose()
    await store.close()


async def test_a_job_whose_last_save_failed_is_not_done_and_nothing_advances(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    importer, client = _importer(store, LocalDispatcher())
    state = importer.state
    await _project_read(state)

    save_job = state.save_job

    async def down_for_it(job: JobRecord) -> None:
        if job.id == "7:s1:main":
            raise StoreError("store down")
        await save_job(job)

    monkeypatch.setattr(state, "save_job", down_for_it)
    with pytest.raises(StoreError):  # not the last attempt: the engine runs it again
        await importer.run_job(Call(1, 3, _nothing), {"job_id": "7:s1:main", "gen": 0})
    monkeypatch.undo()
    job = await state.job("7:s1:main")
    project = await state.project(7)
    assert job is not None and job.status == "queued"
    assert project is not None and project.stage == 1
    await client.aclose()
    await store.close()


async def test_the_stop_flag_is_read_at_most_once_a_second(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    mine, other = StateStore(store), StateStore(store)  # two processes' views
    assert not await mine.fatal_recent()
    await other.set_fatal("401")
    assert not await mine.fatal_recent(max_age_s=60.0)  # read a moment ago
    assert await mine.fatal_recent(max_age_s=0.0) == "401"  # too old: read again
    await mine.clear_fatal()
    assert not await mine.fatal_recent(max_age_s=60.0)  # its own change at once
    await mine.set_fatal("401 again")
    assert await mine.fatal_recent(max_age_s=60.0) == "401 again"
    await store.close()
