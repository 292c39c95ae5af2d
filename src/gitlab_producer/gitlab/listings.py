"""Project and user listing entries: the two fields the sync needs of each, checked.

GitLab (or a proxy in front of it) may list a record without an ``id``, with
``last_activity_at: null``, or with fields of the wrong type. Such a record cannot be
synced; it is left out with a reason, and the rest of the page is used.
"""

from __future__ import annotations

from collections.abc import Callable
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


def _checked(kind: str, page: list[Any], marker: Callable[[dict[str, Any]], str]) -> Listed:
    listed = Listed()
    for record in page:
        entity_id = _entity_id(record)
        if isinstance(entity_id, str):
            listed.malformed.append(f"{kind}: {entity_id}")
            continue
        try:
            listed.entries.append((entity_id, marker(record)))
        except (TypeError, ValueError) as exc:
            listed.malformed.append(f"{kind} {entity_id}: {exc}")
    return listed


def _project_activity(record: dict[str, Any]) -> str:
    activity = record.get("last_activity_at")
    if not isinstance(activity, str):
        raise TypeError(f"last_activity_at {activity!r} is not a time")
    try:
        datetime.fromisoformat(activity)
    except ValueError:
        raise ValueError(f"last_activity_at {activity!r} is not a time") from None
    return activity


def _user_activity(record: dict[str, Any]) -> str:
    activity = record.get("last_activity_on") or ""
    try:
        if activity:
            date.fromisoformat(activity[:10])
    except (TypeError, ValueError):
        raise ValueError(f"last_activity_on {activity!r} is not a date") from None
    return str(activity[:10])


def projects(page: list[Any]) -> Listed:
    """Projects with an integer ``id`` and an ISO 8601 ``last_activity_at``."""
    return _checked("project", page, _project_activity)


def users(page: list[Any]) -> Listed:
    """Users with an integer ``id``; ``last_activity_on`` is a date or absent (GitLab shows it
    to administrators only), ``""`` standing for absent."""
    return _checked("user", page, _user_activity)
