"""Entities kept for retry: skipped (403, 404) or failed, read again every round until read.

A project or user whose events could not be read is written to the store before the round
ends, and every later round queues it besides the discovered ones, whatever the listing
windows say: a skipped entity is not forgotten when its ``last_activity_at`` leaves the
window. It is read from its own cursor (or from ``SYNC_SINCE`` when it never had one), so
once it can be read again, nothing in between is missing. Its entry is dropped when a read
succeeds, or when it has answered 404 for :data:`GONE_AFTER_S` (GitLab answers 404 for a
project that was deleted, and a single 404 may be a transfer or a proxy's mistake).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson

from gitlab_producer.logs import get_logger
from gitlab_producer.metrics import Metrics
from gitlab_producer.store.base import Store
from gitlab_producer.sync.entities import Work

log = get_logger(__name__)
KINDS = ("project", "user")
GONE_AFTER_S = 3600.0  # a 404 that lasts this long (over several rounds) means gone


@dataclass(frozen=True)
class Pending:
    """Why an entity is kept: ``reason`` (``forbidden``, ``not_found``, ``failed``) since
    ``since``; ``activity`` is the marker last listed for it, saved in its cursor when read."""

    activity: str
    reason: str
    since: float

    def dumps(self) -> str:
        return orjson.dumps([self.activity, self.reason, self.since]).decode()

    @classmethod
    def loads(cls, raw: str) -> Pending:
        try:
            activity, reason, since = orjson.loads(raw)
            return cls(str(activity), str(reason), float(since))
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return cls("", "failed", time.time())  # unreadable: still retried


class RetrySet:
    """The round's view of the entities kept for retry (loaded once per round)."""

    def __init__(self, store: Store, metrics: Metrics, gauge: bool = True) -> None:
        self.store = store
        self.metrics = metrics
        self.gauge = gauge  # off for a view of one entity (a shared round's job)
        self.pending: dict[str, dict[int, Pending]] = {kind: {} for kind in KINDS}

    async def load(self) -> None:
        for kind in KINDS:
            stored = await self.store.retries(kind)
            self.pending[kind] = {i: Pending.loads(v) for i, v in stored.items()}
        self._gauge()

    async def succeeded(self, work: Work) -> None:
        if self.pending[work.kind].pop(work.entity_id, None) is not None:
            await self.store.drop_retries(work.kind, [work.entity_id])
            log.info("entity_recovered", kind=work.kind, id=work.entity_id)
            self._gauge()

    async def keep(self, work: Work, reason: str) -> bool:
        """Keep the entity for the next rounds; ``False`` when a lasting 404 says it is gone
        (then it is dropped)."""
        now = time.time()
        before = self.pending[work.kind].get(work.entity_id)
        since = before.since if before is not None and before.reason == reason else now
        if reason == "not_found" and now - since >= GONE_AFTER_S:
            self.pending[work.kind].pop(work.entity_id, None)
            await self.store.drop_retries(work.kind, [work.entity_id])
            self._gauge()
            return False
        entry = Pending(work.activity, reason, since)
        await self.store.save_retries(work.kind, {work.entity_id: entry.dumps()})
        self.pending[work.kind][work.entity_id] = entry
        self._gauge()
        return True

    def _gauge(self) -> None:
        if not self.gauge:
            return
        for kind in KINDS:
            self.metrics.entities_retrying.labels(kind).set(len(self.pending[kind]))
