"""The one executor: reads any stream of :mod:`streams` through the shared GitLab client (its
budget, retries and errors), page by page from a saved position, turns each object into an
:class:`ObjectRecord` (its bytes exactly as GitLab sent them) and hands the page to the
deliverer before saving the next position, so a resumed job re-reads at most one page."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import msgspec
import orjson

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.pagination import (
    KeysetPaginator,
    OffsetPaginator,
    Paginator,
    TimeCursor,
    TimeCursorPaginator,
    cursor_text,
    parse_cursor,
)
from gitlab_producer.logs import get_logger
from gitlab_producer.objects.delivery import Delivered, ObjectDeliverer
from gitlab_producer.objects.records import ObjectRecord, content_hash
from gitlab_producer.objects.streams import NOTES_KEY, Paging, Scope, Stream, Version, fill

log = get_logger(__name__)


class _Discussion(msgspec.Struct):
    notes: list[msgspec.Raw] = []


_RAWS = msgspec.json.Decoder(list[msgspec.Raw])
# A markdown upload link: /uploads/<32 hex secret>/<file name> (name as written, URL-encoded).
UPLOAD_RE = re.compile(rb"/uploads/([0-9a-f]{32})/([^\s\"'()\[\]<>\\]+)")
WITH_MARKDOWN = frozenset({"issues", "merge_requests", "notes", "releases"})
_DISCUSSION = msgspec.json.Decoder(_Discussion)


def split_page(body: bytes) -> list[tuple[bytes, dict[str, Any]]]:
    """A JSON array -> (raw bytes, decoded object) per element; ValueError otherwise."""
    items = orjson.loads(body)
    if not isinstance(items, list):
        raise ValueError("expected a JSON array")
    try:
        raws = _RAWS.decode(body)
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc)) from None
    return [(bytes(raw), item) for raw, item in zip(raws, items, strict=True)
            if isinstance(item, dict)]


def referenced_users(obj: Any, out: set[int]) -> None:
    """Ids of every user object (a mapping with ``username`` and an integer ``id``) inside."""
    if isinstance(obj, dict):
        uid = obj.get("id")
        if "username" in obj and isinstance(uid, int):
            out.add(uid)
        for value in obj.values():
            if isinstance(value, dict | list):
                referenced_users(value, out)
    elif isinstance(obj, list):
        for value in obj:
            referenced_users(value, out)


@dataclass
class Progress:
    """Counts of one job (fetched = read from GitLab, imported = in Kafka now, produced = sent
    by this job) and the users its objects reference."""

    fetched: Counter[str] = field(default_factory=Counter)
    imported: Counter[str] = field(default_factory=Counter)
    produced: Counter[str] = field(default_factory=Counter)
    users: set[int] = field(default_factory=set)
    user_hits: int = 0  # user lookups answered by the cache
    user_requests: int = 0  # user lookups that asked GitLab
    malformed: int = 0  # objects without the fields their key needs (skipped, logged)
    too_large: Counter[str] = field(default_factory=Counter)  # Kafka refused their size
    uploads: set[str] = field(default_factory=set)  # "<secret>/<name>" linked in markdown


class Positions(Protocol):
    """Where each stream of a job stands (None: from the start), saved after each page."""

    def position(self, stream_id: str) -> Mapping[str, Any] | None:
        """The saved position of a stream, ``{"done": True}`` when it was read to the end."""

    async def save_position(self, stream_id: str, position: Mapping[str, Any]) -> None:
        """Store the position (after the page before it was delivered)."""


PageHook = Callable[[list[dict[str, Any]]], Awaitable[None]]
# Told after each delivered page: the stream, its scope, the records and what was produced.
DeliveredHook = Callable[[Stream, Scope, list[ObjectRecord], Delivered], Awaitable[None]]


class Executor:
    """Reads streams and delivers their objects."""

    def __init__(self, client: GitLabClient, deliverer: ObjectDeliverer,
                 wanted: frozenset[str],
                 on_page_read: Callable[[], Awaitable[None]] | None = None,
                 find_uploads: bool = False,
                 on_delivered: DeliveredHook | None = None) -> None:
        self.client = client
        self.on_delivered = on_delivered  # the key index (objects/keyindex.py), a collector
        self.deliverer = deliverer
        self.wanted = wanted  # kinds to produce (BACKFILL_KINDS); others are read, not sent
        self.find_uploads = find_uploads  # BACKFILL_ATTACHMENTS: note the uploads linked
        self._on_page_read = on_page_read  # a heartbeat for the engine's lease

    async def read_one(self, stream: Stream, scope: Scope, progress: Progress,
                       path_fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A single object (``Paging.SINGLE``); returns it decoded."""
        path = fill(stream.path, {**scope.fields(), **(path_fields or {})}, {})
        answer = await self.client.get(path, None, stream.name, decode=None)
        raw: bytes = answer.body
        item = orjson.loads(raw)
        if not isinstance(item, dict):
            raise ValueError(f"{stream.name}: expected a JSON object")
        await self._deliver(stream, scope, [(raw, item)], progress)
        return item

    async def read(self, stream: Stream, scope: Scope, progress: Progress,
                   positions: Positions, stream_id: str,
                   on_page: PageHook | None = None,
                   extra: Mapping[str, str] | None = None) -> None:
        """Every page of ``stream`` in ``scope`` from its saved position to the end;
        ``extra`` adds query parameters (an incremental read's time window)."""
        saved = positions.position(stream_id)
        if saved is not None and saved.get("done"):
            return
        if stream.paging is Paging.UPDATED_CURSOR:
            await self._read_by_cursor(stream, scope, progress, positions, stream_id,
                                       on_page, extra, saved)
            return
        # GITLAB_MAX_PAGES and the repeated-page check apply as on every other list.
        paginator: Paginator = (KeysetPaginator if stream.paging is Paging.KEYSET
                                else OffsetPaginator)(stream.name, self.client.max_pages)
        params = {**dict(stream.params), **(extra or {})}
        target, query = stream.url(scope), dict(params)
        if saved is not None and saved.get("url"):
            target, query = str(saved["url"]), {}
        elif saved is not None and saved.get("page"):
            query["page"] = str(saved["page"])
        while True:
            answer = await self.client.get(target, query or None, stream.name,
                                           decode=split_page)
            page: list[tuple[bytes, dict[str, Any]]] = answer.body
            await self._take_page(stream, scope, page, progress, on_page)
            nxt = paginator.next_page(answer.headers)
            if nxt is None:
                await positions.save_position(stream_id, {"done": True})
                return
            if nxt.url is not None:
                target, query = nxt.url, {}
                await positions.save_position(stream_id, {"url": nxt.url})
            else:
                query = {**params, "page": str(nxt.page)}
                await positions.save_position(stream_id, {"page": nxt.page})
            if self._on_page_read is not None:
                await self._on_page_read()

    async def _read_by_cursor(self, stream: Stream, scope: Scope, progress: Progress,
                              positions: Positions, stream_id: str, on_page: PageHook | None,
                              extra: Mapping[str, str] | None,
                              saved: Mapping[str, Any] | None) -> None:
        """A list in ascending ``updated_at`` order, followed by moving its time filter to the
        last ``updated_at`` read (``Paging.UPDATED_CURSOR``). The saved position is that
        cursor (``{"after": ..., "page": ...}``); a position of another paging (an offset page
        saved by an earlier version) is not one of this order, and the list starts again
        (version marks keep what was produced from being produced again). The objects of the
        overlap read in this run are not delivered twice."""
        params = {**dict(stream.params), **(extra or {})}
        fltr = stream.updated_filter
        start = TimeCursor(parse_cursor(params.get(fltr)))
        if saved is not None and saved.get("after"):
            resumed = parse_cursor(saved["after"])
            if resumed is not None and (start.after is None or resumed >= start.after):
                start = TimeCursor(resumed, max(1, int(saved.get("page") or 1)))
        paginator = TimeCursorPaginator(stream.name, self.client.max_pages, start)
        cursor = start
        recent: dict[str, datetime] = {}  # key -> updated_at of objects read at the cursor
        while True:
            query = dict(params)
            if cursor.after is not None:
                query[fltr] = cursor_text(cursor.after)
            if cursor.page > 1:
                query["page"] = str(cursor.page)
            answer = await self.client.get(stream.url(scope), query, stream.name,
                                           decode=split_page)
            listed: list[tuple[bytes, dict[str, Any]]] = answer.body
            page, stamps = [], []
            for raw, item in listed:
                stamp = parse_cursor(item.get("updated_at"))
                if stamp is not None:
                    stamps.append(stamp)
                    try:
                        key = stream.key_of(scope, item)
                    except KeyError:
                        key = ""  # malformed: _deliver counts and logs it
                    if key and recent.get(key) == stamp:
                        continue  # read already, this version: the cursor's overlap
                    if key:
                        recent[key] = stamp
                page.append((raw, item))
            await self._take_page(stream, scope, page, progress, on_page)
            nxt = paginator.advance(answer.headers, stamps)
            if nxt is None:
                await positions.save_position(stream_id, {"done": True})
                return
            if nxt.after is not None and nxt.after != cursor.after:
                recent = {k: t for k, t in recent.items() if t >= nxt.after}
            cursor = nxt
            await positions.save_position(stream_id, {
                "after": cursor_text(cursor.after) if cursor.after else "",
                "page": cursor.page})
            if self._on_page_read is not None:
                await self._on_page_read()

    async def _take_page(self, stream: Stream, scope: Scope,
                         page: list[tuple[bytes, dict[str, Any]]], progress: Progress,
                         on_page: PageHook | None) -> None:
        await self._deliver(stream, scope, page, progress)
        if on_page is not None:
            await on_page([item for _raw, item in page])

    async def _deliver(self, stream: Stream, scope: Scope,
                       page: list[tuple[bytes, dict[str, Any]]], progress: Progress) -> None:
        records = []
        project_id = scope.project_id or None
        for raw, item in page:
            try:
                key = stream.key_of(scope, item)
            except KeyError as exc:  # one malformed object never stops the others
                self._malformed(progress, stream, "", exc, project_id)
                continue
            records.append(_record(stream.kind, key, raw, item, stream.version, project_id))
            if stream.kind != "users" and "users" in self.wanted:
                referenced_users(item, progress.users)
        if stream.nested_notes:
            fields = scope.fields()
            for raw, _item in page:
                try:  # a thread whose notes are not a list, a note without an id: skipped
                    raw_notes = _DISCUSSION.decode(raw).notes
                except msgspec.DecodeError as exc:
                    raw_notes = []
                    self._malformed(progress, stream, "notes", exc, project_id)
                for raw_note in raw_notes:
                    note = orjson.loads(bytes(raw_note))
                    try:
                        key = fill(NOTES_KEY, fields, note if isinstance(note, dict) else {})
                    except KeyError as exc:
                        self._malformed(progress, stream, "id", exc, project_id)
                        continue
                    records.append(_record("notes", key, bytes(raw_note), note,
                                           Version.UPDATED_AT, project_id))
        records = [r for r in records if r.kind in self.wanted]
        if self.find_uploads:
            for r in records:
                if r.kind in WITH_MARKDOWN and r.raw is not None:
                    progress.uploads.update(f"{m[0].decode()}/{m[1].decode()}"
                                            for m in UPLOAD_RE.findall(r.raw))
        delivered = await self.deliverer.deliver(records)
        fetched = Counter(r.kind for r in records)
        progress.fetched.update(fetched)
        # A page is delivered whole or raises: every record of it is in Kafka now, but for
        # those Kafka refused for their size (skipped, logged and counted by the deliverer).
        kinds = fetched - delivered.too_large
        progress.imported.update(kinds)
        progress.produced.update(delivered.produced)
        progress.too_large.update(delivered.too_large)
        if self.on_delivered is not None:
            await self.on_delivered(stream, scope, records, delivered)
        metrics = self.client.metrics
        for kind, count in fetched.items():
            metrics.objects_fetched.labels(kind).inc(count)
            metrics.objects_imported.labels(kind).inc(kinds[kind])
        for kind, count in delivered.produced.items():
            metrics.objects_produced.labels(kind).inc(count)


    @staticmethod
    def _malformed(progress: Progress, stream: Stream, what: str, exc: Exception,
                   project_id: int | None) -> None:
        progress.malformed += 1
        log.warning("object_malformed", stream=stream.name, missing=what or str(exc),
                    error=str(exc), project_id=project_id)


def _record(kind: str, key: str, raw: bytes, item: Mapping[str, Any], version: Version,
            project_id: int | None) -> ObjectRecord:
    updated = item.get("updated_at") if version is Version.UPDATED_AT else None
    return ObjectRecord(kind, key, raw, project_id, str(updated or ""), content_hash(raw))
