"""GitLab's calendar and clock: the one place that does day and clock arithmetic.

GitLab's days are its own. A self-managed GitLab renders timestamps in its configured
``time_zone`` (``2026-12-01T08:43:19.667+03:00``), the events API's ``after``/``before`` dates
are that zone's days (``after=D``: created after the end of D *there*), and a user's
``last_activity_on`` is that zone's date. The API never names the zone, so every rule here
holds for any offset from UTC-12 to UTC+14: a day boundary is taken at whichever of those
offsets is the safe side (more read, never less).

GitLab's clock is not the host's either. Every answer's ``Date`` header is GitLab's time (to
the second): :class:`GitLabClock` turns it into the skew and gives "now" in GitLab's time,
which is what cursors and windows compared with GitLab's ``created_at`` must use.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime

from gitlab_producer.logs import get_logger

log = get_logger(__name__)

DAY_S = 86_400.0
EARLIEST_OFFSET_S = -12 * 3600.0  # UTC-12: the zone whose days start and end last
LATEST_OFFSET_S = 14 * 3600.0  # UTC+14: the zone whose days start and end first
SKEW_WARNING_S = 5.0  # warn when GitLab's clock and the host's provably differ by more


def _utc_date(ts: float) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


def _utc_midnight(day: date) -> float:
    return datetime.combine(day, datetime.min.time(), UTC).timestamp()


def earliest_date(ts: float) -> str:
    """The earliest date GitLab can show for the instant ``ts`` (its date at UTC-12): a user
    active at or after ``ts`` has a ``last_activity_on`` of this day or later."""
    return _utc_date(ts + EARLIEST_OFFSET_S).isoformat()


def after_param(lower_ts: float) -> str:
    """The ``after`` date that returns every event created at or after ``lower_ts``.

    ``after=D`` starts at the server's D+1 00:00, which is latest at UTC-12 (D+1 12:00 UTC):
    D+1 is the date of ``lower_ts`` at UTC-12, so that midnight is at or before ``lower_ts``
    in every zone. (At most a day and a half before the bound; the reading stops at the
    bound anyway, so the wider window costs nothing but the rest of the last page.)"""
    return (_utc_date(lower_ts + EARLIEST_OFFSET_S) - timedelta(days=1)).isoformat()


def day_end(day: str) -> float:
    """The latest instant at which GitLab's day ``day`` (``YYYY-MM-DD``) can end: its
    midnight at UTC-12. Until then a user whose ``last_activity_on`` is that day may still
    be adding events without changing it."""
    return _utc_midnight(date.fromisoformat(day[:10])) + DAY_S - EARLIEST_OFFSET_S


def utc_day_start(ts: float) -> float:
    """Start of the UTC day holding ``ts`` (the default ``SYNC_SINCE``)."""
    return _utc_midnight(_utc_date(ts))


class GitLabClock:
    """GitLab's time, learnt from the ``Date`` header of its answers.

    ``Date`` has a resolution of one second and was written at some moment between the
    request going out and the answer arriving, so an answer only bounds the skew (host clock
    minus GitLab's): ``sent - date - 1 < skew <= received - date``. :meth:`now` uses the
    upper bound, so GitLab's "now" as this process sees it is never ahead of GitLab's real
    clock (a cursor may be a second early, never late); the gauge shows the middle of the
    bounds. Each answer replaces the previous bounds, so a clock that is stepped is followed
    at the next answer. Before any answer the host's clock is taken as GitLab's.
    """

    def __init__(self, report: Callable[[float], None] | None = None,
                 warn_s: float = SKEW_WARNING_S, wall: Callable[[], float] = time.time,
                 warn_every_s: float = 600.0) -> None:
        self._report = report
        self._warn_s = warn_s
        self._wall = wall
        self._warn_every_s = warn_every_s
        self._last_warning: float | None = None
        self._ahead_s = 0.0  # the upper bound of the skew: what now() subtracts
        self.skew_s: float | None = None  # the estimate, None until the first answer
        self._date_text = ""
        self._date_ts = 0.0

    def wall(self) -> float:
        """The host's clock (what :meth:`to_gitlab` converts)."""
        return self._wall()

    def now(self) -> float:
        """GitLab's current time, never ahead of GitLab's clock."""
        return self._wall() - self._ahead_s

    def to_gitlab(self, host_ts: float) -> float:
        """A host-clock instant in GitLab's time (with the skew known now)."""
        return host_ts - self._ahead_s

    def observe(self, date_header: str | None, sent: float, received: float) -> None:
        """Learn from one answer: its ``Date`` header, and the host's clock when the request
        went out and when the answer arrived."""
        if not date_header:
            return
        if date_header != self._date_text:  # one parse per second of answers
            try:
                self._date_ts = parsedate_to_datetime(date_header).timestamp()
            except (TypeError, ValueError):
                return
            self._date_text = date_header
        low, high = sent - self._date_ts - 1.0, received - self._date_ts
        self._ahead_s = high
        self.skew_s = (low + high) / 2
        if self._report is not None:
            self._report(self.skew_s)
        if low > self._warn_s or high < -self._warn_s:
            self._warn(received)

    def _warn(self, at: float) -> None:
        if self._last_warning is not None and at - self._last_warning < self._warn_every_s:
            return
        self._last_warning = at
        assert self.skew_s is not None
        log.warning("gitlab_clock_skew", skew_s=round(self.skew_s, 1),
                    meaning="the host's clock minus GitLab's (its Date header); cursors and "
                            "windows use GitLab's time, but fix the host's clock (NTP)")
