"""The objects of the simulated projects (issues, merge requests, notes, resource events,
pipelines, jobs, deployments, releases, commits, uploads) and the operations that change them
as GitLab does. They are generated lazily per project (``objects_store``).

Changes (edits, state changes, labels, notes, pipelines, pushes, deletions) are made on the
generated base of a project, which is then pinned: it never leaves the cache, so the changes
stay. A change that GitLab records as an event (a note, a state change, a push) adds that event
to the world, naming the object, and so moves the project's ``last_activity_at`` by GitLab's
hourly rule; label changes and edits add none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from gitlab_producer.simulator import targets as tg
from gitlab_producer.simulator.catalog import ACTIONS, event_note_body, sha_for
from gitlab_producer.simulator.world import World

FEATURES = ("issues", "merge_requests", "builds", "releases", "wiki")
LABELS: tuple[tuple[str, str], ...] = (
    ("bug", "#d9534f"), ("feature", "#428bca"), ("priority::high", "#ff0000"),
    ("needs review", "#f0ad4e"), ("good first issue", "#5cb85c"), ("docs", "#8e44ad"))
# Awkward on purpose: spaces, parentheses, '+', '%', '#', non-ASCII.
UPLOAD_NAMES = ("screen shot 2024-01-01.png", "résumé (final).pdf", "100%+ratio.txt",
                "log #1.txt", "données.csv")
EMOJI = ("thumbsup", "thumbsdown", "tada", "eyes")
JOB_STAGES = (("build", "build"), ("test", "test"), ("deploy", "deploy"))
BIG_MR_NOTES = 120  # merge request 1 of project 1 always has this many notes (paging > 100)
HOUR_MS = 3_600_000


def features_off(seed: int, project_id: int, share: float) -> frozenset[str]:
    """Features switched off in a project (never in project 1, the tests' busy project)."""
    if project_id == 1:
        return frozenset()
    return frozenset(f for i, f in enumerate(FEATURES) if tg.unit(seed, project_id, 50 + i) < share)


@dataclass(slots=True, eq=False)
class ResourceEvent:
    id: int
    user: int
    created: int
    action: str  # state events: the state; label and milestone events: add / remove
    value: Any = None  # the label name or the milestone iid


@dataclass(slots=True, eq=False)
class Note:
    id: int
    thing: Thing
    author: int
    body: str
    created: int
    updated: int
    discussion: str
    position: dict[str, Any] | None = None
    deleted: bool = False


@dataclass(slots=True, eq=False)
class Award:
    id: int
    name: str
    user: int
    created: int


@dataclass(slots=True, eq=False)
class Thing:
    """An issue or a merge request."""

    kind: str  # "issue" | "merge_request"
    project: int
    iid: int
    id: int
    author: int
    created: int
    updated: int
    title: str
    description: str
    state: str = "opened"
    closed_at: int | None = None
    merged_at: int | None = None
    closed_by: int | None = None
    labels: list[str] = field(default_factory=list)
    milestone: int | None = None
    assignee: int | None = None
    notes: list[Note] = field(default_factory=list)
    state_events: list[ResourceEvent] = field(default_factory=list)
    label_events: list[ResourceEvent] = field(default_factory=list)
    milestone_events: list[ResourceEvent] = field(default_factory=list)
    awards: list[Award] = field(default_factory=list)
    commits: list[str] = field(default_factory=list)
    approved_by: list[int] = field(default_factory=list)
    deleted: bool = False

    def touch(self, t: int) -> None:
        self.updated = max(self.updated, t)

    def live_notes(self) -> list[Note]:
        return [n for n in self.notes if not n.deleted]


@dataclass(slots=True, eq=False)
class Job:
    id: int
    name: str
    stage: str
    status: str
    created: int
    started: int | None
    finished: int | None


@dataclass(slots=True, eq=False)
class Pipeline:
    id: int
    iid: int
    ref: str
    sha: str
    status: str
    user: int
    created: int
    updated: int
    started: int | None
    finished: int | None
    jobs: list[Job] = field(default_factory=list)
    deleted: bool = False


@dataclass(slots=True, eq=False)
class Deployment:
    id: int
    iid: int
    pipeline: Pipeline
    job: Job
    created: int

    @property
    def status(self) -> str:
        return {"skipped": "canceled", "pending": "created"}.get(self.job.status, self.job.status)

    @property
    def updated(self) -> int:
        return max(self.created, self.job.finished or self.job.started or self.created)


@dataclass(slots=True, eq=False)
class Commit:
    id: str
    parent: str | None
    title: str
    author: int
    created: int
    branch: str


@dataclass(slots=True, eq=False)
class Release:
    tag: str
    name: str
    description: str
    author: int
    created: int
    commit: str


@dataclass(frozen=True)
class Upload:
    secret: str
    filename: str
    content: bytes

    @property
    def markdown(self) -> str:
        image = "!" if self.filename.endswith(".png") else ""
        return f"{image}[{self.filename}](/uploads/{self.secret}/{quote(self.filename)})"


@dataclass(eq=False)
class ProjectObjects:
    """Everything one project holds besides its events."""

    pid: int
    created: int
    issues: dict[int, Thing] = field(default_factory=dict)
    merge_requests: dict[int, Thing] = field(default_factory=dict)
    milestones: list[tuple[int, int, str, int]] = field(default_factory=list)  # id, iid, title, t
    pipelines: list[Pipeline] = field(default_factory=list)
    deployments: list[Deployment] = field(default_factory=list)
    releases: list[Release] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)  # newest last
    uploads: dict[str, Upload] = field(default_factory=dict)
    discussions: dict[str, list[Note]] = field(default_factory=dict)
    notes_by_id: dict[int, Note] = field(default_factory=dict)
    applied_events: int = 0
    serial: int = 0
    # Rendered JSON per object, dropped whenever anything in the project changes.
    rendered: dict[tuple[str, int | str], bytes] = field(default_factory=dict)

    def render(self, key: tuple[str, int | str], build: Callable[[], bytes]) -> bytes:
        found = self.rendered.get(key)
        if found is None:
            found = self.rendered[key] = build()
        return found

    def next_serial(self) -> int:
        self.serial += 1
        return self.pid * 10**6 + self.serial

    def things(self, kind: str) -> dict[int, Thing]:
        return self.issues if kind == "issue" else self.merge_requests

    def jobs(self) -> list[Job]:
        return [j for p in self.pipelines if not p.deleted for j in p.jobs]

    def pipeline_of(self, job_id: int) -> Pipeline | None:
        pipe_id = job_id // 10
        return next((p for p in self.pipelines if p.id == pipe_id and not p.deleted), None)


def _discussion_id(note_id: int) -> str:
    return sha_for("discussion", note_id)


def diff_position(pid: int, thing: Thing, line: int) -> dict[str, Any]:
    head = thing.commits[-1] if thing.commits else sha_for("mr", pid, thing.iid, 0)
    return {"base_sha": sha_for("branch", pid, "main"), "start_sha": sha_for("branch", pid, "main"),
            "head_sha": head, "old_path": "lib/class.rb", "new_path": "lib/class.rb",
            "position_type": "text", "old_line": None, "new_line": line, "line_range": None}


def add_note(po: ProjectObjects, thing: Thing, note_id: int, author: int, body: str, t: int,
             reply_to: str | None = None, position: dict[str, Any] | None = None) -> Note:
    discussion = reply_to if reply_to in po.discussions else _discussion_id(note_id)
    if reply_to in po.discussions:
        position = po.discussions[discussion][0].position
    note = Note(note_id, thing, author, body, t, t, discussion, position)
    thing.notes.append(note)
    po.discussions.setdefault(discussion, []).append(note)
    po.notes_by_id[note_id] = note
    thing.touch(t)  # a new note bumps its noteable's updated_at
    return note


def set_state(po: ProjectObjects, thing: Thing, state: str, user: int, t: int) -> None:
    """Close, reopen or merge; records a resource state event (``closed``, ``reopened``,
    ``merged``) and bumps ``updated_at``."""
    thing.state = "opened" if state == "reopened" else state
    if state in ("closed", "merged"):
        thing.closed_at = t if state == "closed" else None
        thing.closed_by = user if state == "closed" else None
        thing.merged_at = t if state == "merged" else None
    else:
        thing.closed_at = thing.closed_by = None
    thing.state_events.append(ResourceEvent(po.next_serial(), user, t, state))
    thing.touch(t)


def apply_events(world: World, po: ProjectObjects, indices: list[int],
                 known: dict[int, tg.Target | None] | None = None) -> None:
    """Make the project's objects agree with events of the generated history (and with live
    random events): a "closed" event closes its issue, "accepted" merges its merge request, a
    "commented on" event is a note on its noteable. Events made by object changes are skipped:
    the change itself made their objects."""
    if len(indices) > po.applied_events:
        po.rendered.clear()
    for idx in indices[po.applied_events:]:
        if idx in world.ev_target:
            continue
        action = ACTIONS[world.ev_action[idx]]
        target = known[idx] if known is not None else world.event_target(idx)[0]
        if target is None:
            continue
        t, author = world.ev_time[idx], world.ev_author[idx]
        if target.target_type == "Note":
            things = po.issues if target.noteable_type == "Issue" else po.merge_requests
            thing = things.get(target.noteable_iid or 0)
            if thing is not None and target.target_id not in po.notes_by_id:
                add_note(po, thing, target.target_id, author, event_note_body(idx + 1), t)
            continue
        things = po.issues if target.target_type == "Issue" else po.merge_requests
        thing = things.get(target.target_iid or 0)
        if thing is None or target.target_type == "Milestone":
            continue
        if action.action_name == "closed" and thing.state != "closed":
            set_state(po, thing, "closed", author, t)
        elif action.action_name == "accepted" and thing.state != "merged":
            set_state(po, thing, "merged", author, t)
            thing.approved_by = [author]
        else:
            thing.touch(t)
    po.applied_events = len(indices)


def new_pipeline(po: ProjectObjects, pipe_id: int, iid: int, ref: str, sha: str, user: int,
                 created: int) -> Pipeline:
    pipe = Pipeline(pipe_id, iid, ref, sha, "running", user, created, created, created, None)
    for j, (name, stage) in enumerate(JOB_STAGES):
        if stage == "deploy" and ref != "main":
            continue
        status = "running" if j == 0 else "created"
        pipe.jobs.append(Job(pipe_id * 10 + j, name, stage, status, created,
                             created if j == 0 else None, None))
    return pipe


def finish_pipeline(pipe: Pipeline, status: str, t: int) -> None:
    """A running pipeline finishes at ``t`` with ``status``; its jobs agree."""
    pipe.status, pipe.finished, pipe.updated = status, t, t
    for j, job in enumerate(pipe.jobs):
        job.started = job.started or pipe.created + j * 1000
        if status == "success":
            job.status, job.finished = "success", t
        elif status == "failed":
            job.status = ("success", "failed", "skipped")[min(j, 2)]
            job.finished = t if job.status != "skipped" else None
        else:
            job.status, job.finished = "canceled", t


def deployments_of(po: ProjectObjects, pipe: Pipeline) -> list[Deployment]:
    deploy = next((j for j in pipe.jobs if j.stage == "deploy"), None)
    if deploy is None:
        return []
    return [Deployment(pipe.id, len(po.deployments) + 1, pipe, deploy, pipe.created)]
