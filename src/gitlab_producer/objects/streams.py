"""Every object stream of the import, declared once: where it is read, what it belongs to, how
it pages, how its objects are keyed and versioned, and which stage reads it.

A stream's ``path`` and ``key`` are templates. Placeholders are filled from the scope (the
project, and for child streams the parent collection and iid) and then from the object itself,
each value URL-encoded as one path segment (a tag ``rel/1.0`` becomes ``rel%2F1.0``), so that
``GET /api/v4/<key>`` returns the object.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import quote


class Paging(Enum):
    """How a stream's pages are followed."""

    SINGLE = "single"  # one object, not a list
    OFFSET = "offset"  # X-Next-Page / Link rel=next
    KEYSET = "keyset"  # Link rel=next only
    # Ascending ``updated_at`` (``order_by=updated_at&sort=asc``), followed by moving the
    # stream's ``updated_filter`` (``updated_after``) to the last ``updated_at`` read:
    # :class:`~gitlab_producer.gitlab.pagination.TimeCursorPaginator`.
    UPDATED_CURSOR = "updated_cursor"


class Version(Enum):
    """What tells one version of an object from the next."""

    UPDATED_AT = "updated_at"  # GitLab's ``updated_at`` (header ``updated_at``)
    CONTENT = "content"  # a hash of the JSON (kinds without ``updated_at``)
    IMMUTABLE = "immutable"  # never changes once written (commits, resource events)


@dataclass(frozen=True)
class Scope:
    """Where a stream is read: a project, and for child streams their parent."""

    project_id: int
    parent: str = ""  # "issues" or "merge_requests" for child streams
    parent_iid: int = 0

    def fields(self) -> dict[str, Any]:
        return {"project_id": self.project_id, "project": self.project_id,
                "parent": self.parent, "parent_iid": self.parent_iid}


@dataclass(frozen=True)
class Stream:
    """One list (or single object) GitLab serves, as the import reads it."""

    name: str
    kind: str  # the topic suffix, GitLab's REST collection name
    path: str
    key: str
    version: Version
    paging: Paging = Paging.OFFSET
    params: tuple[tuple[str, str], ...] = ()
    child_of: tuple[str, ...] = ()  # parent collections of a child stream
    updated_filter: str = ""  # the time filter an incremental read would use
    nested_notes: bool = False  # discussions: each note is also a ``notes`` record

    def url(self, scope: Scope) -> str:
        return fill(self.path, scope.fields(), {})

    def key_of(self, scope: Scope, item: Mapping[str, Any]) -> str:
        return fill(self.key, scope.fields(), item)


_FORMATTER = string.Formatter()


@functools.lru_cache(maxsize=512)
def _parsed(template: str) -> tuple[tuple[str, str | None], ...]:
    """A template's literals and placeholder names (parsed once: a backfill fills a key per
    object)."""
    return tuple((literal, name) for literal, name, _spec, _conv in _FORMATTER.parse(template))


def fill(template: str, scope: Mapping[str, Any], item: Mapping[str, Any]) -> str:
    """``template`` with each ``{name}`` replaced by the scope's or the item's value, encoded
    as one path segment (``safe=""``: slashes too)."""
    out = []
    for literal, name in _parsed(template):
        out.append(literal)
        if name is not None:
            value = scope[name] if name in scope else item[name]
            # An int's decimal text (digits, "-") is its own encoding.
            out.append(str(value) if type(value) is int else quote(str(value), safe=""))
    return "".join(out)


P = "projects/{project}"
THING = "projects/{project_id}/{parent}/{parent_iid}"
LIST = (("per_page", "100"),)
# Lists GitLab filters by ``updated_after`` and orders by ``updated_at`` are read oldest
# change first with a time cursor, never by page number: offset pages shift when an object
# of an earlier page is deleted, or edited out of a window, while the list is read, and the
# first object of the next page is then never read. An object edited meanwhile moves to the
# end of this order and is read there. (Issues offer keyset pages only from GitLab 18.3, merge
# requests, pipelines and deployments not at all.)
BY_UPDATE = (("order_by", "updated_at"), ("sort", "asc"))

STREAMS: tuple[Stream, ...] = (
    Stream("project", "projects", P, "projects/{id}", Version.UPDATED_AT, Paging.SINGLE),
    Stream("branches", "branches", f"{P}/repository/branches",
           "projects/{project_id}/repository/branches/{name}", Version.CONTENT, params=LIST),
    Stream("tags", "tags", f"{P}/repository/tags",
           "projects/{project_id}/repository/tags/{name}", Version.CONTENT, params=LIST),
    Stream("commits", "commits", f"{P}/repository/commits",
           "projects/{project_id}/repository/commits/{id}", Version.IMMUTABLE,
           params=(*LIST, ("all", "true"), ("with_stats", "true")), updated_filter="since"),
    Stream("labels", "labels", f"{P}/labels", "projects/{project_id}/labels/{id}",
           Version.CONTENT, params=LIST),
    Stream("milestones", "milestones", f"{P}/milestones",
           "projects/{project_id}/milestones/{id}", Version.UPDATED_AT, params=LIST,
           updated_filter="updated_after"),
    Stream("releases", "releases", f"{P}/releases", "projects/{project_id}/releases/{tag_name}",
           Version.CONTENT, params=LIST),
    Stream("merge_requests", "merge_requests", f"{P}/merge_requests",
           "projects/{project_id}/merge_requests/{iid}", Version.UPDATED_AT,
           Paging.UPDATED_CURSOR, params=(*LIST, ("state", "all"), *BY_UPDATE),
           updated_filter="updated_after"),
    Stream("merge_request_commits", "commits", f"{P}/merge_requests/{{parent_iid}}/commits",
           "projects/{project_id}/repository/commits/{id}", Version.IMMUTABLE, params=LIST,
           child_of=("merge_requests",)),
    Stream("members", "members", f"{P}/members/all",
           "projects/{project_id}/members/all/{id}", Version.CONTENT, params=LIST),
    Stream("issues", "issues", f"{P}/issues", "projects/{project_id}/issues/{iid}",
           Version.UPDATED_AT, Paging.UPDATED_CURSOR,
           params=(*LIST, ("scope", "all"), ("state", "all"), *BY_UPDATE),
           updated_filter="updated_after"),
    Stream("discussions", "discussions", f"{THING}/discussions",
           f"{THING}/discussions/{{id}}", Version.CONTENT, params=LIST,
           child_of=("issues", "merge_requests"), nested_notes=True),
    *(Stream(name, name, f"{THING}/{name}", f"{THING}/{name}/{{id}}", Version.IMMUTABLE,
             params=LIST, child_of=("issues", "merge_requests"))
      for name in ("resource_state_events", "resource_label_events",
                   "resource_milestone_events")),
    Stream("pipelines", "pipelines", f"{P}/pipelines", "projects/{project_id}/pipelines/{id}",
           Version.UPDATED_AT, Paging.UPDATED_CURSOR, params=(*LIST, *BY_UPDATE),
           updated_filter="updated_after"),
    Stream("jobs", "jobs", f"{P}/jobs", "projects/{project_id}/jobs/{id}", Version.CONTENT,
           Paging.KEYSET, params=(*LIST, ("pagination", "keyset"), ("order_by", "id"),
                                  ("sort", "desc"))),
    Stream("deployments", "deployments", f"{P}/deployments",
           "projects/{project_id}/deployments/{id}", Version.UPDATED_AT,
           Paging.UPDATED_CURSOR, params=(*LIST, *BY_UPDATE),
           updated_filter="updated_after"),
    Stream("protected_branches", "protected_branches", f"{P}/protected_branches",
           "projects/{project_id}/protected_branches/{name}", Version.CONTENT, params=LIST),
    Stream("group", "groups", "groups/{group}", "groups/{id}", Version.CONTENT, Paging.SINGLE),
    Stream("user", "users", "users/{user}", "users/{id}", Version.CONTENT, Paging.SINGLE),
)
BY_NAME: dict[str, Stream] = {s.name: s for s in STREAMS}
NOTES_KEY = f"{THING}/notes/{{id}}"  # notes arrive inside discussions

KINDS: tuple[str, ...] = ("groups", "projects", "users", "members", "labels", "milestones",
                          "releases", "protected_branches", "branches", "tags", "commits",
                          "issues", "merge_requests", "notes", "discussions",
                          "resource_state_events", "resource_label_events",
                          "resource_milestone_events", "pipelines", "jobs", "deployments")


def stream(name: str) -> Stream:
    """The stream called ``name`` (KeyError for an unknown one)."""
    return BY_NAME[name]
