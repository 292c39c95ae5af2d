"""Which projects an import covers: ``BACKFILL_PROJECTS`` (ids, full paths, group paths with
their subgroups) or, when empty, every project the token can read."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.errors import NotFoundError

LIST_ALL = {"pagination": "keyset", "order_by": "id", "sort": "asc", "simple": "true",
            "per_page": "100"}


class UnknownProject(Exception):
    """A BACKFILL_PROJECTS entry is neither a project nor a group the token can read."""


async def discover(client: GitLabClient, wanted: Iterable[str]) -> list[int]:
    """Project ids, ascending, without repeats."""
    names = list(wanted)
    found: set[int] = set()
    if not names:
        async for page in client.pages("projects", LIST_ALL, "projects", keyset=True):
            found.update(int(p["id"]) for p in page if isinstance(p, dict))
        return sorted(found)
    for name in names:
        if name.isdigit():
            found.add(int(name))
            continue
        try:
            answer = await client.get(f"projects/{quote(name, safe='')}", None, "project")
            found.add(int(answer.body["id"]))
            continue
        except NotFoundError:
            pass
        try:
            params = {"include_subgroups": "true", "simple": "true", "per_page": "100"}
            async for page in client.pages(f"groups/{quote(name, safe='')}/projects", params,
                                           "group_projects"):
                found.update(int(p["id"]) for p in page if isinstance(p, dict))
        except NotFoundError:
            raise UnknownProject(f"BACKFILL_PROJECTS: {name!r} is neither a project nor a "
                                 "group this token can read") from None
    return sorted(found)
