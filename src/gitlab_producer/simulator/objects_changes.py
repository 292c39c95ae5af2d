"""Changes to the simulated objects, as a real instance sees them over time (the inspection
switch ``POST /_simulator/changes`` and live mode's ``change_rate``), and the objects' ground
truth (``GET /_simulator/objects``).

Each change bumps the object's ``updated_at``. Notes, state changes and pushes are also events
(``World.add_object_event``), which move the project's ``last_activity_at`` by the hourly rule;
edits, label changes, pipelines and deletions are not.
"""

from __future__ import annotations

import random
import time
from typing import Any

from gitlab_producer.simulator import targets as tg
from gitlab_producer.simulator.catalog import sha_for
from gitlab_producer.simulator.objects import (
    LABELS,
    Commit,
    ProjectObjects,
    ResourceEvent,
    Thing,
    add_note,
    deployments_of,
    diff_position,
    features_off,
    finish_pipeline,
    new_pipeline,
    set_state,
)
from gitlab_producer.simulator.objects_store import ObjectWorld

TYPE_NAMES = {"issue": "Issue", "merge_request": "MergeRequest"}
RANDOM_KINDS: tuple[tuple[str, int], ...] = (
    ("add_note", 30), ("edit_issue", 10), ("close_issue", 6), ("reopen_issue", 3),
    ("add_label", 8), ("remove_label", 4), ("edit_mr", 6), ("merge_mr", 4),
    ("add_thread", 6), ("run_pipeline", 8), ("finish_pipelines", 6), ("push", 6),
    ("delete_note", 1), ("delete_issue", 1))


class ChangeError(ValueError):
    """A change that cannot be made (unknown kind, no such object)."""


class Changer:
    """Applies changes to an ``ObjectWorld`` and records them in the world's events."""

    def __init__(self, objects: ObjectWorld, seed: int = 1) -> None:
        self.objects = objects
        self.world = objects.world
        self.rng = random.Random(seed ^ 0xC4A17E)
        self.note_serial = 0

    # -- helpers ----------------------------------------------------------------------------
    def _now_after(self, ms: int) -> int:
        return max(int(time.time() * 1000), ms + 1)

    def _thing(self, po: ProjectObjects, kind: str, body: dict[str, Any],
               state: str | None = None) -> Thing:
        things = [t for t in po.things(kind).values() if not t.deleted
                  and (state is None or t.state == state)]
        if "iid" in body:
            found = po.things(kind).get(int(body["iid"]))
            if found is None or found.deleted:
                raise ChangeError(f"no {kind} {body['iid']} in project {po.pid}")
            return found
        if not things:
            raise ChangeError(f"no {kind} in state {state} in project {po.pid}")
        return self.rng.choice(things)

    def _event(self, po: ProjectObjects, author: int, action: str, target_type: str | None,
               target: tg.Target | None, detail: str | None = None) -> tuple[int, int]:
        return self.world.add_object_event(po.pid, author, action, target_type, target, detail)

    def _user(self, body: dict[str, Any]) -> int:
        return int(body.get("author_id") or 1 + self.rng.randrange(self.world.user_count))

    # -- changes ----------------------------------------------------------------------------
    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """Make one change; ``kind`` names it, ``project_id`` (default: a random project) and
        ``iid`` / ``note_id`` / ``label`` pick what it changes. Returns what changed."""
        kind = str(body.get("kind", ""))
        handler = getattr(self, f"_{kind}", None)
        if not kind or handler is None:
            raise ChangeError(f"unknown change kind {kind!r}")
        pid = int(body.get("project_id") or 1 + self.rng.randrange(self.world.project_count))
        if not 1 <= pid <= self.world.project_count or pid in self.world.deleted_projects:
            raise ChangeError(f"no project {pid}")
        with self.objects.lock:
            po = self.objects.pin(pid)
            result: dict[str, Any] = handler(po, body)
            po.rendered.clear()
        result.update({"kind": kind, "project_id": pid})
        return result

    def random(self, count: int) -> list[dict[str, Any]]:
        """``count`` random changes (live mode); ones that do not apply are skipped."""
        names = [k for k, _ in RANDOM_KINDS]
        weights = [w for _, w in RANDOM_KINDS]
        done = []
        for _ in range(count):
            kind = self.rng.choices(names, weights)[0]
            # Skewed like the events: a few busy projects.
            pid = 1 + int(self.world.project_count * self.rng.random() ** 2)
            try:
                done.append(self.apply({"kind": kind, "project_id": pid}))
            except ChangeError:
                continue
        return done

    def _thing_result(self, thing: Thing, event_id: int | None = None) -> dict[str, Any]:
        return {"object": {"type": TYPE_NAMES[thing.kind], "id": thing.id, "iid": thing.iid},
                "updated_at": self.world.render_time(thing.updated), "state": thing.state,
                "event_id": event_id}

    def _edit(self, po: ProjectObjects, body: dict[str, Any], kind: str) -> dict[str, Any]:
        thing = self._thing(po, kind, body)
        thing.title = str(body.get("title") or f"{thing.title.split(' (edited')[0]} (edited)")
        thing.touch(self._now_after(thing.updated))
        return self._thing_result(thing)

    def _edit_issue(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        return self._edit(po, body, "issue")

    def _edit_mr(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        return self._edit(po, body, "merge_request")

    def _state(self, po: ProjectObjects, body: dict[str, Any], kind: str, before: str,
               state: str, action: str) -> dict[str, Any]:
        thing = self._thing(po, kind, body, before)
        if thing.state != before:
            raise ChangeError(f"{kind} {thing.iid} is {thing.state}, not {before}")
        user = self._user(body)
        target = tg.Target(TYPE_NAMES[kind], thing.id, thing.iid)
        event_id, t = self._event(po, user, action, TYPE_NAMES[kind], target)
        set_state(po, thing, state, user, max(t, thing.updated + 1))
        if state == "merged":
            thing.approved_by = [user]
        return self._thing_result(thing, event_id)

    def _close_issue(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        return self._state(po, body, "issue", "opened", "closed", "closed")

    def _reopen_issue(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        return self._state(po, body, "issue", "closed", "reopened", "reopened")

    def _merge_mr(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        return self._state(po, body, "merge_request", "opened", "merged", "accepted")

    def _close_mr(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        return self._state(po, body, "merge_request", "opened", "closed", "closed")

    def _label(self, po: ProjectObjects, body: dict[str, Any], action: str) -> dict[str, Any]:
        kind = str(body.get("on", "issue"))
        thing = self._thing(po, kind, body)
        names = [n for n, _ in LABELS]
        if "label" in body:
            name = str(body["label"])
            if name not in names:
                raise ChangeError(f"no label {name!r}")
        else:
            pool = ([n for n in names if n not in thing.labels] if action == "add"
                    else list(thing.labels))
            if not pool:
                raise ChangeError(f"nothing to {action} on {kind} {thing.iid}")
            name = self.rng.choice(pool)
        if (name in thing.labels) == (action == "add"):
            raise ChangeError(f"label {name!r} already {action}ed")
        t = self._now_after(thing.updated)
        if action == "add":
            thing.labels.append(name)
        else:
            thing.labels.remove(name)
        # A resource label event, and no entry in the events API.
        thing.label_events.append(ResourceEvent(po.next_serial(), self._user(body), t, action,
                                                name))
        thing.touch(t)
        result = self._thing_result(thing)
        result["label"] = name
        return result

    def _add_label(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        return self._label(po, body, "add")

    def _remove_label(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        return self._label(po, body, "remove")

    def _add_note(self, po: ProjectObjects, body: dict[str, Any], thread: bool = False
                  ) -> dict[str, Any]:
        kind = str(body.get("on", "merge_request" if thread else
                            self.rng.choice(("issue", "merge_request"))))
        thing = self._thing(po, kind, body)
        user = self._user(body)
        with self.objects.lock:
            self.note_serial += 1
            note_id = tg.NEW_NOTE_BASE + self.note_serial
        text = str(body.get("body") or f"New comment {self.note_serial}")
        target = tg.Target("Note", note_id, None, TYPE_NAMES[kind], thing.id, thing.iid)
        event_id, t = self._event(po, user, "commented on", "Note", target, text)
        position = None
        if thread and kind == "merge_request":
            position = diff_position(po.pid, thing, 1 + self.rng.randrange(200))
        reply = body.get("reply_to")
        note = add_note(po, thing, note_id, user, text, max(t, thing.updated + 1),
                        str(reply) if reply else None, position)
        result = self._thing_result(thing, event_id)
        result.update({"note_id": note.id, "discussion_id": note.discussion})
        return result

    def _add_thread(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        return self._add_note(po, body, thread=True)

    def _run_pipeline(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        ref = str(body.get("ref", "main"))
        head = next(c for c in reversed(po.commits) if c.branch == "main")
        iid = 1 + max((p.iid for p in po.pipelines), default=0)
        pipe = new_pipeline(po, po.pid * 10_000 + iid, iid, ref, head.id, self._user(body),
                            int(time.time() * 1000))
        po.pipelines.append(pipe)
        po.deployments += deployments_of(po, pipe)
        return {"object": {"type": "Pipeline", "id": pipe.id, "iid": pipe.iid},
                "updated_at": self.world.render_time(pipe.updated), "state": pipe.status,
                "event_id": None}

    def _finish_pipelines(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        status = str(body.get("status", "success"))
        finished = []
        for pipe in po.pipelines:
            if pipe.status == "running" and not pipe.deleted:
                finish_pipeline(pipe, status, self._now_after(pipe.updated))
                finished.append(pipe.id)
        if not finished:
            raise ChangeError(f"no running pipeline in project {po.pid}")
        return {"pipelines": finished, "state": status, "event_id": None}

    def _push(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        """A push to main: a "pushed to" event, its commit (the event's ``commit_to``) on
        top of main, and a pipeline for it."""
        user = self._user(body)
        head = next(c for c in reversed(po.commits) if c.branch == "main")
        event_id, t = self._event(po, user, "pushed to", None, None, "main")
        sha = sha_for(po.pid, event_id)
        po.commits.append(Commit(sha, head.id, f"Change number {event_id}", user, t, "main"))
        result = self._run_pipeline(po, {"author_id": user})
        result.update({"event_id": event_id, "commit": sha})
        return result

    def _delete(self, po: ProjectObjects, body: dict[str, Any], kind: str) -> dict[str, Any]:
        thing = self._thing(po, kind, body)
        thing.deleted = True
        return {"object": {"type": TYPE_NAMES[kind], "id": thing.id, "iid": thing.iid},
                "state": "deleted", "event_id": None}

    def _delete_issue(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        return self._delete(po, body, "issue")

    def _delete_mr(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        return self._delete(po, body, "merge_request")

    def _delete_note(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        if "note_id" in body:
            note = po.notes_by_id.get(int(body["note_id"]))
        else:
            live = [n for n in po.notes_by_id.values() if not n.deleted and not n.thing.deleted]
            note = self.rng.choice(live) if live else None
        if note is None or note.deleted:
            raise ChangeError(f"no such note in project {po.pid}")
        note.deleted = True
        note.thing.touch(self._now_after(note.thing.updated))  # notes touch their noteable
        result = self._thing_result(note.thing)
        result["note_id"] = note.id
        return result

    def _delete_pipeline(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        found = next((p for p in po.pipelines if str(p.id) == str(body.get("pipeline_id"))
                      and not p.deleted), None)
        if found is None:
            raise ChangeError("no such pipeline")
        found.deleted = True
        return {"object": {"type": "Pipeline", "id": found.id}, "state": "deleted",
                "event_id": None}

    def _delete_project(self, po: ProjectObjects, body: dict[str, Any]) -> dict[str, Any]:
        self.world.deleted_projects.add(po.pid)
        return {"object": {"type": "Project", "id": po.pid}, "state": "deleted",
                "event_id": None}


def truth(objects: ObjectWorld, project_ids: list[int]) -> dict[str, Any]:
    """Every object of the projects per kind, with its latest ``updated_at`` and state, and
    the deleted ones."""
    world = objects.world
    projects: dict[str, Any] = {}
    for pid in project_ids:
        if not 1 <= pid <= world.project_count or pid in world.deleted_projects:
            continue
        with objects.lock:
            po = objects.get(pid)
            projects[str(pid)] = _project_truth(objects, po)
    return {"projects": projects, "deleted_projects": sorted(world.deleted_projects)}


def _project_truth(objects: ObjectWorld, po: ProjectObjects) -> dict[str, Any]:
    world = objects.world
    deleted: dict[str, list[int]] = {"issues": [], "merge_requests": [], "notes": [],
                                     "pipelines": []}
    data: dict[str, Any] = {
        "last_activity_at": world.render_time(world.project_last_activity_ms[po.pid - 1]),
        "features_off": sorted(features_off(world.spec.seed, po.pid,
                                            world.spec.feature_off_share)),
        "notes": [], "deleted": deleted}
    for kind in ("issue", "merge_request"):
        rows = data.setdefault(f"{kind}s", [])
        for thing in po.things(kind).values():
            if thing.deleted:
                deleted[f"{kind}s"].append(thing.id)
                deleted["notes"] += [n.id for n in thing.notes]
                continue
            rows.append([thing.id, thing.iid, world.render_time(thing.updated), thing.state])
            for note in thing.notes:
                if note.deleted:
                    deleted["notes"].append(note.id)
                else:
                    data["notes"].append([note.id, TYPE_NAMES[kind], thing.iid,
                                          world.render_time(note.updated)])
    data["pipelines"] = [[p.id, world.render_time(p.updated), p.status] for p in po.pipelines
                         if not p.deleted]
    deleted["pipelines"] = [p.id for p in po.pipelines if p.deleted]
    data["jobs"] = [[j.id, j.status] for j in po.jobs()]
    data["deployments"] = [[d.id, world.render_time(d.updated), d.status] for d in po.deployments
                           if not d.pipeline.deleted]
    data["releases"] = [r.tag for r in po.releases]
    return data
