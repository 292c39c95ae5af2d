"""``gitlab-producer backfill``, ``worker`` and ``status``: wiring of the store, sink, client,
deliverer and engine around the :class:`Importer`.

``backfill`` discovers the projects, starts (or resumes) each from its durable state, works
itself (an in-process SAQ worker with Redis, the in-process dispatcher without), and exits when
every project is complete or gone: 0 when nothing failed, 1 when some job failed after its
attempts (the next run retries it) or the import stopped (401).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter, deque
from typing import Any

import orjson

from gitlab_producer.config import ConfigError, Settings, split_list
from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.connect import client_from_settings
from gitlab_producer.gitlab.errors import GitLabError
from gitlab_producer.http.ops import OpsState, reachability_checks, start_ops
from gitlab_producer.logs import CONTROL, get_logger
from gitlab_producer.metrics import Metrics
from gitlab_producer.objects.delivery import ObjectDeliverer
from gitlab_producer.objects.discovery import UnknownProject, discover
from gitlab_producer.objects.engine import LocalDispatcher, SaqDispatcher, stop_at_once
from gitlab_producer.objects.planner import stages_for
from gitlab_producer.objects.progress import Snapshot, open_view
from gitlab_producer.objects.stages import Importer, ImportOptions
from gitlab_producer.objects.state import TERMINAL_PROJECT, Plan, ProjectRecord, StateStore
from gitlab_producer.objects.status import project_summary
from gitlab_producer.sinks import Sink, open_sink
from gitlab_producer.startup import Ports, service_ports, start_checks
from gitlab_producer.store import Store, StoreError, open_store
from gitlab_producer.store.retrying import until_the_store_answers
from gitlab_producer.tasks import Stopped, cancel_and_wait, unless_stopped

log = get_logger(__name__)
POLL_S = 0.5
SUPERVISE_EVERY_S = 30.0  # how often backfill restarts a waiter chain that gave up
PROJECTS_PER_SLOT = 4  # projects running at once per job slot (BACKFILL_CONCURRENCY)
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class ProjectWindow:
    """The projects of a backfill in three sets: waiting to start, running, finished (id ->
    status, failed jobs). At most ``limit`` run at once, so that the work queued, the waiters
    and the progress reads follow the concurrency, not the instance's size."""

    def __init__(self, projects: list[int], limit: int) -> None:
        self.total = len(projects)
        self.limit = max(1, limit)
        self.waiting: deque[int] = deque(projects)
        self.running: set[int] = set()
        self.finished: dict[int, tuple[str, int]] = {}
        self.changed = asyncio.Event()  # a project ended

    async def top_up(self, importer: Importer) -> None:
        """Start (or resume) waiting projects while fewer than ``limit`` run."""
        while self.waiting and len(self.running) < self.limit:
            project = await importer.start_project(self.waiting.popleft())
            if project.status in TERMINAL_PROJECT:
                self.finished[project.project_id] = (project.status, len(project.failed))
            else:
                self.running.add(project.project_id)

    @property
    def all_finished(self) -> bool:
        return len(self.finished) == self.total

    def ended(self, project: ProjectRecord) -> None:
        """``project`` is complete or gone (read here, or told by this process's importer)."""
        self.running.discard(project.project_id)
        self.finished[project.project_id] = (project.status, len(project.failed))
        self.changed.set()


async def _first(*events: asyncio.Event) -> None:
    """Until one of ``events`` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


class Backfill:
    """One backfill, worker or status process."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.stop = asyncio.Event()
        for secret in settings.secrets():
            CONTROL.add_secret(secret)

    def _client(self) -> GitLabClient:
        # One budget with the event rounds (shared in Redis by every instance).
        # rate_limit_retries=0: a 429 surfaces at once, and the job is rescheduled to GitLab's
        # reset time instead of holding a worker slot while it sleeps.
        return client_from_settings(self.settings, self.metrics,
                                    max_connections=max(4, self.settings.backfill_concurrency + 2),
                                    rate_limit_retries=0)

    def _saq(self) -> SaqDispatcher:
        s = self.settings
        host, port, password = s.redis_endpoint
        return SaqDispatcher(f"redis://{host}:{port}/{s.redis_db}",
                             f"{s.redis_key_prefix}backfill", s.redis_key_prefix,
                             s.backfill_job_timeout, s.backfill_job_attempts,
                             s.backfill_job_heartbeat, password)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop.set)

    async def _serve_ops(self, ports: Ports, client: GitLabClient, store: Store, sink: Sink
                         ) -> list[Any]:
        """Metrics, health and readiness on METRICS_PORT, the log level on LOG_PORT (0: off;
        give each process on one machine its own ports)."""
        s = self.settings
        checks = reachability_checks(lambda: client.reachable, store, sink)
        state = OpsState(self.metrics, CONTROL, checks, s.log_level_token.get_secret_value())
        return await start_ops(state, ports, s.metrics_port, s.metrics_url, s.log_port)

    async def _importer(self, store: Store, client: GitLabClient, dispatcher: Any,
                        kinds: frozenset[str]) -> Importer:
        s = self.settings
        sink = open_sink(s, f"{s.kafka_object_topic_prefix}.objects")
        deliverer = ObjectDeliverer(store, sink, s.kafka_object_topic_prefix, s.instance,
                                    s.object_version_ttl, metrics=client.metrics)
        options = ImportOptions(kinds, s.backfill_waiter_interval, s.user_cache_ttl,
                                s.backfill_attachments, s.artifact_topic)
        artifacts = None
        if s.backfill_attachments:
            from gitlab_producer.artifact_store import ArtifactStore

            artifacts = ArtifactStore(s.artifact_store_url)
        return Importer(StateStore(store), client, deliverer, dispatcher, options, artifacts)

    # -- backfill ------------------------------------------------------------------------
    def _start(self, ports: Ports) -> Store:
        """The store, once the start-up checks passed (``ports`` released if it fails)."""
        try:
            return open_store(self.settings)
        except ConfigError:
            ports.close()
            raise

    async def run(self) -> int:
        s = self.settings
        self._install_signals()
        ports = await start_checks(s, service_ports(s, webhooks=False))
        store = self._start(ports)
        client = self._client()
        state = StateStore(store)
        saq = self._saq() if s.redis_address else None
        dispatcher: SaqDispatcher | LocalDispatcher = saq or LocalDispatcher(
            concurrency=s.backfill_concurrency, max_attempts=s.backfill_job_attempts)
        try:
            importer = await self._importer(store, client, dispatcher, s.object_kinds)
        except ConfigError:  # OUTPUT_FILE
            ports.close()
            await client.aclose()
            await store.close()
            raise
        runners: list[Any] = []
        try:
            runners = await self._serve_ops(ports, client, store, importer.deliverer.sink)
            try:
                projects = await discover(client, split_list(s.backfill_projects))
            except UnknownProject as exc:
                print(f"config error: {exc}", file=sys.stderr)
                return EXIT_CONFIG
            except GitLabError as exc:
                log.error("backfill_failed", reason=f"listing projects: {exc}")
                return EXIT_FAILED
            try:
                plan = await state.plan()
                started = plan.started if plan is not None else time.time()
                await state.save_plan(Plan(projects, sorted(s.object_kinds), started))
                await state.clear_fatal()
            except StoreError as exc:  # a one-off run: fails as a GitLab unreachable does
                log.error("backfill_failed", reason=f"the store: {exc}")
                return EXIT_FAILED
            log.info("backfill_started", projects=len(projects), kinds=sorted(s.object_kinds),
                     engine="saq" if saq else "in-process", store="redis" if saq else "sqlite")
            if saq is not None:
                await saq.connect()
            return await self._work_until_done(state, projects, importer, dispatcher)
        finally:
            ports.close()
            for runner in runners:
                await runner.cleanup()
            await importer.deliverer.sink.close()
            await client.aclose()
            if saq is not None:
                await saq.close()
            await store.close()

    async def _work_until_done(self, state: StateStore, projects: list[int], importer: Importer,
                               dispatcher: SaqDispatcher | LocalDispatcher) -> int:
        s = self.settings
        worker_stop = asyncio.Event()
        if isinstance(dispatcher, LocalDispatcher):
            dispatcher.handlers.update(importer.handlers)
            serving: asyncio.Task[Any] = asyncio.create_task(dispatcher.run(worker_stop))
        else:
            worker = dispatcher.worker(importer.handlers, s.backfill_concurrency)
            serving = asyncio.create_task(worker.start())
        view = open_view(len(projects), stages_for(importer.options.stage_kinds))
        window = ProjectWindow(projects, PROJECTS_PER_SLOT * s.backfill_concurrency)
        importer.on_project_end = window.ended  # a project finished here frees its slot at once
        started = last_supervision = time.monotonic()
        shown = -POLL_S
        finished = False
        try:
            while True:
                await window.top_up(importer)
                if serving.done():
                    serving.result()  # a crashed worker is an error, not a hang
                    return EXIT_FAILED
                if time.monotonic() - shown >= POLL_S or window.all_finished:
                    shown = time.monotonic()
                    fatal = await state.fatal()
                    if fatal:
                        print(f"backfill stopped: {fatal}", file=sys.stderr)
                        return EXIT_FAILED
                    snapshot = await self._progress(state, window)
                    snapshot.imported_here = importer.deliverer.imported
                    snapshot.elapsed_s = time.monotonic() - started
                    finished = snapshot.done == len(projects)
                    view.show(snapshot, final=finished)
                    if finished:
                        log.info("backfill_finished", projects=len(projects),
                                 failed_jobs=snapshot.failed_jobs)
                        return EXIT_FAILED if snapshot.failed_jobs else EXIT_OK
                if self.stop.is_set():
                    log.info("backfill_interrupted", projects_done=len(window.finished))
                    return EXIT_FAILED
                if time.monotonic() - last_supervision >= SUPERVISE_EVERY_S:
                    last_supervision = time.monotonic()
                    for pid in sorted(window.running):
                        await importer.keep_waiting(pid)
                window.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_first(self.stop, window.changed), POLL_S)
        finally:
            worker_stop.set()
            if isinstance(dispatcher, LocalDispatcher):
                await serving
            else:
                # Every project ended: none of this import's jobs is in flight here.
                await (stop_at_once(worker) if finished else worker.stop())
                await cancel_and_wait(serving)

    async def _progress(self, state: StateStore, window: ProjectWindow) -> Snapshot:
        """Where the projects stand: only the running ones are read (a finished one is not
        read again, one not started yet is at the first stage). The projects gauge follows."""
        snapshot = Snapshot(window.total)
        for pid in sorted(window.running):
            project = await state.project(pid)
            if project is None or project.status not in TERMINAL_PROJECT:
                snapshot.at_stage[project.stage if project is not None else 1] += 1
                continue
            window.ended(project)
        snapshot.at_stage[1] += len(window.waiting)
        finished = window.finished
        snapshot.done = len(finished)
        snapshot.failed_jobs = sum(failed for _status, failed in finished.values())
        ended = Counter(status for status, _failed in finished.values())
        gauge = self.metrics.backfill_projects
        gauge.labels("running").set(window.total - snapshot.done)
        for status in TERMINAL_PROJECT:
            gauge.labels(status).set(ended[status])
        return snapshot

    # -- worker --------------------------------------------------------------------------
    async def work(self) -> int:
        """Serve the engine's jobs until SIGTERM (any number of these share one Redis)."""
        # Imported here: the worker's parts (the instance registry, the shared rounds' jobs)
        # cost a backfill's start-up some 0.1 s of imports it never uses.
        from gitlab_producer.instances import heartbeat, registry_for
        from gitlab_producer.sync.shared_rounds import round_jobs_served

        s = self.settings
        if not s.redis_address:
            raise ConfigError("REDIS_ADDRESS: the worker serves jobs from Redis; without it, "
                              "`gitlab-producer backfill` runs the whole import in one process")
        self._install_signals()
        ports = await start_checks(s, service_ports(s, webhooks=False))
        store = self._start(ports)
        client = self._client()
        saq = self._saq()
        importer: Importer | None = None
        try:
            # A Redis not answering yet (restarting, or started after the workers) is waited
            # for, as the service's rounds wait for it; a stop signal meanwhile ends it.
            plan = await unless_stopped(until_the_store_answers(
                "backfill_plan", StateStore(store).plan, self.metrics), self.stop)
            kinds = frozenset(plan.kinds) if plan is not None else s.object_kinds
            importer = await self._importer(store, client, saq, kinds)
            await saq.connect()
            runners = await self._serve_ops(ports, client, store, importer.deliverer.sink)
        except BaseException as exc:
            if importer is not None:
                await importer.deliverer.sink.close()
            await client.aclose()
            await saq.close()
            await store.close()
            if isinstance(exc, Stopped):
                log.info("worker_stopped", detail="stopped while waiting for the store")
                return 0
            raise
        finally:
            ports.close()
        worker = saq.worker(importer.handlers, s.backfill_concurrency)
        serving = asyncio.create_task(worker.start())
        log.info("worker_started", concurrency=s.backfill_concurrency)
        registry = registry_for(store, s.redis_key_prefix, self.metrics, s.operations_per_second)
        try:
            # The shared polling rounds' jobs too (sync/shared_rounds.py).
            async with heartbeat(registry, self.stop), \
                    round_jobs_served(s, store, self.metrics):
                await asyncio.wait({serving, asyncio.create_task(self.stop.wait())},
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            await worker.stop()
            await cancel_and_wait(serving)
            for runner in runners:
                await runner.cleanup()
            await importer.deliverer.sink.close()
            await client.aclose()
            await saq.close()
            await store.close()
        return EXIT_OK

    # -- status --------------------------------------------------------------------------
    async def status(self) -> int:
        """One JSON line per project, then a summary line; 1 when the store does not answer."""
        (await start_checks(self.settings)).close()
        store = open_store(self.settings)
        state = StateStore(store)
        try:
            return await self._status(state)
        except StoreError as exc:
            print(f"store unreachable: {exc}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            await store.close()

    async def _status(self, state: StateStore) -> int:
        plan = await state.plan()
        if plan is None:
            print(orjson.dumps({"backfill": "never started"}).decode())
            return EXIT_OK
        totals: dict[str, int] = {"projects": len(plan.projects), "complete": 0,
                                  "gone": 0, "running": 0, "failed_jobs": 0}
        hits = requests = 0
        for pid in plan.projects:
            project = await state.project(pid)
            if project is None:
                print(orjson.dumps({"project_id": pid, "status": "not started"}).decode())
                continue
            summary = await project_summary(state, project)
            print(orjson.dumps(summary).decode())
            totals[project.status] = totals.get(project.status, 0) + 1
            totals["failed_jobs"] += len(summary["failed_jobs"])
            hits += summary["user_lookups"]["cached"]
            requests += summary["user_lookups"]["requested"]
        fatal = await state.fatal()
        print(orjson.dumps({**totals, "kinds": plan.kinds, "stopped": fatal or None,
                            "user_cache_hit_ratio": round(hits / (hits + requests), 3)
                            if hits + requests else None}).decode())
        return EXIT_OK
