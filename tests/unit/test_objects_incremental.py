"""The object sync's rules: the windows, when a watermark may move, what is read again, when
a sweep is due and what it deletes, and what events and webhooks name."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.metrics import Metrics
from gitlab_producer.objects import incremental as rules
from gitlab_producer.objects.delivery import ObjectDeliverer
from gitlab_producer.objects.marks import hook_marks, marks_of
from gitlab_producer.objects.objsync import ObjectSync, SyncOptions
from gitlab_producer.objects.streams import KINDS, stream
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.unit.test_objects_delivery import ListSink

T = 1_780_000_000.0
ALL = frozenset({*KINDS, "merge_request_commits"})


def test_a_window_starts_an_overlap_before_the_watermark_and_ends_at_the_round_start() -> None:
    read = rules.window(T, T + 600, overlap_s=300)
    assert (read.after, read.before) == (T - 300, T + 600)
    params = read.params(stream("issues"))
    assert params == {"updated_after": rules.iso(T - 300), "updated_before": rules.iso(T + 600)}
    assert rules.window(T, T - 5, 300).before == T  # a clock stepped back: never behind


def test_streams_filter_by_their_own_time_field_or_are_read_whole() -> None:
    read = rules.window(T, T + 60, 0)
    assert read.params(stream("commits")) == {"since": rules.iso(T)}
    assert read.params(stream("branches")) == {}
    assert set(rules.WINDOWED) == {"milestones", "merge_requests", "issues", "pipelines",
                                   "deployments"}


def test_the_watermark_moves_to_the_window_end_only_when_everything_was_delivered() -> None:
    read = rules.window(T, T + 600, 300)
    assert rules.next_watermark(T, read, complete=True) == T + 600
    assert rules.next_watermark(T, read, complete=False) == T
    assert rules.next_watermark(T + 900, read, complete=True) == T + 900  # never backwards


def test_a_parent_changed_when_fresh_named_or_updated_after_the_watermark() -> None:
    before = {"updated_at": "2026-05-28T20:26:00.000Z"}  # T - 40 s
    after = {"updated_at": "2026-05-28T20:28:00.000Z"}  # T + 80 s
    assert rules.parse_ts(before["updated_at"]) < T < rules.parse_ts(after["updated_at"])  # type: ignore[operator]
    # In the overlap only, already produced: the last complete window read its children.
    assert not rules.changed(before, fresh=False, marked=False, watermark=T)
    assert rules.changed(before, fresh=True, marked=False, watermark=T)
    assert rules.changed(before, fresh=False, marked=True, watermark=T)
    # Produced by a round that failed before its children were read: not fresh now, but
    # the watermark did not move past it.
    assert rules.changed(after, fresh=False, marked=False, watermark=T)
    assert rules.changed({}, fresh=False, marked=False, watermark=T)  # no timestamp: read


def test_what_is_read_again_under_a_changed_or_unchanged_parent() -> None:
    issue_children = {"discussions", "resource_state_events", "resource_label_events",
                      "resource_milestone_events"}
    assert set(rules.rereads("issues", {}, True, ALL)) == issue_children
    assert rules.rereads("issues", {"state": "opened"}, False, ALL) == ()
    assert set(rules.rereads("merge_requests", {"state": "merged"}, True, ALL)) == (
        issue_children | {"merge_request_commits"})
    # An open merge request's commits whether or not it changed; a merged one's not.
    assert rules.rereads("merge_requests", {"state": "opened"}, False, ALL) == (
        "merge_request_commits",)
    assert rules.rereads("merge_requests", {"state": "merged"}, False, ALL) == ()
    # Only what is wanted.
    assert rules.rereads("issues", {}, True, {"discussions"}) == ("discussions",)


def test_a_sweep_is_due_first_of_all_then_every_interval_and_every_round_at_zero() -> None:
    assert rules.sweep_due(None, T, 86_400)
    assert not rules.sweep_due(T, T + 86_399, 86_400)
    assert rules.sweep_due(T, T + 86_400, 86_400)
    assert rules.sweep_due(T, T + 1, 0)


def test_keys_no_longer_listed_are_deleted() -> None:
    known = {"projects/1/issues/1", "projects/1/issues/2", "projects/1/issues/3"}
    assert rules.deleted(known, {"projects/1/issues/2", "projects/1/issues/4"}) == [
        "projects/1/issues/1", "projects/1/issues/3"]
    assert rules.deleted(known, known) == []


def test_events_name_their_issue_or_merge_request_and_notes_their_noteable() -> None:
    def event(**fields: object) -> bytes:
        return orjson.dumps({"id": 1, "project_id": 7, **fields})

    assert marks_of(event(target_type="Issue", target_iid=5)) == (7, "issues", 5)
    assert marks_of(event(target_type="MergeRequest", target_iid=3)) == (7, "merge_requests", 3)
    assert marks_of(event(target_type="DiffNote", target_iid=None,
                          note={"noteable_type": "MergeRequest", "noteable_iid": 3})) == (
        7, "merge_requests", 3)
    assert marks_of(event(target_type=None, push_data={"ref": "main"})) == (7, "", 0)
    assert marks_of(orjson.dumps({"id": 1, "project_id": None})) is None
    assert marks_of(b"not json") is None


def test_webhooks_name_their_object() -> None:
    project = {"id": 7}
    assert hook_marks({"object_kind": "issue", "project": project,
                       "object_attributes": {"iid": 5}}) == (7, "issues", 5)
    assert hook_marks({"object_kind": "note", "project": project,
                       "merge_request": {"iid": 3}, "object_attributes": {"id": 9}}) == (
        7, "merge_requests", 3)
    assert hook_marks({"object_kind": "push", "project": project}) == (7, "", 0)
    assert hook_marks({"object_kind": "issue"}) is None


async def test_a_produced_webhook_marks_its_object_for_the_object_sync(tmp_path: Path) -> None:
    from tests.unit.test_webhook_receiver import serving

    store = SQLiteStore(tmp_path / "sync.db")
    client = GitLabClient("http://127.0.0.1:9/api/v4", "t", RateLimiter(10))  # never asked
    sync = ObjectSync(client, store, ObjectDeliverer(store, ListSink(), "p", "s", 3600),
                      SyncOptions(frozenset(KINDS), 300, 3600, 86_400, 1, 3600))
    body = orjson.dumps({"object_kind": "note", "project": {"id": 12},
                         "issue": {"iid": 5}, "object_attributes": {"id": 9}})
    headers = {"X-Gitlab-Token": "s3cret", "X-Gitlab-Event": "Note Hook"}
    async with serving(tmp_path, Metrics()) as (url, receiver), httpx.AsyncClient() as http:
        receiver.observers.append(sync.note_hook)
        first = await http.post(url, content=body, headers=headers)
        assert first.status_code == 200
        assert sync.marked == {12: {("issues", 5)}}
        sync.marked.clear()
        again = await http.post(url, content=body, headers=headers)  # a duplicate
        assert again.json() == {"status": "duplicate"} and sync.marked == {}
    await sync.client.aclose()
    await store.close()
