"""Every user an object references is found, whatever field or depth GitLab puts it at (the
collaborators stage imports them all through the user cache); objects that merely have an id
are not users."""

from __future__ import annotations

from typing import Any

from gitlab_producer.objects.executor import referenced_users


def user(uid: int) -> dict[str, Any]:
    return {"id": uid, "username": f"u{uid}", "name": f"U {uid}", "state": "active"}


def found(obj: Any) -> set[int]:
    out: set[int] = set()
    referenced_users(obj, out)
    return out


def test_users_at_every_field_gitlab_uses() -> None:
    merge_request = {"id": 9, "iid": 3, "author": user(1), "assignee": user(2),
                     "assignees": [user(2), user(3)], "reviewers": [user(4)],
                     "merged_by": user(5), "merge_user": user(5), "closed_by": None,
                     "milestone": {"id": 77, "title": "m"}, "project_id": 1000}
    assert found(merge_request) == {1, 2, 3, 4, 5}
    discussion = {"id": "ab", "notes": [{"id": 1, "author": user(6)},
                                        {"id": 2, "author": user(7), "resolved_by": user(8)}]}
    assert found(discussion) == {6, 7, 8}
    deployment = {"id": 1, "user": user(9), "deployable": {"id": 5, "user": user(10)}}
    assert found(deployment) == {9, 10}
    approvals = {"approved_by": [{"user": user(11)}]}
    assert found(approvals) == {11}
    assert found({"id": 1, "user": user(12), "state": "closed"}) == {12}  # resource event
    assert found(user(13)) == {13}  # a member is a user itself
    project = {"id": 1000, "namespace": {"id": 5, "kind": "group", "path": "g"},
               "owner": None}
    assert found(project) == set()  # ids without a username are not users
    assert found({"id": "1", "username": "x", "user": {"id": None, "username": "y"}}) == set()
