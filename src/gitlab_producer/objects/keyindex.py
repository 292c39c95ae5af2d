"""The keys produced per project and kind, and per issue or merge request its children's keys,
in the store: what the sweep compares GitLab's lists with to find deleted objects.

- ``oi:<project_id>:<kind>``: the keys of a project's top-level objects of ``kind``
- ``oi:<project_id>:<parent>:<iid>``: per kind, the keys of one issue's or merge request's
  threads, notes and resource events

Each entry has one writer at a time: a project's list is read by one job (the backfill) or by
the object sync's pass over that project, and a parent's children by the job that reads them.
Commits are not indexed: they are immutable, and shared by branches and merge requests.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from gitlab_producer.objects.delivery import Delivered
from gitlab_producer.objects.records import ObjectRecord
from gitlab_producer.objects.streams import Scope, Stream
from gitlab_producer.store.base import Store

TOP_KINDS = frozenset({"issues", "merge_requests", "milestones", "pipelines", "deployments",
                       "labels", "releases", "branches", "tags", "members",
                       "protected_branches", "jobs"})
CHILD_KINDS = frozenset({"discussions", "notes", "resource_state_events",
                         "resource_label_events", "resource_milestone_events"})
_ENC = msgspec.json.Encoder()
_KEYS = msgspec.json.Decoder(list[str])
_CHILDREN = msgspec.json.Decoder(dict[str, list[str]])


def top_entry(project_id: int, kind: str) -> str:
    return f"oi:{project_id}:{kind}"


def child_entry(project_id: int, parent: str, iid: int) -> str:
    return f"oi:{project_id}:{parent}:{iid}"


class KeyIndex:
    """Typed access to the entries above on any :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def keys(self, project_id: int, kind: str) -> set[str]:
        raw = await self.store.get_meta(top_entry(project_id, kind))
        return set(_KEYS.decode(raw)) if raw else set()

    async def set_keys(self, project_id: int, kind: str, keys: Iterable[str]) -> None:
        await self.store.set_meta(top_entry(project_id, kind),
                                  _ENC.encode(sorted(keys)).decode())

    async def children(self, project_id: int, parent: str, iid: int) -> dict[str, set[str]]:
        raw = await self.store.get_meta(child_entry(project_id, parent, iid))
        return {k: set(v) for k, v in _CHILDREN.decode(raw).items()} if raw else {}

    async def set_children(self, project_id: int, parent: str, iid: int,
                           children: dict[str, set[str]]) -> None:
        await self.store.set_meta(child_entry(project_id, parent, iid), _ENC.encode(
            {k: sorted(v) for k, v in sorted(children.items()) if v}).decode())

    async def record(self, stream: Stream, scope: Scope, records: list[ObjectRecord],
                     _delivered: Delivered) -> None:
        """Add the keys of a delivered page (the executor's ``on_delivered`` hook)."""
        if scope.parent:
            kids = [r for r in records if r.kind in CHILD_KINDS and r.raw is not None]
            if not kids:
                return
            known = await self.children(scope.project_id, scope.parent, scope.parent_iid)
            before = sum(map(len, known.values()))
            for r in kids:
                known.setdefault(r.kind, set()).add(r.key)
            if sum(map(len, known.values())) != before:
                await self.set_children(scope.project_id, scope.parent, scope.parent_iid,
                                        known)
            return
        if stream.kind not in TOP_KINDS:
            return
        keys = {r.key for r in records if r.kind == stream.kind and r.raw is not None}
        if not keys:
            return
        known_top = await self.keys(scope.project_id, stream.kind)
        if not keys <= known_top:
            await self.set_keys(scope.project_id, stream.kind, known_top | keys)
