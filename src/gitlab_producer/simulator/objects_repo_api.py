"""Object routes of a project's setup and repository: the project itself, groups, labels,
milestones, releases, protected branches, branches, tags, commits, wikis and uploads."""

from __future__ import annotations

import mimetypes
import re
from urllib.parse import unquote

from aiohttp import web

from gitlab_producer.simulator import objects_json as js
from gitlab_producer.simulator.catalog import (
    GROUPS,
    group_of,
    group_parent,
    group_path,
    project_json,
)
from gitlab_producer.simulator.objects import (
    LABELS,
)
from gitlab_producer.simulator.objects_web import (
    ObjRequest,
    bad,
    dump,
    in_range,
    json_answer,
    not_found,
    page,
    project_of,
    sorted_rows,
    time_param,
)
from gitlab_producer.simulator.repository import BRANCHES
from gitlab_producer.simulator.world import iso_ms


def project(req: ObjRequest) -> web.Response:
    return json_answer(js.project_full(req.world, project_of(req)))


def groups_list(req: ObjRequest) -> web.Response:
    return page(req, list(range(1, GROUPS + 1)), lambda g: dump(js.group_json(req.world, g)))


def _group_id(req: ObjRequest) -> int:
    text = unquote(req.parts[0])
    gid = int(text) if text.isdigit() else 0
    if not gid:
        match = re.fullmatch(r"(?:group\d+/)*group(\d+)", text)
        gid = int(match.group(1)) if match else 0
        if gid and group_path(gid)[0] != text:
            gid = 0
    if not 1 <= gid <= GROUPS:
        raise not_found("404 Group Not Found")
    return gid


def group(req: ObjRequest) -> web.Response:
    return json_answer(js.group_json(req.world, _group_id(req)))


def group_projects(req: ObjRequest) -> web.Response:
    gid = _group_id(req)
    wanted = {gid}
    if req.q().get("include_subgroups", "false").lower() == "true":
        wanted |= {g for g in range(1, GROUPS + 1) if group_parent(g) == gid}
    world = req.world
    rows = [p for p in range(1, world.project_count + 1)
            if group_of(p) in wanted and p not in world.deleted_projects]
    rows = sorted_rows(rows, req.q(), {
        "id": lambda p: p, "name": lambda p: (f"project-{p}", p),
        "path": lambda p: (f"project-{p}", p),
        "created_at": lambda p: (world.project_created_ms[p - 1], p),
        "updated_at": lambda p: (world.project_last_activity_ms[p - 1], p),
        "last_activity_at": lambda p: (world.project_last_activity_ms[p - 1], p)},
        "created_at", "desc")
    simple = req.q().get("simple", "false").lower() == "true"
    return page(req, rows, lambda p: dump(project_json(
        p, iso_ms(world.project_created_ms[p - 1]), iso_ms(world.project_last_activity_ms[p - 1]),
        world.spec.host, simple)))


# -- labels, milestones, releases, branches, tags, commits ----------------------------------
def labels(req: ObjRequest) -> web.Response:
    po = project_of(req)
    counts = req.q().get("with_counts", "false").lower() == "true"
    names = sorted(n for n, _ in LABELS)  # by title
    return page(req, names, lambda n: dump(js.label_counts(po, n) if counts
                                             else js.label_json(po, n)))


def label(req: ObjRequest) -> web.Response:
    po = project_of(req)
    key = unquote(req.parts[1])
    for name, _ in LABELS:
        data = js.label_counts(po, name)
        if key in (name, str(data["id"])):
            return json_answer(data)
    raise not_found("404 Label Not Found")


def milestones(req: ObjRequest) -> web.Response:
    po = project_of(req)
    q = req.q()
    iids = {int(i) for i in req.query.getall("iids[]", []) if i.isdigit()}
    state = q.get("state")
    # updated_after / updated_before (GitLab 15.10+; a milestone's updated_at is its creation
    # here: milestones do not change).
    after, before = time_param(q, "updated_after"), time_param(q, "updated_before")
    rows = [m[1] for m in po.milestones if (not iids or m[1] in iids)
            and state in (None, "active") and in_range(m[3], after, before)]
    rows.reverse()
    return page(req, rows, lambda iid: dump(js.milestone_json(req.world, po, iid)))


def milestone(req: ObjRequest) -> web.Response:
    po = project_of(req)
    found = next((m for m in po.milestones if str(m[0]) == req.parts[1]), None)
    if found is None:
        raise not_found("404 Milestone Not Found")
    return json_answer(js.milestone_json(req.world, po, found[1]))


def releases(req: ObjRequest) -> web.Response:
    po = project_of(req, "releases")
    rows = sorted_rows(list(po.releases), req.q(), {"released_at": lambda r: r.created,
                                                "created_at": lambda r: r.created},
                   "released_at", "desc")
    return page(req, rows, lambda r: dump(js.release_json(req.world, po, r)))


def release(req: ObjRequest) -> web.Response:
    po = project_of(req, "releases")
    tag = unquote(req.parts[1])
    found = next((r for r in po.releases if r.tag == tag), None)
    if found is None:
        raise not_found("404 Not Found")
    return json_answer(js.release_json(req.world, po, found))


def protected_branches(req: ObjRequest) -> web.Response:
    po = project_of(req)
    return page(req, [po], lambda p: dump(js.protected_branch_json(p)))


def protected_branch(req: ObjRequest) -> web.Response:
    po = project_of(req)
    if unquote(req.parts[1]) != BRANCHES[0]:
        raise not_found("404 Not found")
    return json_answer(js.protected_branch_json(po))


def branches(req: ObjRequest) -> web.Response:
    po = project_of(req)
    return page(req, list(BRANCHES), lambda b: dump(js.branch_json(req.world, po, b)))


def branch(req: ObjRequest) -> web.Response:
    po = project_of(req)
    name = unquote(req.parts[1])
    if name not in BRANCHES:
        raise not_found("404 Branch Not Found")
    return json_answer(js.branch_json(req.world, po, name))


def tags(req: ObjRequest) -> web.Response:
    po = project_of(req)
    rows = sorted(po.releases, key=lambda r: r.created, reverse=True)
    return page(req, rows, lambda r: dump(js.tag_json(req.world, po, r)))


def tag(req: ObjRequest) -> web.Response:
    po = project_of(req)
    name = unquote(req.parts[1])
    found = next((r for r in po.releases if r.tag == name), None)
    if found is None:
        raise not_found("404 Tag Not Found")
    return json_answer(js.tag_json(req.world, po, found))


def commits(req: ObjRequest) -> web.Response:
    po = project_of(req)
    q = req.q()
    if q.get("order", "default") not in ("default", "topo"):
        raise bad("order does not have a valid value")
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
            raise not_found("404 Commit Not Found")
    since, until = time_param(q, "since"), time_param(q, "until")
    rows = [c for c in rows if in_range(c.created, since, until)]
    rows.sort(key=lambda c: c.created, reverse=True)  # default and topo agree: history is linear
    stats = q.get("with_stats", "false").lower() == "true"
    return page(req, rows, lambda c: dump(js.commit_json(req.world, po, c, stats)))


def commit(req: ObjRequest) -> web.Response:
    po = project_of(req)
    sha = unquote(req.parts[1])
    found = next((c for c in po.commits if c.id == sha or (sha in BRANCHES
                  and c.id == js.latest_commit(po, sha).id)), None)
    if found is None:
        raise not_found("404 Commit Not Found")
    # The single commit is GitLab's CommitDetail: the list's fields plus project_id and stats.
    return json_answer({**js.commit_json(req.world, po, found, stats=True),
                        "project_id": po.pid})


def commit_refs(req: ObjRequest) -> web.Response:
    """``/repository/commits/:sha/refs?type=branch``: the branches whose history holds it."""
    po = project_of(req)
    sha = unquote(req.parts[1])
    if not any(c.id == sha for c in po.commits):
        raise not_found("404 Commit Not Found")
    found = [b for b in BRANCHES if any(c.id == sha for c in js.history(po, b))]
    return page(req, found, lambda b: dump({"type": "branch", "name": b}))


def wikis(req: ObjRequest) -> web.Response:
    project_of(req, "wikis")
    pages = [{"format": "markdown", "slug": slug, "title": slug, "encoding": "UTF-8"}
             for slug in ("home", "setup")]
    return page(req, pages, dump)


def upload(req: ObjRequest) -> web.Response:
    po = project_of(req)
    found = po.uploads.get(req.parts[1])
    if found is None or found.filename != unquote(req.parts[2]):
        raise not_found("404 Not found")
    kind = mimetypes.guess_type(found.filename)[0] or "application/octet-stream"
    return web.Response(body=found.content, content_type=kind, headers={
        "Content-Disposition": f"attachment; filename*=UTF-8''{req.parts[2]}"})


