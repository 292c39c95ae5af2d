"""Red-team findings on the object sync (in-process simulator, SQLite store, a list sink)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from gitlab_producer.simulator import objects_repo_api
from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.unit.test_object_sync_rounds import close, make

SPEC = WorldSpec(projects=1, users=6, events=30, history_days=1.0, seed=33, quiet_s=7200.0,
                 objects_per_project=12, feature_off_share=0.0)
BRANCH = b"projects/1/repository/branches/feature%2Flogin-page"


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with running_simulator(SPEC) as running:
        yield running


@pytest.mark.xfail(strict=True, reason="a key tombstoned and then listed again with the "
                   "version it had before is never produced again: its old version mark "
                   "suppresses it, so the compacted topic keeps the tombstone")
async def test_a_branch_deleted_and_restored_at_the_same_commit_is_produced_again(
        sim: SimulatorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sync, sink, _metrics = await make(sim, tmp_path)
    sync.options = dataclasses.replace(sync.options, sweep_interval_s=0.0)  # sweep each round
    try:
        assert (await sync.round()).ok  # the first sweep produces the branch
        assert any(m.key == BRANCH and m.value for m in sink.sent)
        monkeypatch.setattr(objects_repo_api, "BRANCHES", ("main",))  # branch deleted
        assert (await sync.round()).ok
        assert sink.sent[-1].key == BRANCH and sink.sent[-1].value is None  # its tombstone
        monkeypatch.undo()  # restored (GitLab's "restore branch", or pushed again)
        assert (await sync.round()).ok
        last = [m for m in sink.sent if m.key == BRANCH][-1]
        assert last.value is not None, "the restored branch stays deleted downstream"
    finally:
        await close(sync)
