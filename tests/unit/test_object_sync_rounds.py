"""Object rounds on the simulator (in-process HTTP), the SQLite store and a sink that can
refuse: a watermark moves only after everything of its window was delivered, and only the
children of what changed are read again."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import orjson
import pytest

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.events import Event
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.metrics import Metrics
from gitlab_producer.objects.delivery import ObjectDeliverer
from gitlab_producer.objects.objsync import ObjectSync, SyncOptions
from gitlab_producer.objects.state import Plan, StateStore
from gitlab_producer.objects.streams import KINDS
from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from gitlab_producer.sinks.base import DeliveryError, Message
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.unit.test_objects_delivery import ListSink

SPEC = WorldSpec(projects=2, users=6, events=60, history_days=1.0, seed=31, quiet_s=7200.0,
                 objects_per_project=24, feature_off_share=0.0)


class Sink(ListSink):
    """Collects messages; refuses those of kind ``refuse`` in project 1 while it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse = ""

    async def send(self, messages: Sequence[Message]) -> None:
        if any(m.topic == f"p.{self.refuse}" and m.key.startswith(b"projects/1/")
               for m in messages):
            raise DeliveryError("refused")
        await super().send(messages)


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with running_simulator(SPEC) as running:
        yield running


def requests(metrics: Metrics, endpoint: str) -> int:
    return int(sum(s.value for m in metrics.gitlab_requests.collect() for s in m.samples
                   if s.name.endswith("_total") and s.labels["endpoint"] == endpoint))


async def make(sim: SimulatorThread, tmp_path: Path, projects: tuple[int, ...] = (1,)
               ) -> tuple[ObjectSync, Sink, Metrics]:
    store = SQLiteStore(tmp_path / "s.db")
    await StateStore(store).save_plan(Plan(list(projects), sorted(KINDS),
                                           time.time() - 86_400 * 3))
    metrics = Metrics()
    client = GitLabClient(f"{sim.url}/api/v4", "sim-token", RateLimiter(1000),
                          metrics=metrics)
    sink = Sink()
    deliverer = ObjectDeliverer(store, sink, "p", "sim", 86_400, op="update")
    options = SyncOptions(frozenset(KINDS), 300.0, 3600.0, 86_400.0, 4, 3600)
    return ObjectSync(client, store, deliverer, options), sink, metrics


async def close(sync: ObjectSync) -> None:
    await sync.client.aclose()
    await sync.store.close()


async def test_a_watermark_stays_until_every_record_of_its_window_was_delivered(
        sim: SimulatorThread, tmp_path: Path) -> None:
    sync, sink, metrics = await make(sim, tmp_path, (1, 2))
    try:
        sink.refuse = "notes"  # merge requests' threads carry notes: their window fails
        failed = await sync.round()
        assert not failed.ok and failed.failed == [1] and failed.sweep
        store = sync.store
        assert await store.get_meta("os:wm:1:milestones") is not None  # read before, whole
        assert await store.get_meta("os:wm:1:merge_requests") is None
        assert await store.get_meta("os:wm:1:issues") is None  # not reached
        assert await store.get_meta("os:wm:2:issues") is not None  # project 2 went on
        assert await store.get_meta("os:retry") == '{"1":true}'
        sink.refuse = ""
        listed_before = requests(metrics, "merge_requests")
        done = await sync.round()
        # Only project 1 is read again, as the sweep it failed; not every project.
        assert done.ok and not done.sweep and done.projects == 1
        assert requests(metrics, "merge_requests") == listed_before + 1
        assert await store.get_meta("os:retry") == "{}"
        marks = {float(str(await store.get_meta(f"os:wm:1:{s}")))
                 for s in ("merge_requests", "issues")}
        assert len(marks) == 1 and abs(marks.pop() - time.time()) < 60
        notes = {m.key for m in sink.sent if m.topic == "p.notes"
                 and m.key.startswith(b"projects/1/")}
        truth = httpx.get(f"{sim.url}/_simulator/objects", timeout=10).json()
        assert len(notes) == len(truth["projects"]["1"]["notes"]) > 0
    finally:
        await close(sync)


async def test_only_the_children_of_what_changed_are_read_again(
        sim: SimulatorThread, tmp_path: Path) -> None:
    sync, sink, metrics = await make(sim, tmp_path)
    # An overlap wider than the history: every issue is in the next window again.
    sync.options = dataclasses.replace(sync.options, overlap_s=86_400.0 * 3)
    try:
        assert (await sync.round()).ok  # the first sweep
        threads = requests(metrics, "discussions")
        assert threads > 2
        answer = httpx.post(f"{sim.url}/_simulator/changes",
                            json={"kind": "add_note", "project_id": 1, "on": "issue"},
                            timeout=10).json()["changes"][0]
        time.sleep(1.1)  # the window ends at the round's start, on GitLab's clock (seconds)
        before = len(sink.sent)
        second = await sync.round()
        assert second.ok and not second.sweep and second.projects == 1
        # every issue listed again, one changed: its threads are read again, no other's
        assert requests(metrics, "discussions") == threads + 1
        fresh = {m.key.decode() for m in sink.sent[before:]}
        iid = answer["object"]["iid"]
        assert f"projects/1/issues/{iid}/notes/{answer['note_id']}" in fresh
        assert f"projects/1/issues/{iid}" in fresh
    finally:
        await close(sync)


async def test_an_event_naming_an_issue_reads_it_and_its_children_at_once(
        sim: SimulatorThread, tmp_path: Path) -> None:
    """Nothing moved a timestamp (so no window shows it), but an event named issue 2: it is
    read again with its threads and events in the next round."""
    sync, _sink, metrics = await make(sim, tmp_path)
    try:
        assert (await sync.round()).ok
        threads, state_events = (requests(metrics, "discussions"),
                                 requests(metrics, "resource_state_events"))
        raw = orjson.dumps({"id": 99, "project_id": 1, "target_type": "Issue",
                            "target_iid": 2, "action_name": "closed"})
        sync.note_events([Event(99, 1, 1, time.time(), raw)])
        second = await sync.round()
        assert second.ok and second.projects == 1
        assert requests(metrics, "discussions") == threads + 1
        assert requests(metrics, "resource_state_events") == state_events + 1
        third = await sync.round()  # the mark was used up
        assert third.projects == 0 and requests(metrics, "discussions") == threads + 1
    finally:
        await close(sync)
