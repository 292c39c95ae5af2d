"""Lists read by a time cursor (ascending ``updated_at``, ``updated_after`` moved to the last
one read): the next request's cursor, the page numbers inside a run sharing one timestamp, the
end, and a real read of such a run against the simulator (each object once, no loop)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.errors import PaginationError
from gitlab_producer.gitlab.pagination import (
    CURSOR_OVERLAP,
    TimeCursor,
    TimeCursorPaginator,
    cursor_text,
    parse_cursor,
)
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.objects.delivery import ObjectDeliverer
from gitlab_producer.objects.executor import Executor, Progress
from gitlab_producer.objects.objsync import NoPositions
from gitlab_producer.objects.streams import Scope, stream
from gitlab_producer.simulator.server import running_simulator
from gitlab_producer.simulator.world import WorldSpec
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.unit.test_objects_delivery import ListSink

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
MORE = {"x-next-page": "2"}
LAST = {"x-next-page": ""}


def test_the_cursor_moves_to_the_last_timestamp_read_minus_the_overlap() -> None:
    paging = TimeCursorPaginator("issues", None, TimeCursor())
    stamps = [T0 + timedelta(seconds=s) for s in range(5)]
    assert paging.advance(MORE, stamps) == TimeCursor(stamps[-1] - CURSOR_OVERLAP)
    assert paging.advance(LAST, [stamps[-1]]) is None


def test_a_run_of_one_timestamp_longer_than_a_page_is_read_by_page_numbers() -> None:
    paging = TimeCursorPaginator("issues", None, TimeCursor())
    start = T0 - CURSOR_OVERLAP
    assert paging.advance(MORE, [T0] * 3) == TimeCursor(start)
    assert paging.advance(MORE, [T0] * 3) == TimeCursor(start, 2)  # the whole page is T0
    assert paging.advance(MORE, [T0] * 3) == TimeCursor(start, 3)
    later = T0 + timedelta(seconds=1)
    assert paging.advance(MORE, [T0, later]) == TimeCursor(later - CURSOR_OVERLAP)


def test_a_list_that_never_ends_is_abandoned_after_max_pages() -> None:
    paging = TimeCursorPaginator("issues", 3, TimeCursor())
    paging.advance(MORE, [T0])
    paging.advance(MORE, [T0])  # the same timestamp: the next page of the run
    with pytest.raises(PaginationError, match="GITLAB_MAX_PAGES"):
        paging.advance(MORE, [T0 + timedelta(seconds=2)])


def test_a_page_older_than_the_cursor_moves_it_on_by_a_page_never_back() -> None:
    paging = TimeCursorPaginator("issues", None, TimeCursor(T0, 2))
    assert paging.advance(MORE, [T0 - timedelta(seconds=5)]) == TimeCursor(T0, 3)
    assert paging.advance(MORE, []) == TimeCursor(T0, 4)  # no timestamp on the page


def test_timestamps_in_any_offset_become_utc_milliseconds() -> None:
    found = parse_cursor("2026-12-01T11:00:00.667+03:00")
    assert found == T0 + timedelta(milliseconds=667)
    assert cursor_text(found) == "2026-12-01T08:00:00.667Z"
    assert parse_cursor("not a time") is None and parse_cursor(None) is None


BIG = WorldSpec(projects=1, users=6, events=30, history_days=1.0, seed=35, quiet_s=7200.0,
                objects_per_project=12, feature_off_share=0.0, big_project_issues=150)


async def test_issues_sharing_one_updated_at_are_each_read_once(tmp_path: Path) -> None:
    with running_simulator(BIG) as sim:
        objects = sim.sim.objects
        with objects.lock:
            po = objects.pin(1)
            same = max(t.updated for t in po.issues.values())
            for thing in po.issues.values():
                thing.updated = same  # 150 issues edited within one millisecond
            po.rendered.clear()
        client = GitLabClient(f"{sim.url}/api/v4", "sim-token", RateLimiter(1000))
        store = SQLiteStore(tmp_path / "state.db")
        sink = ListSink()
        spec = stream("issues")
        paged = dataclasses.replace(spec, params=tuple(
            (k, "20" if k == "per_page" else v) for k, v in spec.params))
        try:
            executor = Executor(client, ObjectDeliverer(store, sink, "p", "s", 3600),
                                frozenset({"issues"}))
            progress = Progress()
            await executor.read(paged, Scope(1), progress, NoPositions(), "issues")
        finally:
            await client.aclose()
            await store.close()
    keys = [m.key.decode() for m in sink.sent]
    assert sorted(keys) == sorted(f"projects/1/issues/{i}" for i in po.issues)
    assert progress.fetched["issues"] == len(po.issues)  # the overlap is not delivered twice
