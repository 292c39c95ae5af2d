"""A project deleted from GitLab: the object sync tombstones every key it produced for it (its
own, its objects', their threads' and notes') once the 404 lasted GONE_AFTER_S, and then
forgets it; a 403 (the token lost access, the objects still exist) tombstones nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.errors import ForbiddenError
from gitlab_producer.objects.objsync import ObjectSync
from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from gitlab_producer.sync.retries import GONE_AFTER_S
from tests.unit.test_object_sync_rounds import close, make

SPEC = WorldSpec(projects=1, users=6, events=30, history_days=1.0, seed=41, quiet_s=7200.0,
                 objects_per_project=12, feature_off_share=0.0)


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with running_simulator(SPEC) as running:
        yield running


def at(sync: ObjectSync, offset_s: float) -> None:
    """GitLab's clock ``offset_s`` ahead (the 404's age is measured on it)."""
    clock = sync.client.clock
    real = type(clock).now.__get__(clock)
    clock.now = lambda: real() + offset_s  # type: ignore[method-assign]


async def test_a_deleted_project_is_tombstoned_once_its_404_lasted(
        sim: SimulatorThread, tmp_path: Path) -> None:
    sync, sink, _metrics = await make(sim, tmp_path)
    sync.options = dataclasses.replace(sync.options, sweep_interval_s=0.0)
    try:
        assert (await sync.round()).ok
        alive = {(m.topic, m.key) for m in sink.sent if m.value is not None
                 and m.topic not in ("p.commits", "p.users")}  # not indexed: immutable, shared
        assert {t for t, _k in alive} >= {"p.projects", "p.issues", "p.notes"}
        httpx.post(f"{sim.url}/_simulator/changes", timeout=10,
                   json={"kind": "delete_project", "project_id": 1})
        before = len(sink.sent)
        for offset in (0.0, GONE_AFTER_S / 2):  # a 404 that may still be a transfer
            at(sync, offset)
            await sync.round()
        assert sink.sent[before:] == []
        at(sync, GONE_AFTER_S + 1)
        await sync.round()
        tombstoned = {(m.topic, m.key) for m in sink.sent[before:] if m.value is None}
        assert tombstoned == alive
        after = len(sink.sent)
        at(sync, 3 * GONE_AFTER_S)  # forgotten: nothing tombstoned twice, nothing read
        requests = sync._requests()
        await sync.round()
        assert sink.sent[after:] == []
        assert sync._requests() - requests == 2  # the projects listing, the project's 404
    finally:
        await close(sync)


async def test_a_project_answering_403_keeps_its_objects(
        sim: SimulatorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sync, sink, _metrics = await make(sim, tmp_path)
    sync.options = dataclasses.replace(sync.options, sweep_interval_s=0.0)
    try:
        assert (await sync.round()).ok
        real_get = GitLabClient.get

        async def get(self: GitLabClient, path: str, *args: Any, **kw: Any) -> Any:
            if path == "projects/1" or path.startswith("projects/1/"):
                raise ForbiddenError("403 Forbidden", 403)
            return await real_get(self, path, *args, **kw)

        monkeypatch.setattr(GitLabClient, "get", get)
        before = len(sink.sent)
        for hours in (0, 1, 2, 3):
            at(sync, hours * GONE_AFTER_S + 1)
            await sync.round()
        assert [m for m in sink.sent[before:] if m.value is None] == []
    finally:
        await close(sync)
