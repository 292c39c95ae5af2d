"""GitLab's JSON shapes for events, projects and users (REST v4, as documented)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from gitlab_producer.simulator.targets import Target, target_title


@dataclass(frozen=True)
class ActionKind:
    """One kind of event: GitLab's ``action_name``/``target_type`` and their filter names."""

    action_name: str
    action_filter: str
    target_type: str | None
    target_filter: str | None
    weight: int
    projectless: bool = False


ACTIONS: tuple[ActionKind, ...] = (
    ActionKind("pushed to", "pushed", None, None, 40),
    ActionKind("pushed new", "pushed", None, None, 3),
    ActionKind("opened", "created", "Issue", "issue", 8),
    ActionKind("closed", "closed", "Issue", "issue", 4),
    ActionKind("opened", "created", "MergeRequest", "merge_request", 6),
    ActionKind("accepted", "merged", "MergeRequest", "merge_request", 4),
    ActionKind("commented on", "commented", "Note", "note", 20),
    ActionKind("joined", "joined", None, None, 2),
    ActionKind("created", "created", None, None, 1),
    ActionKind("created", "created", "Milestone", "milestone", 1),
    # Events outside any project: personal snippets and comments on them.
    ActionKind("created", "created", "Snippet", "snippet", 3, projectless=True),
    ActionKind("commented on", "commented", "Note", "note", 2, projectless=True),
    # Only made by object changes (weight 0: never drawn for the generated history).
    ActionKind("reopened", "reopened", "Issue", "issue", 0),
    ActionKind("closed", "closed", "MergeRequest", "merge_request", 0),
)


def sha_for(*parts: object) -> str:
    """A stable 40-hex commit-like id."""
    return hashlib.sha1("/".join(map(str, parts)).encode(), usedforsecurity=False).hexdigest()


def author_json(user_id: int, host: str) -> dict[str, Any]:
    return dict(_author(user_id, host))


@lru_cache(maxsize=65_536)
def _author(user_id: int, host: str) -> dict[str, Any]:
    digest = hashlib.md5(f"user{user_id}".encode(), usedforsecurity=False).hexdigest()
    return {
        "name": f"User {user_id}",
        "username": f"user{user_id}",
        "id": user_id,
        "state": "active",
        "locked": False,
        "avatar_url": f"https://www.gravatar.com/avatar/{digest}?s=80&d=identicon",
        "web_url": f"https://{host}/user{user_id}",
    }


def render_event(
    *,
    event_id: int,
    action: ActionKind,
    project_id: int | None,
    author_id: int,
    created_at: str,
    host: str,
    target: Target | None = None,
    detail: str | None = None,
) -> dict[str, Any]:
    """One event exactly as ``GET /events`` family endpoints return it. ``target`` names the
    project object it is about (events outside projects name made-up snippets); ``detail`` is
    the note's body of a note event, the pushed ref of a push made by an object change."""
    target_id: int | None = None
    target_iid: int | None = None
    title: str | None = None
    if target is not None:
        target_id, target_iid, title = target.target_id, target.target_iid, target_title(target)
    elif action.target_type is not None:
        target_id, target_iid = 1000 + event_id, event_id % 500 + 1
        title = f"Target {target_id} of event {event_id}"
    event: dict[str, Any] = {
        "id": event_id,
        "title": None,
        "project_id": project_id,
        "action_name": action.action_name,
        "target_id": target_id,
        "target_iid": target_iid,
        "target_type": action.target_type,
        "author_id": author_id,
        "target_title": title,
        "created_at": created_at,
        "author": _author(author_id, host),
        "imported": False,
        "imported_from": "none",
        "author_username": f"user{author_id}",
    }
    if action.action_filter == "pushed":
        commit_to = sha_for(project_id, event_id)
        event["push_data"] = {
            "commit_count": 1 + event_id % 5,
            "action": "created" if action.action_name == "pushed new" else "pushed",
            "ref_type": "branch",
            "commit_from": None if action.action_name == "pushed new" else sha_for(event_id),
            "commit_to": commit_to,
            "ref": detail or ("main" if event_id % 3 else f"feature/topic-{event_id % 7}"),
            "commit_title": f"Change number {event_id}",
            "ref_count": None,
        }
    if action.target_type == "Note":
        noteable = "Snippet" if action.projectless else "Issue"
        noteable_id, noteable_iid = 5000 + event_id % 997, event_id % 500 + 1
        if target is not None and target.noteable_type:
            noteable, noteable_id = target.noteable_type, target.noteable_id or 0
            noteable_iid = target.noteable_iid or 0
        event["note"] = {
            "id": target_id,
            "type": None,
            "body": detail or event_note_body(event_id),
            "attachment": None,
            "author": _author(author_id, host),
            "created_at": created_at,
            "updated_at": created_at,
            "system": False,
            "noteable_id": noteable_id,
            "noteable_type": noteable,
            "project_id": project_id,
            "confidential": False,
            "internal": False,
            "noteable_iid": None if action.projectless else noteable_iid,
            "commands_changes": {},
        }
    return event


def event_note_body(event_id: int) -> str:
    """The body of the note a "commented on" event of the generated history names."""
    return f"Comment from event {event_id}"


GROUPS = 50
TOP_GROUPS = 10  # groups 1-10 are top-level; 11-50 are their subgroups


def group_parent(group_id: int) -> int | None:
    return None if group_id <= TOP_GROUPS else (group_id - 1) % TOP_GROUPS + 1


def group_path(group_id: int) -> tuple[str, str]:
    """(full path, full name) of a group: ``group1/group11``, ``Group 1 / Group 11``."""
    parent = group_parent(group_id)
    if parent is None:
        return f"group{group_id}", f"Group {group_id}"
    path, name = group_path(parent)
    return f"{path}/group{group_id}", f"{name} / Group {group_id}"


def group_of(project_id: int) -> int:
    return project_id % GROUPS + 1


def namespace_json(project_id: int, host: str) -> dict[str, Any]:
    group = group_of(project_id)
    full_path, _ = group_path(group)
    return {
        "id": group,
        "name": f"Group {group}",
        "path": f"group{group}",
        "kind": "group",
        "full_path": full_path,
        "parent_id": group_parent(group),
        "avatar_url": None,
        "web_url": f"https://{host}/groups/{full_path}",
    }


def project_json(
    project_id: int, created_at: str, last_activity_at: str, host: str, simple: bool
) -> dict[str, Any]:
    """A project as ``GET /projects`` returns it; ``simple`` gives the reduced field set."""
    ns = namespace_json(project_id, host)
    path = f"project-{project_id}"
    full = f"{ns['full_path']}/{path}"
    data: dict[str, Any] = {
        "id": project_id,
        "description": f"Project {project_id}",
        "name": f"Project {project_id}",
        "name_with_namespace": f"{group_path(ns['id'])[1]} / Project {project_id}",
        "path": path,
        "path_with_namespace": full,
        "created_at": created_at,
        "default_branch": "main",
        "tag_list": [],
        "topics": [],
        "ssh_url_to_repo": f"git@{host}:{full}.git",
        "http_url_to_repo": f"https://{host}/{full}.git",
        "web_url": f"https://{host}/{full}",
        "readme_url": f"https://{host}/{full}/-/blob/main/README.md",
        "forks_count": 0,
        "avatar_url": None,
        "star_count": project_id % 13,
        "last_activity_at": last_activity_at,
        "namespace": ns,
    }
    if not simple:
        data.update({
            "visibility": "internal" if project_id % 3 else "private",
            "archived": False,
            "empty_repo": False,
            "issues_enabled": True,
            "merge_requests_enabled": True,
            "open_issues_count": project_id % 17,
            "creator_id": project_id % 7 + 1,
            "updated_at": last_activity_at,
        })
    return data


def user_json(user_id: int, created_at: str, last_activity_on: str, host: str) -> dict[str, Any]:
    """A user as an administrator sees it in ``GET /users`` (with ``last_activity_on``)."""
    data = author_json(user_id, host)
    data.update({
        "created_at": created_at,
        "bot": False,
        "last_activity_on": last_activity_on,
        "is_admin": False,
    })
    return data
