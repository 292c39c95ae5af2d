"""GitLab's calendar (every offset UTC-12..UTC+14) and clock (the Date header's skew)."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from structlog.testing import capture_logs

from gitlab_producer.gitlab.calendar import (
    GitLabClock,
    after_param,
    day_end,
    earliest_date,
    utc_day_start,
)
from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.errors import RetriesExhaustedError
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.gitlab.transport import RawResponse
from tests.unit.test_gitlab_client import FAST, ScriptedTransport, answer

OFFSETS_S = range(-12 * 3600, 14 * 3600 + 1, 15 * 60)  # every quarter hour a zone may use
DAY = 86_400
BASE = datetime(2026, 3, 9, tzinfo=UTC).timestamp()
# Every 37 minutes over three days: every hour of the day, and the minutes around midnight.
INSTANTS = [BASE + k * 37 * 60 for k in range(3 * 24 * 60 // 37)] + [
    BASE + DAY + d for d in (-1, 0, 1, 3599, 43_199, 43_200, 43_201)]


def zone(offset_s: int) -> timezone:
    return timezone(timedelta(seconds=offset_s))


def local_midnight(day: date, offset_s: int) -> float:
    """The instant the server's day ``day`` begins (from the zone, not from calendar.py)."""
    return datetime.combine(day, datetime.min.time(), zone(offset_s)).timestamp()


@pytest.mark.parametrize("offset_s", OFFSETS_S)
def test_after_returns_everything_from_the_bound_in_every_zone(offset_s: int) -> None:
    for lower in INSTANTS:
        after = date.fromisoformat(after_param(lower))
        # after=D: the server answers from its own D+1 00:00.
        first_served = local_midnight(after + timedelta(days=1), offset_s)
        assert first_served <= lower, (offset_s, datetime.fromtimestamp(lower, UTC))
        assert first_served > lower - 2.6 * DAY  # not much wider than needed


def test_after_is_a_whole_day_before_the_latest_zone() -> None:
    # At UTC-12, 11:59 UTC is still the day before: after must name the day before that.
    assert after_param(datetime(2026, 3, 10, 11, 59, tzinfo=UTC).timestamp()) == "2026-03-08"
    assert after_param(datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp()) == "2026-03-09"
    # The bug this replaced: the UTC date less one day misses the first hours at UTC-8.
    lower = datetime(2026, 3, 10, 3, 0, tzinfo=UTC).timestamp()
    assert local_midnight(date.fromisoformat(after_param(lower)) + timedelta(days=1),
                          -8 * 3600) <= lower


@pytest.mark.parametrize("offset_s", OFFSETS_S)
def test_a_day_never_ends_before_day_end(offset_s: int) -> None:
    for ts in INSTANTS:
        shown = datetime.fromtimestamp(ts, zone(offset_s)).date()  # last_activity_on there
        real_end = local_midnight(shown + timedelta(days=1), offset_s)
        assert real_end <= day_end(shown.isoformat()) < real_end + 26 * 3600 + 1


def test_day_end_is_the_midnight_at_utc_minus_12() -> None:
    assert day_end("2026-03-10") == datetime(2026, 3, 11, 12, tzinfo=UTC).timestamp()
    assert day_end("2026-03-10T00:00:00") == day_end("2026-03-10")


@pytest.mark.parametrize("offset_s", OFFSETS_S)
def test_earliest_date_is_never_later_than_what_gitlab_shows(offset_s: int) -> None:
    for ts in INSTANTS:
        shown = datetime.fromtimestamp(ts, zone(offset_s)).date().isoformat()
        assert earliest_date(ts) <= shown
    assert earliest_date(datetime(2026, 3, 10, 11, 59, tzinfo=UTC).timestamp()) == "2026-03-09"
    assert earliest_date(datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp()) == "2026-03-10"


def test_utc_day_start() -> None:
    assert utc_day_start(datetime(2026, 3, 10, 23, 59, 59, tzinfo=UTC).timestamp()) == \
        datetime(2026, 3, 10, tzinfo=UTC).timestamp()


# -- the clock --------------------------------------------------------------------------------
class Wall:
    def __init__(self, ts: float) -> None:
        self.ts = ts

    def __call__(self) -> float:
        return self.ts


def http_date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC), usegmt=True)


@pytest.mark.parametrize("skew_s", [-900.0, -3.2, 0.0, 0.4, 0.999, 7.5, 900.0])
@pytest.mark.parametrize("gitlab_fraction", [0.0, 0.3, 0.999])
def test_gitlab_now_is_never_ahead_of_gitlab(skew_s: float, gitlab_fraction: float) -> None:
    gitlab_now = 1_790_000_000.0 + gitlab_fraction  # GitLab's clock when it answers
    host = Wall(gitlab_now + skew_s + 0.02)  # the answer arrives 20 ms later
    clock = GitLabClock(wall=host)
    clock.observe(http_date(gitlab_now), host.ts - 0.04, host.ts)
    assert clock.now() <= gitlab_now + 0.02  # GitLab's clock by then
    assert clock.now() > gitlab_now + 0.02 - 1.1  # at most the Date header's second behind
    assert clock.skew_s is not None and abs(clock.skew_s - skew_s) <= 0.55
    host.ts += 100
    assert clock.to_gitlab(host.ts) == clock.now() <= gitlab_now + 100.02


def test_clock_follows_a_stepped_host_clock_and_reports_it() -> None:
    reported: list[float] = []
    host = Wall(1_790_000_000.5)
    clock = GitLabClock(reported.append, wall=host)
    assert clock.now() == host.ts and clock.skew_s is None  # nothing known: the host's
    clock.observe(http_date(host.ts), host.ts - 0.01, host.ts)
    host.ts += 900  # the host's clock is stepped 15 minutes ahead
    clock.observe(http_date(host.ts - 900), host.ts - 0.01, host.ts)
    assert clock.now() <= host.ts - 900
    assert reported[-1] == pytest.approx(900, abs=0.6)
    clock.observe(None, host.ts, host.ts)  # no header: nothing learnt, nothing forgotten
    clock.observe("not a date", host.ts, host.ts)
    assert reported[-1] == pytest.approx(900, abs=0.6) and len(reported) == 2


def test_skew_beyond_a_few_seconds_is_warned_about_now_and_then() -> None:
    host = Wall(1_790_000_000.0)
    clock = GitLabClock(wall=host)
    with capture_logs() as logs:
        clock.observe(http_date(host.ts), host.ts - 0.05, host.ts)  # in step: quiet
        clock.observe(http_date(host.ts - 3), host.ts - 0.05, host.ts)  # 3 s: within limits
        for _ in range(3):
            clock.observe(http_date(host.ts - 15), host.ts - 0.05, host.ts)
        host.ts += 601
        clock.observe(http_date(host.ts + 20), host.ts - 0.05, host.ts)  # behind GitLab
    warnings = [e for e in logs if e["event"] == "gitlab_clock_skew"]
    assert [w["skew_s"] for w in warnings] == [pytest.approx(15, abs=0.6),
                                               pytest.approx(-20, abs=0.6)]
    assert all(w["log_level"] == "warning" for w in warnings)


# -- the client learns the clock from every answer --------------------------------------------
@pytest.mark.parametrize("skew_s", [900.0, -900.0])
async def test_client_takes_gitlab_time_from_the_date_header(skew_s: float) -> None:
    def handler(url: str) -> RawResponse:
        gitlab_now = time.time() - skew_s
        headers = {"date": http_date(gitlab_now)}
        if "throttled" in url:
            headers["ratelimit-reset"] = str(int(gitlab_now) + 2)  # 1-2 s ahead
            return answer(429, text="Retry later", headers=headers)
        return answer(200, [{"id": 1}], headers=headers)

    client = GitLabClient("https://gitlab.test/api/v4", "tok", RateLimiter(10_000),
                          policy=replace(FAST, rate_limit_retries=0),
                          transport=ScriptedTransport(handler))
    assert client.clock.skew_s is None
    await client.get("projects")
    assert client.clock.skew_s == pytest.approx(skew_s, abs=0.6)
    assert client.clock.now() <= time.time() - skew_s + 0.01  # never ahead of GitLab
    gauge = client.metrics.registry.get_sample_value("gitlab_producer_gitlab_clock_skew_seconds")
    assert gauge == pytest.approx(skew_s, abs=0.6)
    # RateLimit-Reset is an instant on GitLab's clock: the pause is 1-2 s (plus jitter),
    # not 15 minutes more, nor none.
    with pytest.raises(RetriesExhaustedError):
        await client.get("throttled")
    waited = client.metrics.registry.get_sample_value(
        "gitlab_producer_rate_limit_wait_seconds_total")
    assert waited is not None and 0.5 <= waited <= 3.3


def test_sync_since_defaults_to_the_utc_day_of_the_given_now() -> None:
    from gitlab_producer.config import load_settings

    required = {"gitlab_base_url": "https://gitlab.test/api/v4", "gitlab_private_token": "t0k"}
    late = datetime(2026, 3, 10, 23, 59, tzinfo=UTC).timestamp()
    assert load_settings(None, **required).since(late) == \
        datetime(2026, 3, 10, tzinfo=UTC).timestamp()
    assert load_settings(None, **required, sync_since="2026-03-01").since(late) == \
        datetime(2026, 3, 1, tzinfo=UTC).timestamp()
