"""Red-team findings on the object sync (in-process simulator, SQLite store, a list sink)."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gitlab_producer.gitlab.client import GitLabClient
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


BIG = WorldSpec(projects=1, users=6, events=30, history_days=1.0, seed=35, quiet_s=7200.0,
                objects_per_project=12, feature_off_share=0.0, big_project_issues=150)


async def test_a_deletion_during_a_sweep_tombstones_no_issue_that_exists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An issue deleted from page 1 while the sweep reads page 2 of the offset-paged list
    shifts the first issue of page 2 onto page 1: the sweep does not see it, and must not
    tombstone it (it exists); the deleted one gets its tombstone by this sweep or the next."""
    with running_simulator(BIG) as sim:
        sync, sink, _metrics = await make(sim, tmp_path)
        sync.options = dataclasses.replace(sync.options, sweep_interval_s=0.0)
        try:
            assert (await sync.round()).ok  # the first sweep: every issue is known
            real_get = GitLabClient.get
            deleted: list[int] = []

            async def get(self: GitLabClient, path: str, *args: Any, **kw: Any) -> Any:
                answer = await real_get(self, path, *args, **kw)
                if path.endswith("/issues") and not deleted:  # page 1 was just read
                    done = httpx.post(f"{sim.url}/_simulator/changes", timeout=10, json={
                        "kind": "delete_issue", "project_id": 1, "iid": 1}).json()
                    deleted.append(done["changes"][0]["object"]["iid"])
                return answer

            monkeypatch.setattr(GitLabClient, "get", get)
            before = len(sink.sent)
            assert (await sync.round()).ok
            monkeypatch.undo()
            assert (await sync.round()).ok
            tombstones = {m.key.decode() for m in sink.sent[before:]
                          if m.value is None and m.topic == "p.issues"}
            assert tombstones == {f"projects/1/issues/{deleted[0]}"}
        finally:
            await close(sync)


async def test_a_project_deleted_for_hours_gets_tombstones(sim: SimulatorThread,
                                                           tmp_path: Path) -> None:
    sync, sink, _metrics = await make(sim, tmp_path)
    sync.options = dataclasses.replace(sync.options, sweep_interval_s=0.0)
    try:
        assert (await sync.round()).ok
        issues = {m.key for m in sink.sent if m.topic == "p.issues" and m.value}
        assert issues
        httpx.post(f"{sim.url}/_simulator/changes", timeout=10,
                   json={"kind": "delete_project", "project_id": 1})
        clock = sync.client.clock
        real_now = clock.now
        for hours in (0, 1, 2, 3):  # a 404 that lasts, over several rounds (not a transfer)
            clock.now = lambda h=hours: real_now() + h * 3600  # type: ignore[method-assign]
            await sync.round()
        tombstoned = {m.key for m in sink.sent if m.topic == "p.issues" and m.value is None}
        assert tombstoned == issues
    finally:
        await close(sync)


async def test_an_edit_during_a_windowed_read_costs_no_other_issue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_simulator(BIG) as sim:
        sync, sink, _metrics = await make(sim, tmp_path)
        try:
            assert (await sync.round()).ok  # the first sweep: every issue is known
            sync.options = dataclasses.replace(sync.options, overlap_s=1.0)
            edits = [{"kind": "edit_issue", "project_id": 1, "iid": i} for i in range(1, 151)]
            assert httpx.post(f"{sim.url}/_simulator/changes", json={"changes": edits},
                              timeout=30).status_code == 200
            time.sleep(2.1)  # the edits are older than the overlap when the round starts
            real_get = GitLabClient.get
            edited: list[int] = []

            async def get(self: GitLabClient, path: str, *args: Any, **kw: Any) -> Any:
                answer = await real_get(self, path, *args, **kw)
                if path.endswith("/issues") and not edited:  # page 1 of the window was read
                    httpx.post(f"{sim.url}/_simulator/changes", timeout=10, json={
                        "kind": "edit_issue", "project_id": 1, "iid": 1})
                    edited.append(1)
                return answer

            monkeypatch.setattr(GitLabClient, "get", get)
            before = len(sink.sent)
            sync.mark((1, "issues", 1))  # an event named the project: it is read
            assert (await sync.round()).ok
            monkeypatch.undo()
            sync.mark((1, "issues", 1))
            assert (await sync.round()).ok
            fresh = {m.key.decode() for m in sink.sent[before:] if m.topic == "p.issues"}
            assert {f"projects/1/issues/{i}" for i in range(1, 151)} <= fresh
        finally:
            await close(sync)


async def test_the_object_sync_carries_on_after_the_store_lost_its_state(
        sim: SimulatorThread, tmp_path: Path) -> None:
    """A Redis restarted without persistence loses the import's plan: the object rounds must
    not go on doing nothing (ok, 0 projects, 0 requests) for ever; a label-only edit still
    arrives by the next sweep (unchanged objects may be produced again, as events are)."""
    sync, sink, _metrics = await make(sim, tmp_path)
    sync.options = dataclasses.replace(sync.options, sweep_interval_s=0.0)
    try:
        assert (await sync.round()).ok
        _forget_everything(tmp_path / "s.db")
        assert await sync.state.plan() is None
        done = httpx.post(f"{sim.url}/_simulator/changes", timeout=10, json={
            "kind": "add_label", "project_id": 1, "on": "issue"}).json()["changes"][0]
        before = len(sink.sent)
        assert (await sync.round()).ok
        key = f"projects/1/issues/{done['object']['iid']}".encode()
        assert key in {m.key for m in sink.sent[before:]}
    finally:
        await close(sync)


def _forget_everything(path: Path) -> None:
    """What a Redis restarted without persistence shows: no key at all."""
    with sqlite3.connect(path) as db:
        db.executescript("DELETE FROM meta; DELETE FROM keyed; DELETE FROM sent; "
                         "DELETE FROM cursors;")
