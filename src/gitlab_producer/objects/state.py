"""The import's durable state, in the store (Redis or SQLite), never in the queue: the queue
only dispatches, and after any crash the pending work is derived again from these records.

- ``bf:plan``: the projects and kinds of the import, and when it began
- ``bf:p:<project_id>``: a project's stage, status and the jobs of its current stage
- ``bf:j:<job_id>``: a job's status, attempts, counts, skipped kinds, page positions
- ``bf:iids:<project_id>:<collection>``: the iids of issues / merge requests, page by page
  (read once by the listing stage; later stages fan out over them without listing again)
- ``bf:fatal``: why the import stopped (a 401), when it did
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import msgspec

from gitlab_producer.store.base import Store

PLAN = "bf:plan"
FATAL = "bf:fatal"
FATAL_MAX_AGE_S = 1.0  # how old the stop flag a job or waiter looks at may be

# Job and project statuses.
QUEUED, DONE, FAILED = "queued", "done", "failed"
RUNNING, COMPLETE, GONE = "running", "complete", "gone"
TERMINAL_JOB = frozenset({DONE, FAILED})
TERMINAL_PROJECT = frozenset({COMPLETE, GONE})


class Plan(msgspec.Struct):
    projects: list[int]
    kinds: list[str]
    started: float


class JobRecord(msgspec.Struct):
    """One job of a project's stage. ``gen`` is its engine generation: a rescheduled job (429)
    gets a fresh engine key, because a running SAQ job cannot re-enqueue its own."""

    id: str
    project_id: int
    stage: int
    task: str  # what the job does (see stages.TASKS)
    args: dict[str, Any] = {}
    status: str = QUEUED
    gen: int = 0
    attempts: int = 0
    not_before: float = 0.0  # a rescheduled job runs from then on
    fetched: dict[str, int] = {}
    imported: dict[str, int] = {}
    produced: dict[str, int] = {}
    too_large: dict[str, int] = {}  # objects Kafka refused for their size (not produced)
    skipped: list[str] = []  # kinds answered 403 (switched off in the project)
    gone: int = 0  # parents deleted while their children were read
    user_hits: int = 0
    user_requests: int = 0
    children: list[str] = []  # jobs this one fanned out (stages 4, 6, 7)
    uploads: list[str] = []  # "<secret>/<name>" linked in the markdown it read
    positions: dict[str, dict[str, Any]] = {}
    error: str = ""

    @property
    def engine_key(self) -> str:
        return f"{self.id}:g{self.gen}"


class ProjectRecord(msgspec.Struct):
    project_id: int
    stage: int = 1
    status: str = RUNNING
    jobs: list[str] = []  # the current stage's top-level jobs
    waiter_gen: int = 0
    started: float = 0.0
    stage_started: float = 0.0
    finished: float = 0.0
    stage_durations: dict[str, float] = {}
    all_jobs: list[str] = []  # every top-level job of the finished stages
    failed: list[str] = []  # jobs that failed after their retries (retried by the next run)
    # A retry pass (the next run after failed jobs): the jobs it runs again, by their stage.
    # Empty in the first pass.
    retrying: dict[str, int] = {}
    error: str = ""


_J = msgspec.json.Decoder(JobRecord)
_P = msgspec.json.Decoder(ProjectRecord)
_PLAN = msgspec.json.Decoder(Plan)
_ENC = msgspec.json.Encoder()


def job_key(job_id: str) -> str:
    return f"bf:j:{job_id}"


def project_key(project_id: int) -> str:
    return f"bf:p:{project_id}"


class StateStore:
    """Typed access to the records above on any :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._fatal: tuple[float, str | None] | None = None  # (read at, monotonic; value)

    async def plan(self) -> Plan | None:
        raw = await self.store.get_meta(PLAN)
        return None if raw is None else _PLAN.decode(raw)

    async def save_plan(self, plan: Plan) -> None:
        await self.store.set_meta(PLAN, _ENC.encode(plan).decode())

    async def job(self, job_id: str) -> JobRecord | None:
        raw = await self.store.get_meta(job_key(job_id))
        return None if raw is None else _J.decode(raw)

    async def save_job(self, job: JobRecord) -> None:
        await self.store.set_meta(job_key(job.id), _ENC.encode(job).decode())

    async def project(self, project_id: int) -> ProjectRecord | None:
        raw = await self.store.get_meta(project_key(project_id))
        return None if raw is None else _P.decode(raw)

    async def save_project(self, project: ProjectRecord) -> None:
        await self.store.set_meta(project_key(project.project_id), _ENC.encode(project).decode())

    async def iid_pages(self, project_id: int, collection: str) -> list[list[int]]:
        raw = await self.store.get_meta(f"bf:iids:{project_id}:{collection}")
        return [] if raw is None else msgspec.json.decode(raw, type=list[list[int]])

    async def save_iid_pages(self, project_id: int, collection: str,
                             pages: list[list[int]]) -> None:
        await self.store.set_meta(f"bf:iids:{project_id}:{collection}",
                                  _ENC.encode(pages).decode())

    async def fatal(self) -> str | None:
        value = await self.store.get_meta(FATAL)
        self._fatal = (time.monotonic(), value)
        return value

    async def fatal_recent(self, max_age_s: float = FATAL_MAX_AGE_S) -> str | None:
        """The stop flag as read at most ``max_age_s`` ago (this process's own changes at
        once): every job and waiter looks at it, one store read a second is enough."""
        cached = self._fatal
        if cached is not None and time.monotonic() - cached[0] < max_age_s:
            return cached[1]
        return await self.fatal()

    async def set_fatal(self, reason: str) -> None:
        await self.store.set_meta(FATAL, reason)
        self._fatal = (time.monotonic(), reason)

    async def clear_fatal(self) -> None:
        await self.store.set_meta(FATAL, "")
        self._fatal = (time.monotonic(), "")

    async def stage_jobs(self, project: ProjectRecord) -> dict[str, JobRecord | None]:
        """The current stage's jobs and the jobs they fanned out, by id."""
        return await self._walk(list(project.jobs))

    async def project_jobs(self, project: ProjectRecord) -> list[JobRecord]:
        """Every job of the project so far (finished stages and the current one)."""
        found = await self._walk([*project.all_jobs, *project.jobs])
        return [job for job in found.values() if job is not None]

    async def _walk(self, pending: list[str]) -> dict[str, JobRecord | None]:
        found: dict[str, JobRecord | None] = {}
        while pending:
            job_id = pending.pop()
            if job_id in found:
                continue
            job = found[job_id] = await self.job(job_id)
            if job is not None:
                pending.extend(job.children)
        return found


def add_counts(total: dict[str, int], more: Mapping[str, int]) -> None:
    for kind, count in more.items():
        total[kind] = total.get(kind, 0) + count
