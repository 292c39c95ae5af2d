"""Which entities to read and from when: the completeness rules, as pure functions.

GitLab facts they rest on:

- ``Project#last_activity_at`` moves only when the stored value is older than an hour
  (``PROJECT_ACTIVITY_LAG``), so after a new event it may still show a time up to an hour old;
  but any event created more than that lag after it *would* have moved it.
- ``User#last_activity_on`` is a date: activity later on the same day does not change it.
- Events' ``after``/``before`` filters take whole days. Days and dates are GitLab's, in a time
  zone it does not name: all day arithmetic is in :mod:`gitlab_producer.gitlab.calendar`.
- Event ids and ``created_at`` grow together; an event may become visible a little after its
  ``created_at`` (``SYNC_OVERLAP`` re-reads that far behind each cursor).

Every instant here (cursors, ``now``, ``since``) is in GitLab's time, not the host's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from gitlab_producer.gitlab.calendar import day_end, earliest_date
from gitlab_producer.store.base import Cursor


@dataclass(frozen=True)
class WindowRules:
    """The margins from the settings, in seconds."""

    overlap_s: float = 300.0
    project_lag_s: float = 3600.0
    user_resync_s: float = 600.0


def parse_time(text: str) -> float:
    """GitLab's ISO 8601 timestamp -> Unix seconds."""
    return datetime.fromisoformat(text).timestamp()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def project_listing_after(rules: WindowRules, last_round_start: float | None,
                          since: float) -> float:
    """``last_activity_after`` for discovery: every project with an event since the last
    successful round began has ``last_activity_at`` later than this."""
    base = last_round_start if last_round_start is not None else since
    return base - rules.project_lag_s - rules.overlap_s


def project_needs_sync(rules: WindowRules, cursor: Cursor | None, last_activity_at: str) -> bool:
    """Read a listed project's events unless its cursor provably covers everything."""
    if cursor is None or cursor.activity != last_activity_at:
        return True
    # Unchanged last_activity_at: new events can only lie within the lag after it.
    return cursor.synced_at < _settled_at(rules, last_activity_at)


def _settled_at(rules: WindowRules, last_activity_at: str) -> float:
    """From then on an unchanged ``last_activity_at`` proves the project had no new event."""
    return parse_time(last_activity_at) + rules.project_lag_s + rules.overlap_s


def project_is_warm(rules: WindowRules, cursor: Cursor | None, last_activity_at: str,
                    now: float) -> bool:
    """The project needs reading only because its ``last_activity_at`` is under the lag old
    (a newer event need not have moved it). Every such event is also in its author's list, so
    reading the authors active since then covers it as well; once the lag has passed, the
    project is read itself (its cursor still predates ``settled_at``)."""
    if cursor is None or cursor.activity != last_activity_at:
        return False
    settled_at = _settled_at(rules, last_activity_at)
    return cursor.synced_at < settled_at and now < settled_at


def cover_day(rules: WindowRules, cursors: list[Cursor]) -> str:
    """The oldest ``last_activity_on`` an author of an unread event in these warm projects can
    have: GitLab's date at the oldest cursor (less the overlap), in the earliest zone."""
    return earliest_date(min(c.synced_at for c in cursors) - rules.overlap_s)


def user_needs_sync(rules: WindowRules, cursor: Cursor | None, last_activity_on: str | None,
                    since: float, now: float) -> bool:
    """Read a user's events when its activity date is new, or its day may still hold unread
    events (then at most every ``user_resync_s``, and once more after the day ended)."""
    if not last_activity_on:
        # Without an administrator token GitLab hides last_activity_on: re-read periodically.
        return cursor is None or now - cursor.synced_at >= rules.user_resync_s
    ends = day_end(last_activity_on)  # the latest it can end, GitLab's zone being unknown
    if ends <= since:
        return False
    if cursor is None or cursor.activity != last_activity_on:
        return True
    settled_at = ends + rules.overlap_s
    if cursor.synced_at >= settled_at:
        return False
    return now >= settled_at or now - cursor.synced_at >= rules.user_resync_s


def lower_bound(rules: WindowRules, cursor: Cursor | None, since: float) -> float:
    """Oldest ``created_at`` worth reading for an entity."""
    if cursor is None:
        return since
    return max(since, cursor.synced_at - rules.overlap_s)
