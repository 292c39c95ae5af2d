"""Project and user listing entries: the two fields the sync needs of each, checked.

GitLab (or a proxy in front of it) may list a record without an ``id``, with
``last_activity_at: null``, or with fields of the wrong type. Such a record cannot be
synced; it is left out with a reason, and the rest of the page is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any


@dataclass
class Listed:
    """A page's usable entries as (id, activity marker), and why the others were left out."""

    entries: list[tuple[int, str]] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)


def _entity_id(record: Any) -> int | str:
    """The record's id, or why there is none."""
    if not isinstance(record, dict):
        return f"not an object: {str(record)[:80]}"
    value = record.get("id")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"id {value!r} is not a positive integer"
    return value


def projects(page: list[Any]) -> Listed:
    """Projects with an integer ``id`` and an ISO 8601 ``last_activity_at``."""
    listed = Listed()
    for record in page:
        pid = _entity_id(record)
        if isinstance(pid, str):
            listed.malformed.append(pid)
            continue
        activity = record.get("last_activity_at")
        try:
            datetime.fromisoformat(activity)
        except (TypeError, ValueError):
            listed.malformed.append(f"project {pid}: last_activity_at {activity!r} is not a time")
            continue
        listed.entries.append((pid, activity))
    return listed


def users(page: list[Any]) -> Listed:
    """Users with an integer ``id``; ``last_activity_on`` is a date or absent (GitLab shows it
    to administrators only), ``""`` standing for absent."""
    listed = Listed()
    for record in page:
        uid = _entity_id(record)
        if isinstance(uid, str):
            listed.malformed.append(uid)
            continue
        activity = record.get("last_activity_on") or ""
        try:
            if activity:
                date.fromisoformat(activity[:10])
        except (TypeError, ValueError):
            listed.malformed.append(f"user {uid}: last_activity_on {activity!r} is not a date")
            continue
        listed.entries.append((uid, activity[:10]))
    return listed
