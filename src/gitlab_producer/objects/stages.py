"""The import's job handlers (seed 002, adapted): per project, stages of jobs run in order;
stages 4, 6 and 7 fan out one job per page of merge requests or issues; a waiter advances the
project when every job of its stage finished.

Failure policy of a job, by GitLab's answer:
- 429: the job is rescheduled (a fresh engine key) to ``Retry-After`` / ``RateLimit-Reset`` or a
  capped backoff, from the page it stopped at; the worker takes other work meanwhile.
- 401: the import stops (``bf:fatal``); the job stays queued for the next run.
- 403 on a list: that kind is switched off in the project; skipped, counted, shown in status.
- 404 of the project: the project ended as ``gone``. 404 of a parent (an issue deleted while
  its threads were read): that parent is skipped and counted.
- anything else: retried by the engine; after the last attempt the job is recorded as failed
  (not raised into a dead list), shown in status, and retried by the next run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import orjson

from gitlab_producer.artifact_paths import UnsafePathError
from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.errors import (
    FatalGitLabError,
    ForbiddenError,
    GitLabError,
    NotFoundError,
    RetriesExhaustedError,
)
from gitlab_producer.logs import get_logger
from gitlab_producer.objects.delivery import ObjectDeliverer
from gitlab_producer.objects.engine import Call, Dispatcher, Handler, backoff_s
from gitlab_producer.objects.executor import Executor, Progress
from gitlab_producer.objects.keyindex import KeyIndex
from gitlab_producer.objects.planner import (
    ATTACHMENTS,
    BY_NUMBER,
    FINISH,
    OLD_RETRY,
    RETRY_LABEL,
    STAGE_NAMES,
    WaiterDecision,
    decide,
    next_retry_stage,
    next_stage,
    rederived,
    retry_stages,
)
from gitlab_producer.objects.positions import JobPositions
from gitlab_producer.objects.state import (
    COMPLETE,
    DONE,
    FAILED,
    GONE,
    QUEUED,
    TERMINAL_JOB,
    JobRecord,
    ProjectRecord,
    StateStore,
)
from gitlab_producer.objects.status import project_summary
from gitlab_producer.objects.streams import Scope, stream
from gitlab_producer.objects.users import Lookups, UserCache
from gitlab_producer.sinks.base import DeliveryError, Message
from gitlab_producer.store.base import StoreError

if TYPE_CHECKING:  # fsspec's import is not needed unless attachments are stored
    from gitlab_producer.artifact_store import ArtifactStore

log = get_logger(__name__)
RUN_JOB, WAIT_STAGE = "run_job", "wait_stage"
MAX_RESCHEDULE_S = 3600.0


class ProjectGone(Exception):
    """The project answered 404 mid-import."""


@dataclass(frozen=True)
class ImportOptions:
    kinds: frozenset[str]
    waiter_interval_s: float
    user_ttl_s: int
    attachments: bool = False  # BACKFILL_ATTACHMENTS: stage 9 stores markdown uploads
    artifact_topic: str = ""  # where stored uploads are announced

    @property
    def stage_kinds(self) -> frozenset[str]:
        """What decides which stages run: the kinds, and the attachments when asked for."""
        return self.kinds | {ATTACHMENTS} if self.attachments else self.kinds


class Importer:
    """Stages, jobs and the waiter, on any :class:`Dispatcher`."""

    def __init__(self, state: StateStore, client: GitLabClient, deliverer: ObjectDeliverer,
                 dispatcher: Dispatcher, options: ImportOptions,
                 artifacts: ArtifactStore | None = None) -> None:
        self.state = state
        self.artifacts = artifacts
        self.client = client
        self.deliverer = deliverer
        self.dispatcher = dispatcher
        self.options = options
        self.metrics = client.metrics
        # Told of each project this process finished (or found gone), after its record says so.
        self.on_project_end: Callable[[ProjectRecord], None] | None = None
        self._user_lookups: Lookups = Lookups()  # under way, shared by this process's jobs
        self._tasks: dict[str, Callable[[JobRecord, JobPositions], Awaitable[None]]] = {
            "project": self._project, "streams": self._streams,
            "list_merge_requests": self._list_merge_requests, "list_issues": self._list_issues,
            "fan_out_events": self._fan_out_events, "children": self._children,
            "attachments": self._attachments, "finish": self._finish,
        }

    @property
    def handlers(self) -> dict[str, Handler]:
        return {RUN_JOB: self.run_job, WAIT_STAGE: self.wait_stage}

    # -- starting and resuming -----------------------------------------------------------
    async def start_project(self, project_id: int) -> ProjectRecord:
        """Begin (or resume) the import of one project from its durable state; returns its
        record (``running``, or already complete or gone)."""
        project = await self.state.project(project_id)
        # A resumed stage may have finished unseen (a crash before its advance): look at once.
        first_look_s = 0.0
        known: dict[str, JobRecord] = {}
        if project is None:
            now = time.time()
            first_look_s = self.options.waiter_interval_s
            project = ProjectRecord(project_id, stage=1, started=now, stage_started=now)
            first = await self._new_job(project_id, 1, "project", {"streams": ["project"]})
            project.jobs, known[first.id] = [first.id], first
            await self.state.save_project(project)
        elif project.status == COMPLETE and project.failed:
            project = await self._retry_failed(project)
        elif project.status == "running" and project.stage == OLD_RETRY:
            # Left by an earlier version amid its retry stage: a retry pass of those jobs.
            project.failed = list(dict.fromkeys([*project.failed, *project.jobs]))
            project = await self._retry_failed(project)
        elif project.status != "running":
            return project
        for job_id in project.jobs:
            job = known.get(job_id) or await self.state.job(job_id)
            if job is not None and job.status not in TERMINAL_JOB:
                await self._dispatch(job)
        await self._dispatch_waiter(project, first_look_s)
        return project

    async def keep_waiting(self, project_id: int) -> None:
        """Make sure a running project has its waiter and its stage's jobs: a waiter chain
        whose last job gave up (its store was down for all its attempts) is started again, a
        lost job dispatched again. A live chain is not doubled: its next key is the one
        enqueued here."""
        project = await self.state.project(project_id)
        if project is None or project.status != "running":
            return
        jobs = [j for j in [await self.state.job(i) for i in project.jobs]
                if j is not None and j.status not in TERMINAL_JOB]
        pending = await self.dispatcher.pending([j.engine_key for j in jobs])
        for job in jobs:
            if job.engine_key in pending:
                continue
            again = await self.state.job(job.id)  # it may have finished since
            if again is not None and again.status not in TERMINAL_JOB:
                await self._dispatch(again)  # lost (the finish has no waiter to see it)
        if project.stage != FINISH:
            await self._dispatch_waiter(project)

    async def _retry_failed(self, project: ProjectRecord) -> ProjectRecord:
        """A finished project with failed jobs: a retry pass runs those again, each in its
        stage and in the stages' order, and after them the stages that derive their work from
        theirs (see ``planner.DERIVES_FROM``: a failed listing left the later fan-outs without
        its iid pages), then the finish again."""
        retrying = {}
        for job_id in project.failed:
            job = await self.state.job(job_id)
            if job is not None:
                retrying[job_id] = job.stage
        project.status, project.retrying, project.failed = "running", retrying, []
        first = retry_stages(set(retrying.values()), self.options.stage_kinds)[0]
        await self._enter(project, first)
        await self.state.save_project(project)
        return project

    async def _enter(self, project: ProjectRecord, stage: int) -> dict[str, JobRecord]:
        """Make ``stage`` the project's current one with its jobs queued (the caller saves
        the project and dispatches them); returns their records, as saved. A job of a stage
        entered again runs again."""
        project.stage, project.stage_started, project.waiter_gen = stage, time.time(), 0
        failed_stages = set(project.retrying.values())
        jobs = [j for j, s in project.retrying.items() if s == stage]
        known: dict[str, JobRecord] = {}
        if not project.retrying or rederived(stage, failed_stages):
            spec = BY_NUMBER[stage]
            main = await self._new_job(project.project_id, stage, spec.task,
                                       {"streams": list(spec.streams)})
            known[main.id] = main  # as _new_job found or saved it: not read again
            jobs += [] if main.id in jobs else [main.id]
        project.jobs = jobs
        queued: dict[str, JobRecord] = {}
        for job_id in jobs:
            job = known.get(job_id) or await self.state.job(job_id)
            if job is None:
                continue
            if job.status in TERMINAL_JOB:
                job.status, job.attempts, job.error, job.gen = QUEUED, 0, "", job.gen + 1
                await self.state.save_job(job)
            queued[job_id] = job
        return queued

    async def _new_job(self, project_id: int, stage: int, task: str, args: dict[str, Any],
                       suffix: str = "main") -> JobRecord:
        """The job's record: the stored one when it exists (a stage entered again, a page
        fanned out again), else a new one, saved before it is returned."""
        job_id = f"{project_id}:s{stage}:{suffix}"
        job = await self.state.job(job_id)
        if job is None:
            job = JobRecord(job_id, project_id, stage, task, args)
            await self.state.save_job(job)
        return job

    async def _dispatch(self, job: JobRecord) -> None:
        await self.dispatcher.enqueue(RUN_JOB, job.engine_key,
                                      {"job_id": job.id, "gen": job.gen}, job.not_before)

    async def _dispatch_waiter(self, project: ProjectRecord, delay_s: float = 0.0) -> None:
        key = f"wait:{project.project_id}:s{project.stage}:g{project.waiter_gen}"
        await self.dispatcher.enqueue(WAIT_STAGE, key, {"project_id": project.project_id,
                                                        "stage": project.stage},
                                      time.time() + delay_s if delay_s else 0.0)

    # -- the waiter ----------------------------------------------------------------------
    async def wait_stage(self, call: Call, kwargs: dict[str, Any]) -> None:
        """Advance the project when its stage finished, else look again a little later
        (a fresh key per generation) and re-dispatch jobs the engine lost."""
        project = await self.state.project(int(kwargs["project_id"]))
        if project is None or int(kwargs.get("stage", project.stage)) != project.stage:
            return  # the stage was advanced meanwhile (by its own job); its waiter is on
        if await self.state.fatal_recent():
            return
        decision = await self._decide(project)
        if decision.action == "wait":
            project.waiter_gen += 1
            await self.state.save_project(project)
            await self._dispatch_waiter(project, self.options.waiter_interval_s)
        elif decision.action == "advance":
            await self._advance(project, list(decision.failed))

    async def _decide(self, project: ProjectRecord) -> WaiterDecision:
        """The planner's decision on the project's stage; jobs the engine lost (confirmed by
        reading their records again: one may have finished between the two reads) are
        dispatched again."""
        jobs = await self.state.stage_jobs(project)
        keys = [j.engine_key for j in jobs.values() if j is not None]
        decision = decide(project, jobs, await self.dispatcher.pending(keys))
        for job_id in decision.redispatch:
            job = await self.state.job(job_id)
            if job is not None and job.status not in TERMINAL_JOB:
                log.warning("job_redispatched", job=job_id, reason="lost by the engine")
                self.metrics.backfill_jobs.labels("redispatched").inc()
                await self._dispatch(job)
        return decision

    async def _advance_after(self, job: JobRecord) -> None:
        """A stage's single job (no fan-out) advances its project itself, as seed 002's
        single-threaded stages schedule the next stage directly; fanned-out stages are
        advanced by their waiter."""
        if job.children:
            return
        project = await self.state.project(job.project_id)
        if (project is None or project.status != "running" or project.stage != job.stage
                or project.jobs != [job.id]):
            return
        # The stage's only job, just saved as finished: the decision needs no other record.
        decision = decide(project, {job.id: job}, ())
        if decision.action == "advance":
            await self._advance(project, list(decision.failed), fresh=True)

    async def _advance(self, project: ProjectRecord, failed: list[str],
                       fresh: bool = False) -> None:
        """Enter the project's next stage. ``fresh``: ``project`` was read just before with no
        store or engine call since (else it is read again: another waiter may have advanced
        it meanwhile)."""
        if not fresh:
            latest = await self.state.project(project.project_id)
            if latest is None or latest.status != "running" or latest.stage != project.stage:
                return  # gone meanwhile, or another waiter advanced it
            project = latest
        now = time.time()
        took = now - project.stage_started
        if project.retrying:  # a retry pass: its stages' time together
            took += project.stage_durations.get(RETRY_LABEL, 0.0)
        name = RETRY_LABEL if project.retrying else STAGE_NAMES[project.stage]
        project.stage_durations[name] = round(took, 3)
        self.metrics.backfill_stage_duration.labels(name).observe(now - project.stage_started)
        project.all_jobs += [j for j in project.jobs if j not in project.all_jobs]
        project.failed += [j for j in failed if j not in project.failed]
        kinds = self.options.stage_kinds
        nxt = (next_retry_stage(project.stage, set(project.retrying.values()), kinds)
               if project.retrying else next_stage(project.stage, kinds))
        queued = await self._enter(project, nxt)
        await self.state.save_project(project)
        log.info("stage_started", project_id=project.project_id, stage=STAGE_NAMES[nxt],
                 retry=bool(project.retrying))
        for job_id in project.jobs:
            # The records _enter saved queued: no read again (a job runs only once its
            # stage is saved, and its handler checks its record's status and generation).
            job = queued.get(job_id)
            if job is not None:
                await self._dispatch(job)
        if nxt != FINISH:
            # Its jobs just started: the first look is one interval away (a single job
            # advances the project itself, the waiter then only backs it up).
            await self._dispatch_waiter(project, self.options.waiter_interval_s)

    # -- running a job -------------------------------------------------------------------
    async def run_job(self, call: Call, kwargs: dict[str, Any]) -> None:
        job = await self.state.job(str(kwargs["job_id"]))
        if job is None or job.status in TERMINAL_JOB or job.gen != int(kwargs["gen"]):
            return  # finished already, or an older generation of a rescheduled job
        if await self.state.fatal_recent():
            return  # the import stopped (401); the job stays queued for the next run
        job.attempts += 1
        self.metrics.backfill_jobs_running.inc()
        try:
            outcome = await self._run(call, job)
        except Exception:
            self.metrics.backfill_jobs.labels("retried").inc()
            raise
        finally:
            self.metrics.backfill_jobs_running.dec()
        self.metrics.backfill_jobs.labels(outcome).inc()
        if outcome in ("done", "failed") and job.task != "finish":
            await self._advance_after(job)

    async def _run(self, call: Call, job: JobRecord) -> str:
        """Run the job's task; returns its outcome (raises for the engine to retry)."""
        progress = Progress()
        executor = Executor(self.client, self.deliverer, self.options.kinds, call.heartbeat,
                            find_uploads=self.options.attachments,
                            on_delivered=KeyIndex(self.state.store).record)
        users = UserCache(self.state.store, executor, self.options.user_ttl_s,
                          self._user_lookups)
        positions = JobPositions(job, self.state, users, progress)
        try:
            try:
                await self._tasks[job.task](job, positions)
            except BaseException:
                # What was delivered before a failure is kept (positions with their counts).
                with contextlib.suppress(StoreError, GitLabError, DeliveryError):
                    await positions.flush()
                raise
            # Done: its last positions, counts and status in one write, after its users.
            was = job.status, job.error
            job.status, job.error = DONE, ""
            try:
                await positions.flush()
            except BaseException:
                job.status, job.error = was  # not done: handled below as any failure
                raise
        except ProjectGone:
            await self._project_gone(job)
            return "done"
        except RetriesExhaustedError as exc:
            if exc.status != 429:
                return await self._failure(job, exc, call)
            await self._reschedule(job, exc.retry_in_s)
            return "rescheduled"
        except FatalGitLabError:  # 401: the token itself (a 403 is ForbiddenError)
            reason = f"GitLab answered 401 (job {job.id}): check GITLAB_PRIVATE_TOKEN"
            log.error("import_stopped", reason=reason)
            await self.state.set_fatal(reason)
            return "stopped"
        except (GitLabError, DeliveryError, StoreError, ValueError) as exc:
            return await self._failure(job, exc, call)
        except Exception as exc:  # a bug or an answer we do not understand: same policy
            log.exception("job_error", job=job.id)
            return await self._failure(job, exc, call)
        return "done"

    async def _failure(self, job: JobRecord, exc: Exception, call: Call) -> str:
        if not call.last_attempt:
            raise exc  # the engine retries it with backoff
        job.status, job.error = FAILED, str(exc)[:500] or type(exc).__name__
        await self.state.save_job(job)
        log.error("job_failed", job=job.id, attempts=job.attempts, error=job.error)
        return "failed"

    async def _reschedule(self, job: JobRecord, retry_in_s: float | None) -> None:
        import random

        delay = retry_in_s if retry_in_s is not None else backoff_s(job.gen + 1,
                                                                    random.Random())
        job.gen += 1
        job.not_before = time.time() + min(MAX_RESCHEDULE_S, max(0.0, delay))
        await self.state.save_job(job)
        log.info("job_rescheduled", job=job.id, reason="429", in_s=round(delay, 3))
        await self._dispatch(job)

    async def _project_gone(self, job: JobRecord) -> None:
        job.status = DONE
        await self.state.save_job(job)
        project = await self.state.project(job.project_id)
        if project is not None and project.status == "running":
            project.status, project.finished = GONE, time.time()
            project.error = "404: the project was deleted during the import"
            await self.state.save_project(project)
            log.warning("project_gone", project_id=job.project_id)
            if self.on_project_end is not None:
                self.on_project_end(project)

    # -- tasks ---------------------------------------------------------------------------
    async def _read(self, job: JobRecord, positions: JobPositions, name: str,
                    scope: Scope, on_page: Any = None) -> bool:
        """Read one stream to the end; False when GitLab refused it (403: switched off)."""
        spec = stream(name)
        stream_id = name if not scope.parent else f"{name}:{scope.parent}:{scope.parent_iid}"
        try:
            await positions.executor.read(spec, scope, positions.progress, positions,
                                          stream_id, on_page)
        except ForbiddenError:
            if spec.kind not in job.skipped:
                job.skipped.append(spec.kind)
            await positions.save_position(stream_id, {"done": True, "refused": 403})
            return False
        except NotFoundError:
            await self._check_project(job.project_id)
            if not scope.parent:
                raise
            job.gone += 1  # the parent was deleted meanwhile
            await positions.save_position(stream_id, {"done": True, "gone": True})
        return True

    async def _check_project(self, project_id: int) -> None:
        try:
            await self.client.get(f"projects/{project_id}", None, "project")
        except NotFoundError:
            raise ProjectGone(project_id) from None

    def _wanted(self, name: str) -> bool:
        kind = stream(name).kind
        wanted = self.options.kinds
        return kind in wanted or (name == "discussions" and "notes" in wanted)

    async def _project(self, job: JobRecord, positions: JobPositions) -> None:
        if positions.position("project") is not None:
            return
        try:
            item = await positions.executor.read_one(stream("project"), Scope(job.project_id),
                                                     positions.progress)
        except NotFoundError:
            raise ProjectGone(job.project_id) from None
        namespace = item.get("namespace") or {}
        if namespace.get("kind") == "group" and "groups" in self.options.kinds:
            parts = str(namespace.get("full_path", "")).split("/")
            for depth in range(1, len(parts) + 1):
                await positions.executor.read_one(
                    stream("group"), Scope(job.project_id), positions.progress,
                    {"group": "/".join(parts[:depth])})
        await positions.save_position("project", {"done": True})

    async def _streams(self, job: JobRecord, positions: JobPositions) -> None:
        for name in job.args.get("streams", []):
            if self._wanted(name):
                await self._read(job, positions, name, Scope(job.project_id))

    async def _fan_out(self, job: JobRecord, positions: JobPositions, parent: str,
                       pages: list[list[int]], streams: list[str], label: str) -> None:
        wanted = [s for s in streams if self._wanted(s)]
        if not wanted:
            return
        for iids in pages:
            if not iids:
                continue
            child = await self._new_job(job.project_id, job.stage, "children",
                                        {"parent": parent, "iids": iids, "streams": wanted},
                                        f"{label}:{parent}:i{iids[0]}")
            if child.id not in job.children:
                job.children.append(child.id)
                await positions.flush()  # the child is announced with what was read so far
                await self._dispatch(child)

    async def _list_parents(self, job: JobRecord, positions: JobPositions, parent: str,
                            child_streams: list[str]) -> None:
        pages = await self.state.iid_pages(job.project_id, parent)
        known = {p[0] for p in pages if p}

        async def on_page(items: list[dict[str, Any]]) -> None:
            iids = [int(i["iid"]) for i in items if isinstance(i.get("iid"), int)]
            if iids and iids[0] not in known:
                known.add(iids[0])
                pages.append(iids)
                await self.state.save_iid_pages(job.project_id, parent, pages)
            await self._fan_out(job, positions, parent, [iids], child_streams, "page")

        await self._read(job, positions, parent, Scope(job.project_id), on_page)

    async def _list_merge_requests(self, job: JobRecord, positions: JobPositions) -> None:
        await self._list_parents(job, positions, "merge_requests", ["merge_request_commits"])

    async def _list_issues(self, job: JobRecord, positions: JobPositions) -> None:
        await self._list_parents(job, positions, "issues", ["discussions"])
        if self._wanted("discussions"):
            mr_pages = await self.state.iid_pages(job.project_id, "merge_requests")
            await self._fan_out(job, positions, "merge_requests", mr_pages, ["discussions"],
                                "page")

    async def _fan_out_events(self, job: JobRecord, positions: JobPositions) -> None:
        events = ["resource_state_events", "resource_label_events",
                  "resource_milestone_events"]
        for parent in ("issues", "merge_requests"):
            pages = await self.state.iid_pages(job.project_id, parent)
            await self._fan_out(job, positions, parent, pages, events, "page")

    async def _children(self, job: JobRecord, positions: JobPositions) -> None:
        parent = str(job.args["parent"])
        for iid in job.args["iids"]:
            for name in job.args["streams"]:
                await self._read(job, positions, name, Scope(job.project_id, parent, int(iid)))

    async def _attachments(self, job: JobRecord, positions: JobPositions) -> None:
        """Store every upload linked in the project's markdown under
        ``<project_id>/uploads/<secret>/<name>`` and announce it on the artifact topic."""
        project = await self.state.project(job.project_id)
        if project is None or self.artifacts is None:
            return
        linked = sorted({ref for j in await self.state.project_jobs(project)
                         for ref in j.uploads})
        for ref in linked:
            stream_id = f"upload:{ref}"
            if positions.position(stream_id) is None:
                await self._store_upload(job, positions, ref)
                await positions.save_position(stream_id, {"done": True})

    async def _store_upload(self, job: JobRecord, positions: JobPositions, ref: str) -> None:
        store, pid = self.artifacts, job.project_id
        assert store is not None
        secret, _, written = ref.partition("/")
        name = unquote(written)
        try:
            stored = await store.find_upload(pid, secret, name)
            if stored is None:
                writer = await self.client.download(
                    f"projects/{pid}/uploads/{secret}/{quote(name, safe='')}", None,
                    "projects/:id/uploads/:secret/:filename",
                    lambda: store.open_upload_writer(pid, secret, name))
                stored = await writer.commit()
                await self.deliverer.sink.send([Message(
                    str(pid).encode(),
                    orjson.dumps({"project_id": pid, "kind": "upload", "path": stored.path,
                                  "size": stored.size, "sha256": stored.sha256,
                                  "url": stored.url}),
                    (("source", self.deliverer.source.encode()),),
                    topic=self.options.artifact_topic)])
        except UnsafePathError as exc:
            log.warning("upload_refused", project_id=pid, reason=str(exc))
            return
        except NotFoundError:
            job.gone += 1  # deleted since it was linked
            return
        positions.progress.fetched["uploads"] += 1
        positions.progress.imported["uploads"] += 1

    async def _finish(self, job: JobRecord, positions: JobPositions) -> None:
        project = await self.state.project(job.project_id)
        if project is None or project.status != "running":
            return
        summary = await project_summary(self.state, project)
        now = time.time()
        project.status, project.finished, project.retrying = COMPLETE, now, {}
        project.all_jobs.append(job.id)
        await self.state.save_project(project)
        if self.on_project_end is not None:
            self.on_project_end(project)
        log.info("project_import_finished", message="GitLab project import finished",
                 duration_s=round(now - project.started, 2),
                 objects_imported={"fetched": summary["fetched"],
                                   "imported": summary["imported"]},
                 import_source="gitlab", project_id=project.project_id,
                 import_stage="finish", failed_jobs=len(project.failed),
                 skipped_kinds=summary["skipped_kinds"])
