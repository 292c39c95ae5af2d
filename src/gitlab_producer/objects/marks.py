"""What an event or a webhook names, for the object sync to read at once: an issue or merge
request (a note's noteable), or only its project (a push)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

PARENT_TYPES = {"Issue": "issues", "MergeRequest": "merge_requests"}
NOTE_TYPES = frozenset({"Note", "DiffNote", "DiscussionNote"})


def marks_of(raw: bytes) -> tuple[int, str, int] | None:
    """(project, parent collection, iid) an event names, or None."""
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("project_id"), int):
        return None
    pid: int = event["project_id"]
    parent = PARENT_TYPES.get(str(event.get("target_type")))
    iid = event.get("target_iid")
    if parent is None and event.get("target_type") in NOTE_TYPES:
        note = event.get("note") or {}
        parent = PARENT_TYPES.get(str(note.get("noteable_type")))
        iid = note.get("noteable_iid")
    if parent is None or not isinstance(iid, int):
        return (pid, "", 0)
    return (pid, parent, iid)


def hook_marks(payload: Mapping[str, Any]) -> tuple[int, str, int] | None:
    """(project, parent collection, iid) a webhook names (issue, merge request, note hooks)."""
    project = payload.get("project") or {}
    pid = project.get("id") if isinstance(project, dict) else None
    if not isinstance(pid, int):
        return None
    kind = payload.get("object_kind")
    attrs = payload.get("object_attributes") or {}
    if kind in ("issue", "merge_request") and isinstance(attrs.get("iid"), int):
        return (pid, f"{kind}s", int(attrs["iid"]))
    if kind == "note":
        for parent in ("issue", "merge_request"):
            thing = payload.get(parent)
            if isinstance(thing, dict) and isinstance(thing.get("iid"), int):
                return (pid, f"{parent}s", int(thing["iid"]))
    return (pid, "", 0)
