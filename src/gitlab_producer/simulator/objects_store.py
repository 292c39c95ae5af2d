"""The projects' objects on demand: ``Generator`` builds one project's objects from (seed,
project id) and the project's events; ``ObjectWorld`` keeps them in a bounded cache, plus the
projects that changed (kept for good, so that the changes stay)."""

from __future__ import annotations

import hashlib
import random
import threading
from collections import OrderedDict

from gitlab_producer.simulator import targets as tg
from gitlab_producer.simulator.catalog import ACTIONS, sha_for
from gitlab_producer.simulator.objects import (
    BIG_MR_NOTES,
    EMOJI,
    LABELS,
    UPLOAD_NAMES,
    Award,
    Commit,
    ProjectObjects,
    Release,
    ResourceEvent,
    Thing,
    Upload,
    add_note,
    apply_events,
    deployments_of,
    diff_position,
    finish_pipeline,
    new_pipeline,
    set_state,
)
from gitlab_producer.simulator.repository import BRANCHES, FORK_AT, branch_commits
from gitlab_producer.simulator.world import World


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
        # The repository's one history (repository.branch_commits): the files, the single
        # commit endpoint and the commit lists all name the same commits.
        main = branch_commits(self.pid, BRANCHES[0])
        parent: str | None = None
        for k, sha in enumerate(main):
            created = tg.created_of(self.spec.seed, self.pid, k + 1, len(main), self.first,
                                    self.end, 4)
            self.po.commits.append(Commit(sha, parent, f"Commit {k} of project {self.pid}",
                                          self.user(), created, BRANCHES[0]))
            parent = sha
        feature = branch_commits(self.pid, BRANCHES[1])
        base = next(c for c in self.po.commits if c.id == feature[FORK_AT - 1])
        parent = base.id
        own = feature[FORK_AT:]
        times = sorted(self.between(base.created, self.end) for _ in own)  # a child is newer
        for k, (sha, created) in enumerate(zip(own, times, strict=True)):
            self.po.commits.append(Commit(sha, parent, f"Feature work {k}", self.user(),
                                          created, BRANCHES[1]))
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
