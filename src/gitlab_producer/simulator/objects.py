"""The objects of the simulated projects (issues, merge requests, notes, resource events,
pipelines, jobs, deployments, releases, commits, uploads), generated lazily per project from
(seed, project id) and the project's events, kept in a bounded cache.

Changes (edits, state changes, labels, notes, pipelines, pushes, deletions) are made on the
generated base of a project, which is then pinned: it never leaves the cache, so the changes
stay. A change that GitLab records as an event (a note, a state change, a push) adds that event
to the world, naming the object, and so moves the project's ``last_activity_at`` by GitLab's
hourly rule; label changes and edits add none.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from gitlab_producer.simulator import targets as tg
from gitlab_producer.simulator.catalog import ACTIONS, event_note_body, sha_for
from gitlab_producer.simulator.repository import BRANCHES, resolve_ref
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


def _secret(seed: int, pid: int, k: int) -> str:
    return hashlib.md5(f"{seed}/{pid}/upload/{k}".encode(), usedforsecurity=False).hexdigest()


class Generator:
    """Builds one project's objects from (seed, project id) and the project's events."""

    def __init__(self, world: World, pid: int) -> None:
        self.world = world
        self.spec = world.spec
        self.pid = pid
        self.rng = random.Random(tg.mix(self.spec.seed, pid, 99))
        self.first = world.project_created_ms[pid - 1]
        self.end = world.end_ms
        self.shape = world.project_shape(pid)
        self.po = ProjectObjects(pid, self.first)

    def user(self) -> int:
        return 1 + self.rng.randrange(self.world.user_count)

    def between(self, lo: int, hi: int) -> int:
        return lo + int(self.rng.random() * max(1, hi - lo))

    def body(self, text: str, share: float) -> str:
        if self.po.uploads and self.rng.random() < share:
            upload = self.rng.choice(list(self.po.uploads.values()))
            return f"{text}\n\nAttached: {upload.markdown}"
        return text

    def build(self) -> ProjectObjects:
        self._uploads()
        self._milestones()
        closes, merges = self._event_targets()
        self._things("issue", self.shape.issues, closes)
        self._things("merge_request", self.shape.merge_requests, merges)
        self._notes()
        self._commits()
        self._pipelines()
        self._releases()
        return self.po

    def _uploads(self) -> None:
        for k in range(3):
            name = UPLOAD_NAMES[(self.pid + k) % len(UPLOAD_NAMES)]
            content = (b"\x89PNG\r\n\x1a\n" if name.endswith(".png") else b"") + (
                f"upload {k} of project {self.pid}: {name}\n".encode() * 4)
            secret = _secret(self.spec.seed, self.pid, k)
            self.po.uploads[secret] = Upload(secret, name, content)

    def _milestones(self) -> None:
        for iid in range(1, self.shape.milestones + 1):
            self.po.milestones.append((self.pid * tg.MILESTONE_STRIDE + iid, iid,
                                       f"Milestone {iid}", self.between(self.first, self.end)))

    def _event_targets(self) -> tuple[set[int], set[int]]:
        """Issues closed and merge requests merged by events stay open in the base."""
        closes: set[int] = set()
        merges: set[int] = set()
        world = self.world
        with world.lock:
            self.indices = list(world.project_events[self.pid - 1])
        self.targets = {idx: world.event_target(idx)[0] for idx in self.indices
                        if idx not in world.ev_target}
        for idx, target in self.targets.items():
            action = ACTIONS[world.ev_action[idx]]
            if action.action_name in ("closed", "accepted") and target and target.target_iid:
                (closes if target.target_type == "Issue" else merges).add(target.target_iid)
        return closes, merges

    def _things(self, kind: str, count: int, kept_open: set[int]) -> None:
        seed, pid, rng = self.spec.seed, self.pid, self.rng
        title_of = tg.issue_title if kind == "issue" else tg.mr_title
        things = self.po.things(kind)
        for iid in range(1, count + 1):
            created = tg.created_of(seed, pid, iid, count, self.first, self.end,
                                    1 if kind == "issue" else 2)
            author = self.user()
            thing = Thing(kind, pid, iid, pid * tg.IID_STRIDE + iid, author, created, created,
                          title_of(iid), self.body(f"Description of {kind} {iid}", 0.35))
            thing.assignee = self.user() if rng.random() < 0.5 else None
            for name, _ in rng.sample(LABELS, rng.randrange(3)):
                thing.labels.append(name)
                thing.label_events.append(ResourceEvent(self.po.next_serial(), author, created,
                                                        "add", name))
            if rng.random() < 0.4:
                thing.milestone = 1 + rng.randrange(self.shape.milestones)
                thing.milestone_events.append(ResourceEvent(self.po.next_serial(), author,
                                                            created, "add", thing.milestone))
            if rng.random() < 0.5:
                thing.updated = self.between(created, self.end)  # an edit
            if kind == "merge_request":
                thing.commits = [sha_for("mr", pid, iid, k) for k in range(1 + rng.randrange(3))]
            if iid not in kept_open:
                self._base_state(thing)
            for _ in range(rng.randrange(3)):
                t = self.between(created, self.end)
                thing.awards.append(Award(self.po.next_serial(), rng.choice(EMOJI), self.user(), t))
            things[iid] = thing

    def _base_state(self, thing: Thing) -> None:
        roll = self.rng.random()
        if thing.kind == "issue" and roll < 0.3:
            set_state(self.po, thing, "closed", self.user(), self.between(thing.created, self.end))
        elif thing.kind == "merge_request" and roll < 0.6:
            state = "merged" if roll < 0.5 else "closed"
            set_state(self.po, thing, state, self.user(), self.between(thing.created, self.end))
            if state == "merged":
                thing.approved_by = [self.user()]

    def _notes(self) -> None:
        world, po = self.world, self.po
        pending: list[tuple[int, Thing, int, str | None]] = []  # (time, thing, author, body)
        all_things = list(po.issues.values()) + list(po.merge_requests.values())
        for _ in range(self.shape.notes):
            thing = self.rng.choice(all_things)
            pending.append((self.between(thing.created, self.end), thing, self.user(), None))
        if self.pid == 1:
            big = po.merge_requests[1]
            pending += [(self.between(big.created, self.end), big, self.user(), None)
                        for _ in range(BIG_MR_NOTES)]
        pending.sort(key=lambda row: row[0])
        for serial, (t, thing, author, _) in enumerate(pending, 1):
            note_id = tg.BASE_NOTE_BASE + self.pid * 10**6 + serial
            reply = self._reply_target(thing)
            position = None
            if reply is None and thing.kind == "merge_request" and self.rng.random() < 0.4:
                position = diff_position(self.pid, thing, 1 + self.rng.randrange(200))
            add_note(po, thing, note_id, author,
                     self.body(f"Note {serial} on {thing.kind} {thing.iid}", 0.1), t,
                     reply, position)
        apply_events(world, po, self.indices, self.targets)

    def _reply_target(self, thing: Thing) -> str | None:
        if thing.notes and self.rng.random() < 0.35:
            return self.rng.choice(thing.notes).discussion
        return None

    def _commits(self) -> None:
        n = 5 + tg.mix(self.spec.seed, self.pid, 4) % 25
        parent: str | None = None
        for k in range(n):
            sha = resolve_ref(self.pid, "main") if k == n - 1 else sha_for("commit", self.pid, k)
            assert sha is not None
            created = tg.created_of(self.spec.seed, self.pid, k + 1, n, self.first, self.end, 4)
            self.po.commits.append(Commit(sha, parent, f"Commit {k} of project {self.pid}",
                                          self.user(), created, "main"))
            parent = sha
        base = self.po.commits[-2] if n > 1 else self.po.commits[-1]
        parent = base.id
        for k in range(2):
            sha = (resolve_ref(self.pid, BRANCHES[1]) if k == 1
                   else sha_for("commit", self.pid, "feature", k))
            assert sha is not None
            self.po.commits.append(Commit(sha, parent, f"Feature work {k}", self.user(),
                                          self.between(base.created, self.end), BRANCHES[1]))
            parent = sha
        self.po.commits.sort(key=lambda c: c.created)

    def _pipelines(self) -> None:
        count = min(self.shape.pipelines, 9_999)
        main_commits = [c for c in self.po.commits if c.branch == "main"]
        for iid in range(1, count + 1):
            created = tg.created_of(self.spec.seed, self.pid, iid, count, self.first, self.end, 3)
            commit = main_commits[min(len(main_commits) - 1,
                                      int(len(main_commits) * iid / (count + 1)))]
            ref = "main" if self.rng.random() < 0.8 else BRANCHES[1]
            pipe = new_pipeline(self.po, self.pid * 10_000 + iid, iid, ref, commit.id,
                                self.user(), created)
            duration = 60_000 + self.rng.randrange(840_000)
            if created + duration < self.end:
                roll = self.rng.random()
                finish_pipeline(pipe, "success" if roll < 0.7 else "failed" if roll < 0.9
                                else "canceled", created + duration)
            self.po.pipelines.append(pipe)
        for pipe in self.po.pipelines:
            self.po.deployments += deployments_of(self.po, pipe)

    def _releases(self) -> None:
        main_commits = [c for c in self.po.commits if c.branch == "main"]
        upload = next(iter(self.po.uploads.values()))
        for k in range(tg.mix(self.spec.seed, self.pid, 5) % 4):
            commit = main_commits[min(len(main_commits) - 1, k * 3)]
            self.po.releases.append(Release(
                f"v1.{k}.0", f"Release 1.{k}", f"Release notes for 1.{k}.\n\n{upload.markdown}",
                self.user(), commit.created, commit.id))


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


class ObjectWorld:
    """Per-project objects on demand: a bounded cache of generated projects plus the projects
    that changed (kept for good)."""

    def __init__(self, world: World, cache_projects: int = 512) -> None:
        self.world = world
        self.lock = threading.RLock()
        self.cache_projects = cache_projects
        self._cache: OrderedDict[int, ProjectObjects] = OrderedDict()
        self._changed: dict[int, ProjectObjects] = {}
        self.generated = 0

    def get(self, pid: int) -> ProjectObjects:
        with self.lock:
            po = self._changed.get(pid) or self._cache.get(pid)
            if po is None:
                po = Generator(self.world, pid).build()
                self.generated += 1
                self._cache[pid] = po
                while len(self._cache) > self.cache_projects:
                    self._cache.popitem(last=False)
            elif pid in self._cache:
                self._cache.move_to_end(pid)
            events = self.world.project_events[pid - 1]
            if len(events) != po.applied_events:
                with self.world.lock:
                    indices = list(events)
                apply_events(self.world, po, indices)
            return po

    def pin(self, pid: int) -> ProjectObjects:
        """The project's objects, kept from now on (they are about to change)."""
        with self.lock:
            po = self.get(pid)
            self._changed[pid] = po
            self._cache.pop(pid, None)
            return po
