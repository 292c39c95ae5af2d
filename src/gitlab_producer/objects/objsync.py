"""Keeping objects current after the backfill (``SYNC_OBJECTS``), beside the event rounds.

After each event round, :meth:`ObjectSync.round` reads again what changed, through the same
stream table, executor, deliverer (``op=update``) and stores as the backfill:

- projects to look at: those GitLab lists with ``last_activity_after`` the last object round
  (minus GitLab's lag and the overlap) whose ``last_activity_at`` moved since this pass last
  saw it, and those the event stream or webhooks named. An idle round costs only that listing.
- per project and stream a watermark on ``updated_at`` (``os:wm:<project>:<stream>``, GitLab's
  time): ``updated_after`` windows from the watermark minus ``SYNC_OVERLAP`` to the round's
  start; the watermark moves to the window's end only when every record of the window, and the
  children it called for, were delivered.
- children without a time filter (threads and their notes, resource events, merge request
  commits) are read again when their parent changed (:func:`incremental.changed`); open merge
  requests' commits whenever they are listed.
- objects named by an event or a webhook (issue 5) are read at once with their children.
- every ``OBJECT_SWEEP_INTERVAL`` (0: every round) a sweep lists every project's streams whole:
  version marks produce only what changed (also a change that moved no timestamp that the
  windows saw), and keys produced before but no longer listed get a tombstone (null value,
  ``op=delete``), for threads and notes too when their parent is read again or deleted.
- a project answering 404 for ``GONE_AFTER_S`` (the event path's rule) has every key of the
  index tombstoned, its own too, and is forgotten (``os:gone:<project>``); a 403 never does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from gitlab_producer.config import Settings
from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.errors import (
    ForbiddenError,
    GitLabError,
    NotFoundError,
)
from gitlab_producer.gitlab.events import Event
from gitlab_producer.logs import get_logger
from gitlab_producer.objects import incremental as rules
from gitlab_producer.objects.delivery import Delivered, ObjectDeliverer
from gitlab_producer.objects.executor import Executor, Progress
from gitlab_producer.objects.keyindex import CHILD_KINDS, TOP_KINDS, KeyIndex
from gitlab_producer.objects.marks import hook_marks, marks_of
from gitlab_producer.objects.records import ObjectRecord, content_hash
from gitlab_producer.objects.state import GONE as IMPORT_GONE
from gitlab_producer.objects.state import Plan, StateStore
from gitlab_producer.objects.streams import Paging, Scope, Stream, stream
from gitlab_producer.objects.users import UserCache
from gitlab_producer.sinks.base import DeliveryError, Sink
from gitlab_producer.store.base import Store, StoreError
from gitlab_producer.sync.retries import GONE_AFTER_S

log = get_logger(__name__)
LAST_ROUND = "os:last_round"
LAST_SWEEP = "os:last_sweep"
RETRY = "os:retry"
# A project answering 404: since when (GitLab's clock), or GONE_DONE once its keys were
# tombstoned (``os:gone:<project>``).
GONE = "os:gone:"
GONE_DONE = "tombstoned"
# A tombstone's version: the content hash of its empty value (its mark ``<key>@<that>``).
TOMBSTONE = content_hash(b"")


@dataclass(frozen=True)
class SyncOptions:
    kinds: frozenset[str]
    overlap_s: float
    project_lag_s: float
    sweep_interval_s: float
    concurrency: int
    user_ttl_s: int
    only_planned: bool = False  # BACKFILL_PROJECTS set: only the projects it names


@dataclass
class RoundOutcome:
    """What one object round did."""

    ok: bool = True
    sweep: bool = False
    projects: int = 0
    produced: int = 0
    deleted: int = 0
    failed: list[int] = field(default_factory=list)


class NoPositions:
    """An incremental read always starts at its first page (windows are short)."""

    def position(self, stream_id: str) -> Mapping[str, Any] | None:
        return None

    async def save_position(self, stream_id: str, position: Mapping[str, Any]) -> None:
        return None


@dataclass
class Collected:
    """What a read listed: the keys, the keys produced now, and per child kind the keys."""

    keys: set[str] = field(default_factory=set)
    fresh: set[str] = field(default_factory=set)
    dead: set[str] = field(default_factory=set)  # keys tombstoned before (set by the reader)
    back: dict[str, ObjectRecord] = field(default_factory=dict)  # dead keys listed again
    children: dict[str, set[str]] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)

    async def on_delivered(self, spec: Stream, scope: Scope, records: list[ObjectRecord],
                           delivered: Delivered) -> None:
        self.fresh |= delivered.fresh
        for r in records:
            if scope.parent and r.kind in CHILD_KINDS:
                self.children.setdefault(r.kind, set()).add(r.key)
            elif r.kind == spec.kind:
                self.keys.add(r.key)
                if r.key in self.dead and r.raw is not None:
                    self.back[r.key] = r

    async def on_page(self, items: list[dict[str, Any]]) -> None:
        self.items.extend(items)


class ObjectSync:
    """The object rounds of ``gitlab-producer run`` with ``SYNC_OBJECTS=true``."""

    def __init__(self, client: GitLabClient, store: Store, deliverer: ObjectDeliverer,
                 options: SyncOptions, stop: asyncio.Event | None = None) -> None:
        self.client = client
        self.store = store
        self.deliverer = deliverer
        self.options = options
        self.stop = stop or asyncio.Event()
        self.index = KeyIndex(store)
        self.state = StateStore(store)
        self.marked: dict[int, set[tuple[str, int]]] = {}  # named by events and webhooks
        self._plan: Plan | None = None  # the import's plan as last read from the store

    # -- marks ---------------------------------------------------------------------------
    def mark(self, found: tuple[int, str, int] | None) -> None:
        """Remember that ``(project, parent, iid)`` changed (``parent`` empty: the project)."""
        if found is None:
            return
        pid, parent, iid = found
        named = self.marked.setdefault(pid, set())
        if parent:
            named.add((parent, iid))

    def note_events(self, events: Sequence[Event]) -> None:
        """The event round's delivered events: mark what they name."""
        for event in events:
            if event.project_id is not None:
                self.mark(marks_of(event.raw))

    def note_hook(self, payload: Mapping[str, Any]) -> None:
        self.mark(hook_marks(payload))

    # -- a round -------------------------------------------------------------------------
    async def round(self) -> RoundOutcome:
        """One object round; never raises GitLab, store or sink failures (they fail it)."""
        outcome = RoundOutcome()
        started = time.monotonic()
        requests_before = self._requests()
        try:
            await self._round(outcome)
        except (GitLabError, StoreError, DeliveryError) as exc:  # the listing, round state
            outcome.ok = False
            log.warning("object_round_failed", error=f"{type(exc).__name__}: {exc}")
        log.info("object_round_finished", ok=outcome.ok, sweep=outcome.sweep,
                 projects=outcome.projects, produced=outcome.produced,
                 deleted=outcome.deleted, failed_projects=outcome.failed[:20],
                 duration_s=round(time.monotonic() - started, 3),
                 requests=self._requests() - requests_before)
        return outcome

    def _requests(self) -> int:
        """GitLab requests this process made so far (the round's cost is the difference)."""
        return int(sum(sample.value for metric in self.client.metrics.gitlab_requests.collect()
                       for sample in metric.samples if sample.name.endswith("_total")))

    async def _round(self, outcome: RoundOutcome) -> None:
        plan = await self.state.plan()
        if plan is None and self._plan is not None:
            # The store lost its state (a Redis restarted without persistence, or flushed):
            # carry on with the plan this process knows; the next round sweeps, and what the
            # lost version marks kept from Kafka is produced again (as events are).
            log.error("object_sync_state_lost", detail="the store lost the import's plan, "
                      "watermarks and version marks; objects are swept and produced again")
            plan = self._plan
            await self.state.save_plan(plan)
        if plan is None:
            return
        self._plan = plan
        round_start = self.client.clock.now()
        last_round = await self._float(LAST_ROUND)
        last_sweep = await self._float(LAST_SWEEP)
        outcome.sweep = rules.sweep_due(last_sweep, round_start, self.options.sweep_interval_s)
        base = last_round if last_round is not None else plan.started
        active = await self._active(base, set(plan.projects) if outcome.sweep else None)
        marked, self.marked = self.marked, {}
        retry = await self._retries()
        # Projects the backfill did not import: new ones (read whole from their start), unless
        # BACKFILL_PROJECTS chose the projects.
        known = set(plan.projects) | (set() if self.options.only_planned else set(active))
        todo = sorted((known if outcome.sweep else {*active, *marked} & known) | set(retry))
        outcome.projects = len(todo)
        slots = asyncio.Semaphore(self.options.concurrency)
        failed: dict[int, bool] = {}
        succeeded: set[int] = set()

        async def one(pid: int) -> None:
            sweep = outcome.sweep or retry.get(pid, False)
            async with slots:
                if self.stop.is_set():
                    outcome.ok = False
                    return
                try:
                    produced, deleted = await self._project(pid, round_start, sweep,
                                                            marked.get(pid, set()))
                    if pid in active:
                        await self.store.set_meta(f"os:act:{pid}", active[pid])
                except Exception as exc:  # one project's failure never stops the others
                    outcome.ok = False
                    outcome.failed.append(pid)
                    failed[pid] = sweep  # read again next round, as far as it was to be read
                    self.marked.setdefault(pid, set()).update(marked.get(pid, set()))
                    expected = isinstance(exc, GitLabError | StoreError | DeliveryError)
                    log.warning("object_project_failed", project_id=pid,
                                error=f"{type(exc).__name__}: {exc}", exc_info=not expected)
                    return
                succeeded.add(pid)
                outcome.produced += produced
                outcome.deleted += deleted

        async with asyncio.TaskGroup() as group:
            for pid in todo:
                group.create_task(one(pid))
        # Failed projects are kept for the next rounds (a sweep's as a sweep of that project),
        # so that one bad project neither holds the round's base back nor repeats the sweep
        # of every other project.
        left = {p: f for p, f in retry.items() if p not in succeeded} | failed
        if left or retry:
            await self.store.set_meta(RETRY, orjson.dumps(
                {str(p): f for p, f in sorted(left.items())}).decode())
        if not self.stop.is_set():
            await self.store.set_meta(LAST_ROUND, repr(round_start))
            if outcome.sweep:
                await self.store.set_meta(LAST_SWEEP, repr(round_start))

    async def _retries(self) -> dict[int, bool]:
        """Projects a failed round left for the next ones: project id -> as a sweep."""
        raw = await self.store.get_meta(RETRY)
        try:
            found = orjson.loads(raw) if raw else {}
            return {int(p): bool(f) for p, f in found.items()}
        except (orjson.JSONDecodeError, AttributeError, ValueError):
            return {}

    async def _float(self, key: str) -> float | None:
        raw = await self.store.get_meta(key)
        return float(raw) if raw else None

    async def _active(self, base: float, every: set[int] | None) -> dict[int, str]:
        """Projects whose ``last_activity_at`` moved since this pass last saw it, with it
        (``every`` given: a sweep reads those anyway; the listing only records activity)."""
        after = base - self.options.project_lag_s - self.options.overlap_s
        params = {"pagination": "keyset", "order_by": "id", "sort": "asc", "simple": "true",
                  "per_page": 100, "last_activity_after": rules.iso(after)}
        moved: dict[int, str] = {}
        async for page in self.client.pages("projects", params, "projects", keyset=True):
            for item in page:
                if not isinstance(item, dict) or not isinstance(item.get("id"), int):
                    continue
                pid, activity = int(item["id"]), str(item.get("last_activity_at") or "")
                if every is None and await self.store.get_meta(f"os:act:{pid}") == activity:
                    continue
                moved[pid] = activity
        return moved

    # -- a project -----------------------------------------------------------------------
    async def _project(self, pid: int, round_start: float, sweep: bool,
                       marked: set[tuple[str, int]]) -> tuple[int, int]:
        """Read one project's changes; (versions produced, tombstones)."""
        progress = Progress()
        executor = Executor(self.client, self.deliverer, self.options.kinds)
        project = await self.state.project(pid)
        if project is not None and project.status == IMPORT_GONE:
            return 0, 0  # deleted during the backfill
        gone_since = await self.store.get_meta(GONE + str(pid))
        if gone_since == GONE_DONE and not await self._exists(pid):
            return 0, 0  # deleted, and its objects tombstoned already
        first = self.client.clock.to_gitlab(project.started) if project else 0.0
        names = [*rules.WINDOWED, "commits", *rules.WHOLE,
                 *(rules.SWEEP_ONLY if sweep else ())]
        deleted = 0
        try:
            if "projects" in self.options.kinds:  # the project itself (one request)
                await executor.read_one(stream("project"), Scope(pid), progress)
            for name in names:
                spec = stream(name)
                if self._wanted(spec):
                    deleted += await self._stream(executor, progress, pid, spec, round_start,
                                                  sweep, first, marked)
        except NotFoundError:
            if await self._exists(pid):
                raise
            deleted += await self._project_gone(pid, gone_since)
            return sum(progress.produced.values()), deleted
        if gone_since:  # it answers again (a transfer, a proxy's mistake, or restored)
            await self.store.set_meta(GONE + str(pid), "")
            log.info("object_project_back", project_id=pid)
        if progress.users:
            await UserCache(self.store, executor, self.options.user_ttl_s).import_users(
                progress.users, progress)
        return sum(progress.produced.values()), deleted

    async def _project_gone(self, pid: int, since_raw: str | None) -> int:
        """A project answering 404. Once the 404 lasted ``GONE_AFTER_S`` (as on the event
        path: a single 404 may be a transfer or a proxy's mistake), every key the index holds
        for it, and its own, gets a tombstone, and the project is forgotten; a 403 (access
        lost, the objects still exist) never comes here. Returns the tombstones."""
        now = self.client.clock.now()
        since = float(since_raw) if since_raw and since_raw != GONE_DONE else now
        if since_raw != repr(since):
            await self.store.set_meta(GONE + str(pid), repr(since))
        if now - since < GONE_AFTER_S:
            log.warning("object_project_gone", project_id=pid, gone_for_s=round(now - since),
                        tombstones_after_s=GONE_AFTER_S)
            return 0
        deleted = 0
        for kind in sorted(TOP_KINDS):
            keys = await self.index.keys(pid, kind)
            if not keys:
                continue
            deleted += await self._tombstones(pid, kind, sorted(keys))
            for key in sorted(keys):
                deleted += await self._children_gone(pid, key)
            # Kept as tombstoned: a project restored later has its objects produced again.
            await self._set_dead(pid, kind, await self._dead(pid, kind) | keys)
            await self.index.set_keys(pid, kind, ())
        own = stream("project").key_of(Scope(pid), {"id": pid})
        deleted += await self._tombstones(pid, "projects", [own])
        for name in (*rules.WINDOWED, "commits", *rules.WHOLE, *rules.SWEEP_ONLY):
            await self.store.set_meta(f"os:wm:{pid}:{name}", "")
        await self.store.set_meta(f"os:act:{pid}", "")
        await self.store.set_meta(GONE + str(pid), GONE_DONE)
        log.warning("object_project_deleted", project_id=pid, tombstones=deleted,
                    gone_for_s=round(now - since))
        return deleted

    async def _exists(self, pid: int) -> bool:
        try:
            await self.client.get(f"projects/{pid}", None, "project")
        except NotFoundError:
            return False
        return True

    def _wanted(self, spec: Stream) -> bool:
        kinds = self.options.kinds
        return spec.kind in kinds or (spec.name == "discussions" and "notes" in kinds)

    async def _watermark(self, pid: int, name: str, first: float) -> float:
        raw = await self.store.get_meta(f"os:wm:{pid}:{name}")
        return float(raw) if raw else first

    async def _stream(self, executor: Executor, progress: Progress, pid: int, spec: Stream,
                      round_start: float, sweep: bool, first: float,
                      marked: set[tuple[str, int]]) -> int:
        """Read one stream of a project (and the children it calls for); its tombstones."""
        watermark = await self._watermark(pid, spec.name, first)
        read = rules.window(watermark, round_start, self.options.overlap_s)
        whole = sweep and spec.updated_filter == "updated_after"
        extra = {} if whole else read.params(spec)
        dead = await self._dead(pid, spec.kind) if spec.kind in TOP_KINDS else set()
        got = Collected(dead=dead)
        executor.on_delivered = got.on_delivered
        try:
            await executor.read(spec, Scope(pid), progress, NoPositions(), spec.name,
                                got.on_page, extra)
        except ForbiddenError:
            return 0  # switched off in this project: nothing to read, nothing deleted
        finally:
            executor.on_delivered = None
        deleted = 0
        if spec.kind in TOP_KINDS:
            known = await self.index.keys(pid, spec.kind)
            # Only a whole list shows every object: only a whole list deletes.
            missing = rules.deleted(known, got.keys) if not extra else []
            gone = [key for key in missing if not await self._still_there(key, spec.name)]
            deleted += await self._tombstones(pid, spec.kind, gone)
            for key in gone:
                deleted += await self._children_gone(pid, key)
            # A key tombstoned before and listed again (a branch restored at the same commit)
            # is produced again, whatever its old version mark says.
            back = [r for k, r in sorted(got.back.items()) if k not in got.fresh]
            if back:
                produced = await self.deliverer.deliver(back, again=True)
                progress.produced.update(produced.produced)
            if gone or got.back:
                await self._set_dead(pid, spec.kind, (dead - set(got.back)) | set(gone))
            if gone or not got.keys <= known:
                await self.index.set_keys(pid, spec.kind, (known | got.keys) - set(gone))
        parent = spec.name if spec.name in rules.CHILDREN else ""
        if parent:
            deleted += await self._parents(executor, progress, pid, parent, got, watermark,
                                           {iid for p, iid in marked if p == parent})
        if spec.updated_filter:
            await self.store.set_meta(f"os:wm:{pid}:{spec.name}",
                                      repr(rules.next_watermark(watermark, read, True)))
        return deleted

    async def _parents(self, executor: Executor, progress: Progress, pid: int, parent: str,
                       got: Collected, watermark: float, marked: set[int]) -> int:
        """Read again the children the rules call for; the marked parents not in the list
        are read first (one request each), then their children."""
        listed = {int(i["iid"]): i for i in got.items if isinstance(i.get("iid"), int)}
        spec = stream(parent)
        single = dataclasses.replace(spec, path=spec.key, paging=Paging.SINGLE, params=())
        deleted = 0
        for iid in sorted(marked - set(listed)):
            try:
                item = await executor.read_one(single, Scope(pid), progress, {"iid": iid})
            except NotFoundError:
                continue  # deleted: the sweep's whole list tombstones it
            listed[iid] = item
        wanted = {*self.options.kinds, *(("discussions",) if "notes" in self.options.kinds
                                         else ())}
        for iid, item in sorted(listed.items()):
            key = spec.key_of(Scope(pid), item)
            is_changed = rules.changed(item, key in got.fresh, iid in marked, watermark)
            names = [n for n in rules.rereads(parent, item, is_changed, wanted)
                     if self._wanted(stream(n))]
            if names:
                deleted += await self._children(executor, progress, pid, parent, iid, names)
        return deleted

    async def _children(self, executor: Executor, progress: Progress, pid: int, parent: str,
                        iid: int, names: Iterable[str]) -> int:
        """Read a parent's children again; children produced before and not listed now get
        tombstones."""
        got = Collected()
        read: set[str] = set()
        executor.on_delivered = got.on_delivered
        scope = Scope(pid, parent, iid)
        try:
            for name in names:
                spec = stream(name)
                try:
                    await executor.read(spec, scope, progress, NoPositions(), name)
                except (ForbiddenError, NotFoundError):
                    continue  # switched off, or the parent went meanwhile: nothing decided
                read.add(spec.kind)
                if spec.nested_notes:
                    read.add("notes")
        finally:
            executor.on_delivered = None
        known = await self.index.children(pid, parent, iid)
        deleted = 0
        for kind in sorted(read & CHILD_KINDS):
            gone = rules.deleted(known.get(kind, set()), got.children.get(kind, set()))
            deleted += await self._tombstones(pid, kind, gone)
        merged = {k: (known.get(k, set()) if k not in read else set()) |
                  got.children.get(k, set()) for k in {*known, *got.children}}
        if merged != known:
            await self.index.set_children(pid, parent, iid, merged)
        return deleted

    async def _dead(self, pid: int, kind: str) -> set[str]:
        raw = await self.store.get_meta(f"os:dead:{pid}:{kind}")
        return set(orjson.loads(raw)) if raw else set()

    async def _set_dead(self, pid: int, kind: str, keys: set[str]) -> None:
        await self.store.set_meta(f"os:dead:{pid}:{kind}", orjson.dumps(sorted(keys)).decode())

    async def _still_there(self, key: str, endpoint: str) -> bool:
        """Whether a key a whole list did not show still answers (the key is its REST path):
        an offset-paged list shifts under a deletion on an earlier page while it is read, so
        an object missing from it is asked for once before it gets a tombstone."""
        try:
            await self.client.get(key, None, endpoint)
        except NotFoundError:
            return False
        except ForbiddenError:
            return True  # hidden, not known to be deleted: nothing decided
        return True

    async def _children_gone(self, pid: int, key: str) -> int:
        """A deleted issue's or merge request's threads, notes and events go with it."""
        parts = key.split("/")
        if len(parts) != 4 or parts[2] not in rules.CHILDREN:
            return 0
        parent, iid = parts[2], int(parts[3])
        known = await self.index.children(pid, parent, iid)
        deleted = 0
        for kind, keys in sorted(known.items()):
            deleted += await self._tombstones(pid, kind, sorted(keys))
        if known:
            await self.index.set_children(pid, parent, iid, {})
        return deleted

    async def _tombstones(self, pid: int, kind: str, keys: list[str]) -> int:
        if not keys or kind not in self.options.kinds:
            return 0
        records = [ObjectRecord(kind, k, None, pid, "", TOMBSTONE) for k in keys]
        delivered = await self.deliverer.deliver(records)
        self.client.metrics.objects_produced.labels(kind).inc(len(delivered.fresh))
        log.info("objects_deleted", project_id=pid, kind=kind, count=len(keys))
        return len(delivered.fresh)


def object_sync_for(settings: Settings, client: GitLabClient, store: Store,
                    stop: asyncio.Event) -> tuple[ObjectSync, Sink]:
    """The object sync of ``run`` and the sink it produces to (closed by the caller)."""
    from gitlab_producer.sinks import open_sink

    s = settings
    sink = open_sink(s, f"{s.kafka_object_topic_prefix}.objects")
    deliverer = ObjectDeliverer(store, sink, s.kafka_object_topic_prefix, s.instance,
                                s.object_version_ttl, op="update", metrics=client.metrics)
    options = SyncOptions(s.object_kinds, s.sync_overlap, s.project_activity_lag,
                          s.object_sweep_interval, s.gitlab_concurrency, s.user_cache_ttl,
                          bool(s.backfill_projects.strip()))
    return ObjectSync(client, store, deliverer, options, stop), sink


def _never_run(work: Awaitable[int]) -> None:
    if asyncio.iscoroutine(work):
        work.close()  # no "never awaited" warning


async def backfill_then(settings: Settings, service: Awaitable[int]) -> int:
    """``run`` with ``SYNC_OBJECTS``: the backfill first (it resumes where it stopped), then
    the service; a signal during the backfill stops there."""
    from gitlab_producer.objects.backfill import EXIT_CONFIG, Backfill
    from gitlab_producer.startup import start_checks

    backfill = Backfill(settings)
    try:
        # The service's own port, not the backfill's: checked before the backfill's hours.
        (await start_checks(settings, [("WEBHOOK_PORT", settings.webhook_port)])).close()
        code = await backfill.run()
    except BaseException:
        _never_run(service)
        raise
    if code == EXIT_CONFIG or backfill.stop.is_set():
        _never_run(service)
        return code
    if code:
        log.warning("backfill_incomplete", detail="failed jobs are retried by the next start; "
                    "the object sync keeps what was imported current")
    return await service
