"""What the object routes share: the request, GitLab's refusals (404, 403, 400), query
parsing, the project lookup with its switched-off features, sorting and offset pages."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping

from gitlab_producer.simulator.api import _project_id as project_id_of
from gitlab_producer.simulator.objects import (
    ProjectObjects,
    features_off,
)
from gitlab_producer.simulator.objects_store import ObjectWorld
from gitlab_producer.simulator.paging import offset_page
from gitlab_producer.simulator.world import World

JSON = "application/json"
FEATURE_OF = {"issues": "issues", "merge_requests": "merge_requests", "pipelines": "builds",
              "jobs": "builds", "deployments": "builds", "releases": "releases",
              "wikis": "wiki"}


@dataclass
class ObjRequest:
    """What an object route needs: both worlds, the captured raw segments, query and path."""

    world: World
    objects: ObjectWorld
    parts: Sequence[str]
    query: MultiMapping[str]
    base_url: str
    path: str

    def q(self) -> dict[str, str]:
        return {k: self.query[k] for k in self.query}


class Refusal(Exception):
    """Answer with this response instead (404, 403, 400)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def json_answer(data: object, status: int = 200) -> web.Response:
    """A JSON answer."""
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON)


def refuse(status: int, body: dict[str, Any]) -> Refusal:
    """A refusal to raise: GitLab's status and JSON body."""
    return Refusal(json_answer(body, status))


def not_found(what: str = "404 Not found") -> Refusal:
    """GitLab's 404 (``{"message": "404 ... Not Found"}``)."""
    return refuse(404, {"message": what})


def bad(error: str) -> Refusal:
    """GitLab's 400 for a parameter (``{"error": "... is invalid"}``)."""
    return refuse(400, {"error": error})


def time_param(q: dict[str, str], key: str) -> int | None:
    """An ISO 8601 parameter (any offset; none means UTC) in epoch ms, or None."""
    if key not in q:
        return None
    try:
        dt = datetime.fromisoformat(q[key].replace("Z", "+00:00"))
    except ValueError as exc:
        raise bad(f"{key} is invalid") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def pid_of(req: ObjRequest) -> int:
    """``:id``: a numeric id or the URL-encoded full path; 404 for a deleted project."""
    pid = project_id_of(req.world, req.parts[0])
    if pid is None:
        raise not_found("404 Project Not Found")
    return pid


def project_of(req: ObjRequest, feature: str | None = None) -> ProjectObjects:
    """The project's objects; 403 when ``feature`` is switched off in it."""
    pid = pid_of(req)
    spec = req.world.spec
    if feature and FEATURE_OF.get(feature, feature) in features_off(spec.seed, pid,
                                                                    spec.feature_off_share):
        raise refuse(403, {"message": "403 Forbidden"})
    return req.objects.get(pid)


def page(req: ObjRequest, rows: Sequence[Any], render: Callable[[Any], bytes]) -> web.Response:
    """One offset page of ``rows`` with GitLab's headers."""
    found = offset_page(len(rows), req.query, f"{req.base_url}/{req.path}")
    body = b"[" + b",".join(render(r) for r in rows[found.start:found.stop]) + b"]"
    return web.Response(body=body, content_type=JSON, headers=found.headers)


def dump(data: object) -> bytes:
    """JSON bytes to keep."""
    # orjson's result keeps its whole working buffer (8 KB for a note of 1 KB): the rendered
    # cache keeps a trimmed copy (as World.render does).
    return bytes(memoryview(orjson.dumps(data)))


def sorted_rows(rows: list[Any], q: dict[str, str], keys: dict[str, Callable[[Any], Any]],
                default_order: str, default_sort: str) -> list[Any]:
    """``rows`` in the ``order_by``/``sort`` asked for (400 for values GitLab refuses)."""
    order, sort = q.get("order_by", default_order), q.get("sort", default_sort)
    if order not in keys:
        raise bad("order_by does not have a valid value")
    if sort not in ("asc", "desc"):
        raise bad("sort does not have a valid value")
    return sorted(rows, key=keys[order], reverse=sort == "desc")


def in_range(value: int, lo: int | None, hi: int | None) -> bool:
    """GitLab's ``*_after``/``*_before`` time filters include their bounds."""
    return (lo is None or value >= lo) and (hi is None or value <= hi)
