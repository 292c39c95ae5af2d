"""Pure decisions of the import, as plain data (tested without GitLab, store or engine):
which stages a set of kinds needs, what follows a stage, and what a project's waiter does
with the jobs of its current stage."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from gitlab_producer.objects.state import TERMINAL_JOB, TERMINAL_PROJECT, JobRecord, ProjectRecord

FINISH = 11
OLD_RETRY = 0  # the single retry stage of earlier versions (a saved project may be at it)


@dataclass(frozen=True)
class StageSpec:
    """One stage: its number and name (seed 002's order), the job it starts with, and the
    kinds it produces or feeds (a stage runs when one of them is wanted)."""

    number: int
    name: str
    task: str
    streams: tuple[str, ...] = ()
    kinds: frozenset[str] = frozenset()


ATTACHMENTS = "attachments"  # not a kind: asked for by BACKFILL_ATTACHMENTS
THREADS = frozenset({"discussions", "notes"})
EVENTS = frozenset({"resource_state_events", "resource_label_events",
                    "resource_milestone_events"})
STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, "project", "project", ("project",), frozenset({"projects", "groups"})),
    StageSpec(2, "repository", "streams", ("branches", "tags", "commits"),
              frozenset({"branches", "tags", "commits"})),
    StageSpec(3, "base_data", "streams", ("labels", "milestones", "releases"),
              frozenset({"labels", "milestones", "releases"})),
    StageSpec(4, "merge_requests", "list_merge_requests", ("merge_requests",),
              frozenset({"merge_requests", "commits"}) | THREADS | EVENTS),
    StageSpec(5, "collaborators", "streams", ("members",), frozenset({"members", "users"})),
    StageSpec(6, "issues_and_notes", "list_issues", ("issues",),
              frozenset({"issues"}) | THREADS | EVENTS),
    StageSpec(7, "issue_events", "fan_out_events", (), EVENTS),
    StageSpec(8, "ci", "streams", ("pipelines", "jobs", "deployments"),
              frozenset({"pipelines", "jobs", "deployments"})),
    StageSpec(9, "attachments", "attachments", (), frozenset({ATTACHMENTS})),
    StageSpec(10, "protected_branches", "streams", ("protected_branches",),
              frozenset({"protected_branches"})),
    StageSpec(FINISH, "finish", "finish"),
)
BY_NUMBER = {s.number: s for s in STAGES}
STAGE_NAMES = {s.number: s.name for s in STAGES}
RETRY_LABEL = "retry_failed"  # the stage-duration label of a retry pass
# Stages whose work derives from what earlier stages stored: stage 6 fans out the discussions
# of the merge requests stage 4 listed, stage 7 the events of the merge requests and issues
# stages 4 and 6 listed, stage 9 the uploads linked in anything read before it, and the finish
# sums up everything. When a job of a stage they derive from failed, their first run saw that
# stage's output incomplete (a failed listing: no iid pages to fan out over): the retry pass
# runs them again after it. Running one again redoes nothing done (its child jobs and stored
# uploads are kept), it only adds what was missing.
DERIVES_FROM: dict[int, frozenset[int]] = {
    6: frozenset({4}),
    7: frozenset({4, 6}),
    9: frozenset(range(1, 9)),
    FINISH: frozenset(range(1, FINISH)),
}


def stages_for(kinds: Collection[str]) -> list[int]:
    """The stages an import of ``kinds`` runs, in order (always 1 and the finish)."""
    wanted = set(kinds)
    return [s.number for s in STAGES
            if s.number in (1, FINISH) or s.kinds & wanted]


def next_stage(current: int, kinds: Collection[str]) -> int:
    """The stage after ``current``."""
    later = [n for n in stages_for(kinds) if n > current]
    return later[0] if later else FINISH


def rederived(stage: int, failed: Collection[int]) -> bool:
    """Whether a retry pass of jobs failed in the stages ``failed`` runs ``stage``'s own job
    again (it derives its work from one of them; the finish always)."""
    return stage == FINISH or not DERIVES_FROM.get(stage, frozenset()).isdisjoint(failed)


def retry_stages(failed: Collection[int], kinds: Collection[str]) -> list[int]:
    """The stages of a retry pass (the next run after jobs failed in the stages ``failed``), in
    the import's order: every stage with failed jobs, every stage of the import deriving its
    work from one of them, and the finish last."""
    return sorted({*failed, FINISH,
                   *(s for s in stages_for(kinds) if rederived(s, failed))})


def next_retry_stage(current: int, failed: Collection[int], kinds: Collection[str]) -> int:
    """The stage of a retry pass after ``current``."""
    later = [n for n in retry_stages(failed, kinds) if n > current]
    return later[0] if later else FINISH


@dataclass(frozen=True)
class WaiterDecision:
    """What a waiter does now: ``wait`` (and re-dispatch jobs the engine lost), ``advance``
    to the next stage, or ``stop`` (the project is finished or gone)."""

    action: Literal["wait", "advance", "stop"]
    redispatch: tuple[str, ...] = ()  # job ids not finished and not pending in the engine
    failed: tuple[str, ...] = ()  # job ids of the stage that failed (on advance)
    reason: str = ""


def decide(project: ProjectRecord, jobs: Mapping[str, JobRecord | None],
           pending_keys: Collection[str]) -> WaiterDecision:
    """The waiter's decision for ``project``'s current stage given its jobs' records and the
    engine keys the engine still holds."""
    if project.status in TERMINAL_PROJECT:
        return WaiterDecision("stop", reason=project.status)
    lost = []
    unfinished = 0
    for job_id, job in jobs.items():
        if job is None:
            unfinished += 1  # announced by its parent, record on its way
        elif job.status not in TERMINAL_JOB:
            unfinished += 1
            if job.engine_key not in pending_keys:
                lost.append(job_id)
    if unfinished:
        return WaiterDecision("wait", tuple(sorted(lost)),
                              reason=f"{unfinished} of {len(jobs)} jobs running")
    failed = tuple(sorted(j.id for j in jobs.values() if j is not None and j.status != "done"))
    return WaiterDecision("advance", failed=failed, reason="every job finished")
