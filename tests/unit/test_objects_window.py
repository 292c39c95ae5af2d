"""The backfill's project window: at most its limit of projects run at once, a finished one
frees its slot, projects complete before the run take none."""

from __future__ import annotations

from pathlib import Path

from gitlab_producer.objects.backfill import ProjectWindow
from gitlab_producer.objects.engine import LocalDispatcher
from gitlab_producer.objects.stages import RUN_JOB
from gitlab_producer.objects.state import COMPLETE, ProjectRecord
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.unit.offline_importer import offline_importer


def started(dispatcher: LocalDispatcher) -> set[int]:
    return {int(e.kwargs["job_id"].split(":")[0]) for e in dispatcher._heap
            if e.function == RUN_JOB}


async def test_at_most_the_limit_run_and_an_ended_project_frees_its_slot(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    dispatcher = LocalDispatcher()
    importer, client = offline_importer(store, dispatcher)
    state = importer.state
    await state.save_project(ProjectRecord(1, stage=11, status=COMPLETE))
    window = ProjectWindow([1, 2, 3, 4, 5, 6], limit=3)
    await window.top_up(importer)
    assert window.finished == {1: (COMPLETE, 0)}  # complete before this run: no slot taken
    assert window.running == {2, 3, 4}
    assert started(dispatcher) == {2, 3, 4}
    await window.top_up(importer)  # nothing ended: nothing more starts
    assert started(dispatcher) == {2, 3, 4}

    window.ended(ProjectRecord(3, stage=11, status=COMPLETE, failed=["3:s8:main"]))
    assert window.changed.is_set()
    await window.top_up(importer)
    assert window.running == {2, 4, 5}
    assert started(dispatcher) == {2, 3, 4, 5}
    assert window.finished[3] == (COMPLETE, 1)
    assert not window.all_finished and list(window.waiting) == [6]
    await client.aclose()
    await store.close()
