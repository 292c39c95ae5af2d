"""GitLab REST v4 routes of the projects' objects (issues, merge requests, notes, discussions,
resource events, award emoji, pipelines, jobs, deployments, releases, repository data, groups,
uploads), routed like ``api.py`` on the raw, still URL-encoded path."""

from __future__ import annotations

import base64
import mimetypes
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web
from multidict import MultiMapping

from gitlab_producer.simulator import objects_json as js
from gitlab_producer.simulator.api import _project_id as project_id_of
from gitlab_producer.simulator.catalog import (
    GROUPS,
    group_of,
    group_parent,
    group_path,
    project_json,
)
from gitlab_producer.simulator.objects import (
    LABELS,
    ObjectWorld,
    Pipeline,
    ProjectObjects,
    Thing,
    features_off,
)
from gitlab_producer.simulator.paging import PagingError, keyset_headers, offset_page, per_page_of
from gitlab_producer.simulator.repository import BRANCHES
from gitlab_producer.simulator.world import World, iso_ms

JSON = "application/json"
FEATURE_OF = {"issues": "issues", "merge_requests": "merge_requests", "pipelines": "builds",
              "jobs": "builds", "deployments": "builds", "releases": "releases",
              "wikis": "wiki"}


@dataclass
class ObjRequest:
    world: World
    objects: ObjectWorld
    parts: Sequence[str]
    query: MultiMapping[str]
    base_url: str
    path: str

    def q(self) -> dict[str, str]:
        return {k: self.query[k] for k in self.query}


Handler = Callable[[ObjRequest], web.StreamResponse]


class Refusal(Exception):
    """Answer with this response instead (404, 403, 400)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON)


def _refuse(status: int, body: dict[str, Any]) -> Refusal:
    return Refusal(_json(body, status))


def _not_found(what: str = "404 Not found") -> Refusal:
    return _refuse(404, {"message": what})


def _bad(error: str) -> Refusal:
    return _refuse(400, {"error": error})


def _time(q: dict[str, str], key: str) -> int | None:
    if key not in q:
        return None
    try:
        dt = datetime.fromisoformat(q[key].replace("Z", "+00:00"))
    except ValueError as exc:
        raise _bad(f"{key} is invalid") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _pid(req: ObjRequest) -> int:
    """``:id``: a numeric id or the URL-encoded full path; 404 for a deleted project."""
    pid = project_id_of(req.world, req.parts[0])
    if pid is None:
        raise _not_found("404 Project Not Found")
    return pid


def _project(req: ObjRequest, feature: str | None = None) -> ProjectObjects:
    """The project's objects; 403 when ``feature`` is switched off in it."""
    pid = _pid(req)
    spec = req.world.spec
    if feature and FEATURE_OF.get(feature, feature) in features_off(spec.seed, pid,
                                                                    spec.feature_off_share):
        raise _refuse(403, {"message": "403 Forbidden"})
    return req.objects.get(pid)


def _page(req: ObjRequest, rows: Sequence[Any], render: Callable[[Any], bytes]) -> web.Response:
    page = offset_page(len(rows), req.q(), f"{req.base_url}/{req.path}")
    body = b"[" + b",".join(render(r) for r in rows[page.start:page.stop]) + b"]"
    return web.Response(body=body, content_type=JSON, headers=page.headers)


def _dump(data: object) -> bytes:
    # orjson's result keeps its whole working buffer (8 KB for a note of 1 KB): the rendered
    # cache keeps a trimmed copy (as World.render does).
    return bytes(memoryview(orjson.dumps(data)))


def _sorted(rows: list[Any], q: dict[str, str], keys: dict[str, Callable[[Any], Any]],
            default_order: str, default_sort: str) -> list[Any]:
    order, sort = q.get("order_by", default_order), q.get("sort", default_sort)
    if order not in keys:
        raise _bad("order_by does not have a valid value")
    if sort not in ("asc", "desc"):
        raise _bad("sort does not have a valid value")
    return sorted(rows, key=keys[order], reverse=sort == "desc")


def _in_range(value: int, lo: int | None, hi: int | None) -> bool:
    return (lo is None or value >= lo) and (hi is None or value <= hi)


# -- projects and groups --------------------------------------------------------------------
def project(req: ObjRequest) -> web.Response:
    return _json(js.project_full(req.world, _pid(req)))


def groups_list(req: ObjRequest) -> web.Response:
    return _page(req, list(range(1, GROUPS + 1)), lambda g: _dump(js.group_json(req.world, g)))


def _group_id(req: ObjRequest) -> int:
    text = unquote(req.parts[0])
    gid = int(text) if text.isdigit() else 0
    if not gid:
        match = re.fullmatch(r"(?:group\d+/)*group(\d+)", text)
        gid = int(match.group(1)) if match else 0
        if gid and group_path(gid)[0] != text:
            gid = 0
    if not 1 <= gid <= GROUPS:
        raise _not_found("404 Group Not Found")
    return gid


def group(req: ObjRequest) -> web.Response:
    return _json(js.group_json(req.world, _group_id(req)))


def group_projects(req: ObjRequest) -> web.Response:
    gid = _group_id(req)
    wanted = {gid}
    if req.q().get("include_subgroups", "false").lower() == "true":
        wanted |= {g for g in range(1, GROUPS + 1) if group_parent(g) == gid}
    world = req.world
    rows = [p for p in range(1, world.project_count + 1)
            if group_of(p) in wanted and p not in world.deleted_projects]
    rows = _sorted(rows, req.q(), {
        "id": lambda p: p, "name": lambda p: (f"project-{p}", p),
        "path": lambda p: (f"project-{p}", p),
        "created_at": lambda p: (world.project_created_ms[p - 1], p),
        "updated_at": lambda p: (world.project_last_activity_ms[p - 1], p),
        "last_activity_at": lambda p: (world.project_last_activity_ms[p - 1], p)},
        "created_at", "desc")
    simple = req.q().get("simple", "false").lower() == "true"
    return _page(req, rows, lambda p: _dump(project_json(
        p, iso_ms(world.project_created_ms[p - 1]), iso_ms(world.project_last_activity_ms[p - 1]),
        world.spec.host, simple)))


# -- labels, milestones, releases, branches, tags, commits ----------------------------------
def labels(req: ObjRequest) -> web.Response:
    po = _project(req)
    counts = req.q().get("with_counts", "false").lower() == "true"
    names = [n for n, _ in LABELS]
    return _page(req, names, lambda n: _dump(js.label_counts(po, n) if counts
                                             else js.label_json(po, n)))


def label(req: ObjRequest) -> web.Response:
    po = _project(req)
    key = unquote(req.parts[1])
    for name, _ in LABELS:
        data = js.label_counts(po, name)
        if key in (name, str(data["id"])):
            return _json(data)
    raise _not_found("404 Label Not Found")


def milestones(req: ObjRequest) -> web.Response:
    po = _project(req)
    q = req.q()
    iids = {int(i) for i in req.query.getall("iids[]", []) if i.isdigit()}
    state = q.get("state")
    rows = [m[1] for m in po.milestones if (not iids or m[1] in iids)
            and state in (None, "active")]
    rows.reverse()
    return _page(req, rows, lambda iid: _dump(js.milestone_json(req.world, po, iid)))


def milestone(req: ObjRequest) -> web.Response:
    po = _project(req)
    found = next((m for m in po.milestones if str(m[0]) == req.parts[1]), None)
    if found is None:
        raise _not_found("404 Milestone Not Found")
    return _json(js.milestone_json(req.world, po, found[1]))


def releases(req: ObjRequest) -> web.Response:
    po = _project(req, "releases")
    rows = _sorted(list(po.releases), req.q(), {"released_at": lambda r: r.created,
                                                "created_at": lambda r: r.created},
                   "released_at", "desc")
    return _page(req, rows, lambda r: _dump(js.release_json(req.world, po, r)))


def release(req: ObjRequest) -> web.Response:
    po = _project(req, "releases")
    tag = unquote(req.parts[1])
    found = next((r for r in po.releases if r.tag == tag), None)
    if found is None:
        raise _not_found("404 Not Found")
    return _json(js.release_json(req.world, po, found))


def protected_branches(req: ObjRequest) -> web.Response:
    po = _project(req)
    return _page(req, [po], lambda p: _dump(js.protected_branch_json(p)))


def protected_branch(req: ObjRequest) -> web.Response:
    po = _project(req)
    if unquote(req.parts[1]) != BRANCHES[0]:
        raise _not_found("404 Not found")
    return _json(js.protected_branch_json(po))


def branches(req: ObjRequest) -> web.Response:
    po = _project(req)
    return _page(req, list(BRANCHES), lambda b: _dump(js.branch_json(req.world, po, b)))


def branch(req: ObjRequest) -> web.Response:
    po = _project(req)
    name = unquote(req.parts[1])
    if name not in BRANCHES:
        raise _not_found("404 Branch Not Found")
    return _json(js.branch_json(req.world, po, name))


def tags(req: ObjRequest) -> web.Response:
    po = _project(req)
    rows = sorted(po.releases, key=lambda r: r.created, reverse=True)
    return _page(req, rows, lambda r: _dump(js.tag_json(req.world, po, r)))


def tag(req: ObjRequest) -> web.Response:
    po = _project(req)
    name = unquote(req.parts[1])
    found = next((r for r in po.releases if r.tag == name), None)
    if found is None:
        raise _not_found("404 Tag Not Found")
    return _json(js.tag_json(req.world, po, found))


def commits(req: ObjRequest) -> web.Response:
    po = _project(req)
    q = req.q()
    if q.get("order", "default") not in ("default", "topo"):
        raise _bad("order does not have a valid value")
    if q.get("all", "false").lower() == "true":
        rows = list(po.commits)
    else:
        ref = unquote(q.get("ref_name", "main"))
        by_id = {c.id: c for c in po.commits}
        if ref in BRANCHES:
            rows = js.history(po, ref)
        elif ref in by_id:
            rows = js.history(po, "main", ref)
        elif any(r.tag == ref for r in po.releases):
            rows = js.history(po, "main", next(r.commit for r in po.releases if r.tag == ref))
        else:
            raise _not_found("404 Commit Not Found")
    since, until = _time(q, "since"), _time(q, "until")
    rows = [c for c in rows if _in_range(c.created, since, until)]
    rows.sort(key=lambda c: c.created, reverse=True)  # default and topo agree: history is linear
    stats = q.get("with_stats", "false").lower() == "true"
    return _page(req, rows, lambda c: _dump(js.commit_json(req.world, po, c, stats)))


def commit(req: ObjRequest) -> web.Response:
    po = _project(req)
    sha = unquote(req.parts[1])
    found = next((c for c in po.commits if c.id == sha or (sha in BRANCHES
                  and c.id == js.latest_commit(po, sha).id)), None)
    if found is None:
        raise _not_found("404 Commit Not Found")
    return _json(js.commit_json(req.world, po, found, stats=True))


# -- issues and merge requests --------------------------------------------------------------
ISSUE_STATES = {"issue": ("opened", "closed", "all"),
                "merge_request": ("opened", "closed", "locked", "merged", "all")}


def _thing_filter(req: ObjRequest, kind: str, things: list[Thing]) -> list[Thing]:
    q = req.q()
    state = q.get("state", "all")
    if state not in ISSUE_STATES[kind]:
        raise _bad("state does not have a valid value")
    scope = q.get("scope", "all")
    if scope not in ("all", "created_by_me", "assigned_to_me", "created-by-me",
                     "assigned-to-me"):
        raise _bad("scope does not have a valid value")
    iids = {int(i) for i in req.query.getall("iids[]", []) if i.isdigit()}
    bounds = [_time(q, k) for k in ("created_after", "created_before", "updated_after",
                                    "updated_before")]
    wanted_labels = [x for x in q.get("labels", "").split(",") if x]
    author = int(q["author_id"]) if q.get("author_id", "").isdigit() else None
    milestone_title = q.get("milestone")
    rows = []
    for thing in things:
        if thing.deleted or (state != "all" and thing.state != state):
            continue
        if iids and thing.iid not in iids:
            continue
        if scope.startswith("created") and thing.author != 1:
            continue
        if scope.startswith("assigned") and thing.assignee != 1:
            continue
        if not (_in_range(thing.created, bounds[0], bounds[1])
                and _in_range(thing.updated, bounds[2], bounds[3])):
            continue
        if author is not None and thing.author != author:
            continue
        if wanted_labels == ["None"] and thing.labels:
            continue
        if wanted_labels and wanted_labels != ["None"] and wanted_labels != ["Any"] and not all(
                x in thing.labels for x in wanted_labels):
            continue
        if milestone_title and (thing.milestone is None
                                or f"Milestone {thing.milestone}" != milestone_title):
            continue
        rows.append(thing)
    return rows


def _things(req: ObjRequest, kind: str) -> web.Response:
    po = _project(req, f"{kind}s")
    rows = _thing_filter(req, kind, list(po.things(kind).values()))
    keys: dict[str, Callable[[Thing], Any]] = {
        "created_at": lambda t: (t.created, t.id), "updated_at": lambda t: (t.updated, t.id),
        "title": lambda t: (t.title, t.id)}
    if kind == "merge_request":
        keys["merged_at"] = lambda t: (t.merged_at or 0, t.id)
    else:
        keys.update({"priority": keys["created_at"], "label_priority": keys["created_at"],
                     "due_date": keys["created_at"], "relative_position": keys["created_at"],
                     "popularity": lambda t: (len(t.awards), t.id)})
    rows = _sorted(rows, req.q(), keys, "created_at", "desc")
    details = req.q().get("with_labels_details", "false").lower() == "true"

    def render(thing: Thing) -> bytes:
        if details:
            return _dump(js.thing_json(req.world, po, thing, label_details=True))
        return po.render((kind, thing.id), lambda: _dump(js.thing_json(req.world, po, thing)))

    return _page(req, rows, render)


def issues(req: ObjRequest) -> web.Response:
    return _things(req, "issue")


def merge_requests(req: ObjRequest) -> web.Response:
    return _things(req, "merge_request")


def _thing(req: ObjRequest, kind_segment: str | None = None) -> tuple[ProjectObjects, Thing]:
    kind = "issue" if (kind_segment or req.parts[1]) == "issues" else "merge_request"
    po = _project(req, f"{kind}s")
    iid_text = req.parts[1] if kind_segment else req.parts[2]
    thing = po.things(kind).get(int(iid_text))
    if thing is None or thing.deleted:
        raise _not_found("404 Not found")
    return po, thing


def issue(req: ObjRequest) -> web.Response:
    po, thing = _thing(req, "issues")
    return _json(js.thing_json(req.world, po, thing))


def merge_request(req: ObjRequest) -> web.Response:
    po, thing = _thing(req, "merge_requests")
    return _json(js.thing_json(req.world, po, thing, single=True))


def notes(req: ObjRequest) -> web.Response:
    po, thing = _thing(req)
    rows = _sorted(thing.live_notes(), req.q(), {"created_at": lambda n: (n.created, n.id),
                                                 "updated_at": lambda n: (n.updated, n.id)},
                   "created_at", "desc")
    return _page(req, rows, lambda n: po.render(("note", n.id), lambda: _dump(
        js.note_json(req.world, po, n))))


def note(req: ObjRequest) -> web.Response:
    po, thing = _thing(req)
    found = po.notes_by_id.get(int(req.parts[3]))
    if found is None or found.deleted or found.thing is not thing:
        raise _not_found("404 Note Not Found")
    return _json(js.note_json(req.world, po, found))


def discussions(req: ObjRequest) -> web.Response:
    po, thing = _thing(req)
    seen: dict[str, None] = {}
    for n in thing.live_notes():
        seen.setdefault(n.discussion)
    return _page(req, list(seen), lambda d: po.render(("discussion", d), lambda: _dump(
        js.discussion_json(req.world, po, d))))


def discussion(req: ObjRequest) -> web.Response:
    po, thing = _thing(req)
    notes_of = po.discussions.get(req.parts[3], [])
    if not notes_of or notes_of[0].thing is not thing or all(n.deleted for n in notes_of):
        raise _not_found("404 Not found")
    return _json(js.discussion_json(req.world, po, req.parts[3]))


def resource_events(req: ObjRequest) -> web.Response:
    po, thing = _thing(req)
    kind = req.parts[3]
    rows = getattr(thing, f"{kind}_events")
    if len(req.parts) > 4:
        found = next((e for e in rows if str(e.id) == req.parts[4]), None)
        if found is None:
            raise _not_found("404 Not found")
        return _json(js.resource_event_json(req.world, po, thing, found, kind))
    return _page(req, list(rows), lambda e: po.render((kind, e.id), lambda: _dump(
        js.resource_event_json(req.world, po, thing, e, kind))))


def award_emoji(req: ObjRequest) -> web.Response:
    _, thing = _thing(req)
    indices = list(range(len(thing.awards)))
    if len(req.parts) > 3:
        found = next((i for i in indices if str(thing.awards[i].id) == req.parts[3]), None)
        if found is None:
            raise _not_found("404 Award Emoji Not Found")
        return _json(js.award_json(req.world, thing, found))
    return _page(req, indices, lambda i: _dump(js.award_json(req.world, thing, i)))


def mr_commits(req: ObjRequest) -> web.Response:
    po, thing = _thing(req, "merge_requests")
    rows = list(reversed(thing.commits))
    return _page(req, rows, lambda sha: _dump(js.mr_commit_json(req.world, po, thing, sha)))


def mr_approvals(req: ObjRequest) -> web.Response:
    po, thing = _thing(req, "merge_requests")
    return _json(js.approvals_json(req.world, po, thing))


# -- CI ------------------------------------------------------------------------------------
PIPELINE_SCOPES = {"running": ("running",), "pending": ("pending",),
                   "finished": ("success", "failed", "canceled", "skipped"),
                   "branches": None, "tags": ()}


def pipelines(req: ObjRequest) -> web.Response:
    po = _project(req, "pipelines")
    q = req.q()
    lo, hi = _time(q, "updated_after"), _time(q, "updated_before")
    scope = q.get("scope")
    if scope is not None and scope not in PIPELINE_SCOPES:
        raise _bad("scope does not have a valid value")
    statuses = PIPELINE_SCOPES.get(scope or "branches")
    rows = [p for p in po.pipelines if not p.deleted and _in_range(p.updated, lo, hi)
            and (statuses is None or p.status in statuses)
            and q.get("status", p.status) == p.status and q.get("ref", p.ref) == p.ref
            and q.get("sha", p.sha) == p.sha]
    rows = _sorted(rows, q, {"id": lambda p: p.id, "status": lambda p: (p.status, p.id),
                             "ref": lambda p: (p.ref, p.id), "user_id": lambda p: (p.user, p.id),
                             "updated_at": lambda p: (p.updated, p.id)}, "id", "desc")
    return _page(req, rows, lambda p: po.render(("pipeline", p.id), lambda: _dump(
        js.pipeline_json(req.world, po, p))))


def _pipeline(req: ObjRequest) -> tuple[ProjectObjects, Pipeline]:
    po = _project(req, "pipelines")
    found = next((p for p in po.pipelines if str(p.id) == req.parts[1] and not p.deleted), None)
    if found is None:
        raise _not_found("404 Not found")
    return po, found


def pipeline(req: ObjRequest) -> web.Response:
    po, pipe = _pipeline(req)
    return _json(js.pipeline_json(req.world, po, pipe, single=True))


def _job_scope(req: ObjRequest) -> set[str] | None:
    wanted = set(req.query.getall("scope[]", [])) | set(req.query.getall("scope", []))
    return wanted or None


def pipeline_jobs(req: ObjRequest) -> web.Response:
    po, pipe = _pipeline(req)
    wanted = _job_scope(req)
    rows = [j for j in pipe.jobs if wanted is None or j.status in wanted]
    return _page(req, rows, lambda j: po.render(("job", j.id), lambda: _dump(
        js.job_json(req.world, po, pipe, j))))


def jobs(req: ObjRequest) -> web.Response:
    """Offset pagination, or keyset (``pagination=keyset``, ``order_by=id``, ``sort=desc``)."""
    po = _project(req, "jobs")
    q = req.q()
    wanted = _job_scope(req)
    rows = sorted(((p, j) for p in po.pipelines if not p.deleted for j in p.jobs
                   if wanted is None or j.status in wanted), key=lambda pj: pj[1].id,
                  reverse=True)
    def render(pj: tuple[Pipeline, Any]) -> bytes:
        return po.render(("job", pj[1].id), lambda: _dump(js.job_json(req.world, po, *pj)))

    if q.get("pagination") != "keyset":
        return _page(req, rows, render)
    if q.get("order_by", "id") != "id" or q.get("sort", "desc") != "desc":
        raise _refuse(405, {"error": "Keyset pagination is not yet available for this type "
                            "of request"})
    per_page = per_page_of(q)
    if "cursor" in q:
        try:
            last = int(orjson.loads(base64.urlsafe_b64decode(q["cursor"]))["id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise _bad("cursor is invalid") from exc
        rows = [pj for pj in rows if pj[1].id < last]
    chunk = rows[:per_page]
    cursor = (base64.urlsafe_b64encode(orjson.dumps({"id": chunk[-1][1].id})).decode()
              if chunk else "")
    headers = keyset_headers(chunk, per_page, f"{req.base_url}/{req.path}", q, cursor=cursor)
    body = b"[" + b",".join(render(pj) for pj in chunk) + b"]"
    return web.Response(body=body, content_type=JSON, headers=headers)


def job(req: ObjRequest) -> web.Response:
    po = _project(req, "jobs")
    job_id = int(req.parts[1])
    pipe = po.pipeline_of(job_id)
    found = next((j for j in pipe.jobs if j.id == job_id), None) if pipe else None
    if pipe is None or found is None:
        raise _not_found("404 Not found")
    return _json(js.job_json(req.world, po, pipe, found))


def deployments(req: ObjRequest) -> web.Response:
    po = _project(req, "deployments")
    q = req.q()
    lo, hi = _time(q, "updated_after"), _time(q, "updated_before")
    if (lo is not None or hi is not None) and q.get("order_by") != "updated_at":
        raise _refuse(400, {"message": "400 Bad request - `updated_at` filter and "
                            "`updated_at` sorting must be paired"})
    rows = [d for d in po.deployments if not d.pipeline.deleted
            and _in_range(d.updated, lo, hi) and q.get("status", d.status) == d.status
            and q.get("environment", "production") == "production"]
    rows = _sorted(rows, q, {"id": lambda d: d.id, "iid": lambda d: d.iid,
                             "created_at": lambda d: (d.created, d.id),
                             "updated_at": lambda d: (d.updated, d.id),
                             "finished_at": lambda d: (d.job.finished or 0, d.id),
                             "ref": lambda d: (d.pipeline.ref, d.id)}, "id", "asc")
    return _page(req, rows, lambda d: po.render(("deployment", d.id), lambda: _dump(
        js.deployment_json(req.world, po, d))))


def deployment(req: ObjRequest) -> web.Response:
    po = _project(req, "deployments")
    found = next((d for d in po.deployments if str(d.id) == req.parts[1]
                  and not d.pipeline.deleted), None)
    if found is None:
        raise _not_found("404 Not found")
    return _json(js.deployment_json(req.world, po, found))


def wikis(req: ObjRequest) -> web.Response:
    _project(req, "wikis")
    pages = [{"format": "markdown", "slug": slug, "title": slug, "encoding": "UTF-8"}
             for slug in ("home", "setup")]
    return _page(req, pages, _dump)


def upload(req: ObjRequest) -> web.Response:
    po = _project(req)
    found = po.uploads.get(req.parts[1])
    if found is None or found.filename != unquote(req.parts[2]):
        raise _not_found("404 Not found")
    kind = mimetypes.guess_type(found.filename)[0] or "application/octet-stream"
    return web.Response(body=found.content, content_type=kind, headers={
        "Content-Disposition": f"attachment; filename*=UTF-8''{req.parts[2]}"})


SEG = r"([^/]+)"
P = rf"projects/{SEG}"
THING = rf"{P}/(issues|merge_requests)/(\d+)"
ROUTES: tuple[tuple[str, re.Pattern[str], Handler], ...] = tuple(
    (name, re.compile(pattern), handler) for name, pattern, handler in (
        ("project", P, project),
        ("groups", r"groups", groups_list),
        ("group", rf"groups/{SEG}", group),
        ("group_projects", rf"groups/{SEG}/projects", group_projects),
        ("labels", rf"{P}/labels", labels),
        ("label", rf"{P}/labels/{SEG}", label),
        ("milestones", rf"{P}/milestones", milestones),
        ("milestone", rf"{P}/milestones/(\d+)", milestone),
        ("releases", rf"{P}/releases", releases),
        ("release", rf"{P}/releases/{SEG}", release),
        ("protected_branches", rf"{P}/protected_branches", protected_branches),
        ("protected_branch", rf"{P}/protected_branches/{SEG}", protected_branch),
        ("branches", rf"{P}/repository/branches", branches),
        ("branch", rf"{P}/repository/branches/{SEG}", branch),
        ("tags", rf"{P}/repository/tags", tags),
        ("tag", rf"{P}/repository/tags/{SEG}", tag),
        ("commits", rf"{P}/repository/commits", commits),
        ("commit", rf"{P}/repository/commits/{SEG}", commit),
        ("issues", rf"{P}/issues", issues),
        ("issue", rf"{P}/issues/(\d+)", issue),
        ("merge_requests", rf"{P}/merge_requests", merge_requests),
        ("merge_request", rf"{P}/merge_requests/(\d+)", merge_request),
        ("notes", rf"{THING}/notes", notes),
        ("note", rf"{THING}/notes/(\d+)", note),
        ("discussions", rf"{THING}/discussions", discussions),
        ("discussion", rf"{THING}/discussions/([0-9a-f]+)", discussion),
        ("resource_events", rf"{THING}/resource_(state|label|milestone)_events(?:/(\d+))?",
         resource_events),
        ("award_emoji", rf"{THING}/award_emoji(?:/(\d+))?", award_emoji),
        ("mr_commits", rf"{P}/merge_requests/(\d+)/commits", mr_commits),
        ("mr_approvals", rf"{P}/merge_requests/(\d+)/approvals", mr_approvals),
        ("pipelines", rf"{P}/pipelines", pipelines),
        ("pipeline", rf"{P}/pipelines/(\d+)", pipeline),
        ("pipeline_jobs", rf"{P}/pipelines/(\d+)/jobs", pipeline_jobs),
        ("jobs", rf"{P}/jobs", jobs),
        ("job", rf"{P}/jobs/(\d+)", job),
        ("deployments", rf"{P}/deployments", deployments),
        ("deployment", rf"{P}/deployments/(\d+)", deployment),
        ("wikis", rf"{P}/wikis", wikis),
        ("uploads", rf"{P}/uploads/([0-9a-f]{{32}})/{SEG}", upload),
    )
)


def route(raw_path: str) -> tuple[str, Handler, list[str]] | None:
    """Match a raw path below ``/api/v4/`` to (route name, handler, captured raw segments)."""
    for name, pattern, handler in ROUTES:
        match = pattern.fullmatch(raw_path)
        if match:
            return name, handler, [g for g in match.groups() if g is not None]
    return None


def handle(world: World, objects: ObjectWorld, raw_path: str, query: MultiMapping[str],
           base_url: str) -> tuple[str, web.StreamResponse] | None:
    """Answer one authenticated API request when it is an object route, else None."""
    found = route(raw_path)
    if found is None:
        return None
    name, handler, parts = found
    try:
        return name, handler(ObjRequest(world, objects, parts, query, base_url, raw_path))
    except Refusal as exc:
        return name, exc.response
    except PagingError as exc:
        return name, _json(exc.body, exc.status)
