"""Object routes of issues and merge requests: lists with GitLab's filters, single objects,
notes, discussions, resource events, award emoji, merge request commits and approvals."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from gitlab_producer.simulator import objects_json as js
from gitlab_producer.simulator.objects import (
    ProjectObjects,
    Thing,
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

ISSUE_STATES = {"issue": ("opened", "closed", "all"),
                "merge_request": ("opened", "closed", "locked", "merged", "all")}


def _thing_filter(req: ObjRequest, kind: str, things: list[Thing]) -> list[Thing]:
    q = req.q()
    state = q.get("state", "all")
    if state not in ISSUE_STATES[kind]:
        raise bad("state does not have a valid value")
    scope = q.get("scope", "all")
    if scope not in ("all", "created_by_me", "assigned_to_me", "created-by-me",
                     "assigned-to-me"):
        raise bad("scope does not have a valid value")
    iids = {int(i) for i in req.query.getall("iids[]", []) if i.isdigit()}
    bounds = [time_param(q, k) for k in ("created_after", "created_before", "updated_after",
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
        if not (in_range(thing.created, bounds[0], bounds[1])
                and in_range(thing.updated, bounds[2], bounds[3])):
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
    po = project_of(req, f"{kind}s")
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
    rows = sorted_rows(rows, req.q(), keys, "created_at", "desc")
    details = req.q().get("with_labels_details", "false").lower() == "true"

    def render(thing: Thing) -> bytes:
        if details:
            return dump(js.thing_json(req.world, po, thing, label_details=True))
        return po.render((kind, thing.id), lambda: dump(js.thing_json(req.world, po, thing)))

    return page(req, rows, render)


def issues(req: ObjRequest) -> web.Response:
    return _things(req, "issue")


def merge_requests(req: ObjRequest) -> web.Response:
    return _things(req, "merge_request")


def _thing(req: ObjRequest, kind_segment: str | None = None) -> tuple[ProjectObjects, Thing]:
    kind = "issue" if (kind_segment or req.parts[1]) == "issues" else "merge_request"
    po = project_of(req, f"{kind}s")
    iid_text = req.parts[1] if kind_segment else req.parts[2]
    thing = po.things(kind).get(int(iid_text))
    if thing is None or thing.deleted:
        raise not_found("404 Not found")
    return po, thing


def issue(req: ObjRequest) -> web.Response:
    po, thing = _thing(req, "issues")
    return json_answer(js.thing_json(req.world, po, thing))


def merge_request(req: ObjRequest) -> web.Response:
    po, thing = _thing(req, "merge_requests")
    return json_answer(js.thing_json(req.world, po, thing, single=True))


def notes(req: ObjRequest) -> web.Response:
    po, thing = _thing(req)
    rows = sorted_rows(thing.live_notes(), req.q(), {"created_at": lambda n: (n.created, n.id),
                                                 "updated_at": lambda n: (n.updated, n.id)},
                   "created_at", "desc")
    return page(req, rows, lambda n: po.render(("note", n.id), lambda: dump(
        js.note_json(req.world, po, n))))


def note(req: ObjRequest) -> web.Response:
    po, thing = _thing(req)
    found = po.notes_by_id.get(int(req.parts[3]))
    if found is None or found.deleted or found.thing is not thing:
        raise not_found("404 Note Not Found")
    return json_answer(js.note_json(req.world, po, found))


def discussions(req: ObjRequest) -> web.Response:
    po, thing = _thing(req)
    seen: dict[str, None] = {}
    for n in thing.live_notes():
        seen.setdefault(n.discussion)
    return page(req, list(seen), lambda d: po.render(("discussion", d), lambda: dump(
        js.discussion_json(req.world, po, d))))


def discussion(req: ObjRequest) -> web.Response:
    po, thing = _thing(req)
    notes_of = po.discussions.get(req.parts[3], [])
    if not notes_of or notes_of[0].thing is not thing or all(n.deleted for n in notes_of):
        raise not_found("404 Not found")
    return json_answer(js.discussion_json(req.world, po, req.parts[3]))


def resource_events(req: ObjRequest) -> web.Response:
    po, thing = _thing(req)
    kind = req.parts[3]
    rows = getattr(thing, f"{kind}_events")
    if len(req.parts) > 4:
        found = next((e for e in rows if str(e.id) == req.parts[4]), None)
        if found is None:
            raise not_found("404 Not found")
        return json_answer(js.resource_event_json(req.world, po, thing, found, kind))
    return page(req, list(rows), lambda e: po.render((kind, e.id), lambda: dump(
        js.resource_event_json(req.world, po, thing, e, kind))))


def award_emoji(req: ObjRequest) -> web.Response:
    _, thing = _thing(req)
    indices = list(range(len(thing.awards)))
    if len(req.parts) > 3:
        found = next((i for i in indices if str(thing.awards[i].id) == req.parts[3]), None)
        if found is None:
            raise not_found("404 Award Emoji Not Found")
        return json_answer(js.award_json(req.world, thing, found))
    return page(req, indices, lambda i: dump(js.award_json(req.world, thing, i)))


def mr_commits(req: ObjRequest) -> web.Response:
    po, thing = _thing(req, "merge_requests")
    rows = list(reversed(thing.commits))
    return page(req, rows, lambda sha: dump(js.mr_commit_json(req.world, po, thing, sha)))


def mr_approvals(req: ObjRequest) -> web.Response:
    po, thing = _thing(req, "merge_requests")
    return json_answer(js.approvals_json(req.world, po, thing))


