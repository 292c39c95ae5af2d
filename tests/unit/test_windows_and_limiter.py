"""Completeness rules (pure functions) and the request budget (fake clock)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.store.base import Cursor
from gitlab_producer.sync.windows import (
    WindowRules,
    cover_day,
    iso,
    lower_bound,
    parse_time,
    project_is_warm,
    project_listing_after,
    project_needs_sync,
    user_needs_sync,
)

RULES = WindowRules(overlap_s=300, project_lag_s=3600, user_resync_s=600)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_iso_round_trips_gitlab_timestamps() -> None:
    assert iso(parse_time("2017-02-09T10:43:19.667Z")) == "2017-02-09T10:43:19.667Z"


def test_listing_window_covers_the_activity_lag() -> None:
    last = ts("2026-03-10T12:00:00")
    assert project_listing_after(RULES, last, 0) == last - 3600 - 300
    assert project_listing_after(RULES, None, last) == last - 3600 - 300


def test_project_with_new_activity_or_no_cursor_is_read() -> None:
    assert project_needs_sync(RULES, None, "2026-03-10T12:00:00.000Z")
    cursor = Cursor(ts("2026-03-10T12:30:00"), "2026-03-10T12:00:00.000Z")
    assert project_needs_sync(RULES, cursor, "2026-03-10T13:10:00.000Z")


def test_unchanged_activity_is_read_until_the_lag_has_passed() -> None:
    # last_activity_at stays put for an hour after it moved: events may hide in that hour.
    cursor = Cursor(ts("2026-03-10T12:30:00"), "2026-03-10T12:00:00.000Z")
    assert project_needs_sync(RULES, cursor, "2026-03-10T12:00:00.000Z")
    settled = Cursor(ts("2026-03-10T13:06:00"), "2026-03-10T12:00:00.000Z")
    assert not project_needs_sync(RULES, settled, "2026-03-10T12:00:00.000Z")


def test_warm_projects_and_the_day_their_authors_cover() -> None:
    activity = "2026-03-10T12:00:00.000Z"
    read = Cursor(ts("2026-03-10T12:30:00"), activity)
    # Unchanged activity under the lag old: only the warm window makes it worth reading.
    assert project_is_warm(RULES, read, activity, ts("2026-03-10T12:40:00"))
    # Once the lag (and overlap) has passed, the project is read itself: not warm any more,
    # yet still due, since its cursor predates the end of the window.
    later = ts("2026-03-10T13:06:00")
    assert not project_is_warm(RULES, read, activity, later)
    assert project_needs_sync(RULES, read, activity)
    # New activity or no cursor: a read of its own, never left to the users.
    assert not project_is_warm(RULES, read, "2026-03-10T12:35:00.000Z", later)
    assert not project_is_warm(RULES, None, activity, later)
    # Authors active since GitLab's date at the oldest cursor (less the overlap), in the
    # earliest zone (UTC-12), whose date is the UTC date until 12:00 UTC.
    cursors = [read, Cursor(ts("2026-03-10T12:02:00"), activity)]
    assert cover_day(RULES, cursors) == "2026-03-09"  # 12:02 less 5 min is the 9th at UTC-12
    assert cover_day(RULES, [read]) == "2026-03-10"  # 12:25 UTC is the 10th everywhere


def test_user_rules() -> None:
    since = ts("2026-03-01T00:00:00")
    now = ts("2026-03-10T15:00:00")
    assert not user_needs_sync(RULES, None, "2026-02-20", since, now)  # inactive since start
    assert user_needs_sync(RULES, None, "2026-03-10", since, now)
    fresh = Cursor(now - 60, "2026-03-10")
    assert not user_needs_sync(RULES, fresh, "2026-03-10", since, now)  # read a minute ago
    stale = Cursor(now - 601, "2026-03-10")
    assert user_needs_sync(RULES, stale, "2026-03-10", since, now)
    # A new activity date always means unread events.
    assert user_needs_sync(RULES, Cursor(now - 10, "2026-03-09"), "2026-03-10", since, now)
    # After the day ended (in every zone: at UTC-12, at 12:00 UTC the next day), plus the
    # overlap, one more read, then it is settled.
    still_today = ts("2026-03-11T11:59:00")  # 23:59 on the 10th at UTC-12
    assert not user_needs_sync(RULES, Cursor(still_today - 60, "2026-03-10"), "2026-03-10",
                               since, still_today)  # read a minute ago: not yet
    assert user_needs_sync(RULES, Cursor(still_today - 601, "2026-03-10"), "2026-03-10",
                           since, still_today)  # still re-read periodically
    next_day = ts("2026-03-11T12:06:00")
    assert user_needs_sync(RULES, fresh, "2026-03-10", since, next_day)
    done = Cursor(next_day, "2026-03-10")
    assert not user_needs_sync(RULES, done, "2026-03-10", since, next_day + 3600)
    # A day that ended before since in every zone is skipped; one that may not have is not.
    assert not user_needs_sync(RULES, None, "2026-02-27", since, now)
    assert user_needs_sync(RULES, None, "2026-02-28", since, now)  # UTC-12: to 03-01 12:00


def test_users_without_activity_dates_are_reread_periodically() -> None:
    assert user_needs_sync(RULES, None, None, 0, 1000)
    assert not user_needs_sync(RULES, Cursor(900, ""), None, 0, 1000)
    assert user_needs_sync(RULES, Cursor(100, ""), "", 0, 1000)


def test_lower_bound_re_reads_the_overlap() -> None:
    assert lower_bound(RULES, None, 500.0) == 500.0
    assert lower_bound(RULES, Cursor(10_000, "x"), 500.0) == 10_000 - 300
    assert lower_bound(RULES, Cursor(600, "x"), 500.0) == 500.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float, result: object = None) -> object:
        fake.now += delay
        return await real_sleep(0, result)

    monkeypatch.setattr("gitlab_producer.gitlab.ratelimit.asyncio.sleep", fake_sleep)
    return fake


async def test_limiter_spaces_slots_evenly(clock: FakeClock) -> None:
    limiter = RateLimiter(50, clock=clock)
    starts = []
    for _ in range(200):
        await limiter.acquire()
        starts.append(clock.now)
    per_second: dict[int, int] = {}
    for t in starts:
        per_second[int(t)] = per_second.get(int(t), 0) + 1
    assert max(per_second.values()) <= 50
    # ... and the budget is used: at most 1 % slower than 50/s.
    assert 199 / 50 <= starts[-1] - starts[0] <= 199 / 50 * 1.01


async def test_limiter_pause_holds_everyone(clock: FakeClock) -> None:
    limiter = RateLimiter(100, clock=clock)
    await limiter.acquire()
    limiter.pause(5)
    await limiter.acquire()
    assert clock.now >= 1005


def test_limiter_rejects_nonpositive_rates() -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(0)
