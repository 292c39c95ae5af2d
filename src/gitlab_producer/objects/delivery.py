"""Exactly one message per object version: claim, look the version marks up, produce, and mark
only after the sink acknowledged.

A version mark is ``<key>@<version>`` in the store's ``objv`` namespace, kept for
``OBJECT_VERSION_TTL`` seconds (at least as long as a resumed or repeated import could read the
same version again). Two jobs meeting the same version at once (a commit listed by the
repository and by a merge request) are resolved by in-process claims, as the event path does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from gitlab_producer.metrics import Metrics
from gitlab_producer.objects.records import ObjectRecord, to_message
from gitlab_producer.sinks.base import Sink, send_fitting
from gitlab_producer.store.base import Store
from gitlab_producer.store.claims import Claims

MARKS = "objv"


@dataclass(frozen=True)
class Delivered:
    """What one delivery did: ``imported`` objects are now in Kafka (``produced`` of them by
    this call, the rest earlier); ``too_large`` were not produced, Kafka refusing their
    size (left unmarked: read again, they are tried again)."""

    imported: int
    produced: Counter[str] = field(default_factory=Counter)  # by kind
    fresh: frozenset[str] = frozenset()  # keys of the versions this call produced
    too_large: Counter[str] = field(default_factory=Counter)  # by kind


class ObjectDeliverer:
    """Produces object versions not produced before, to ``<prefix>.<kind>``; ``op`` is the
    header of what it produces (a tombstone, a record without a value, is always ``delete``)."""

    def __init__(self, store: Store, sink: Sink, topic_prefix: str, source: str,
                 ttl_s: int, op: str = "snapshot", metrics: Metrics | None = None) -> None:
        self.store = store
        self.sink = sink
        self.topic_prefix = topic_prefix
        self.source = source
        self.ttl_s = ttl_s
        self.op = op
        self.metrics = metrics  # counts the records Kafka refused for their size
        self.imported = 0  # objects this deliverer saw into Kafka (a value, for progress)
        self._claims: Claims[str] = Claims()

    def topic(self, kind: str) -> str:
        return f"{self.topic_prefix}.{kind}"

    async def deliver(self, records: Sequence[ObjectRecord], again: bool = False) -> Delivered:
        """Produce the versions not marked yet (``again``: also the marked ones, for a key
        whose tombstone was produced after them)."""
        if not records:
            return Delivered(0)
        by_mark = {f"{r.key}@{r.version}": r for r in records}
        claim = self._claims.take(by_mark)
        too_large: list[str] = []
        try:
            fresh = (list(claim.mine) if again else
                     await self.store.unseen_keys(MARKS, claim.mine) if claim.mine else [])
            if fresh:
                messages = [to_message(by_mark[m], self.topic(by_mark[m].kind), self.source,
                                       self.op if by_mark[m].raw is not None else "delete")
                            for m in fresh]
                refused = await send_fitting(self.sink, messages, self.metrics)
                too_large = [fresh[i] for i in sorted(refused)]
                fresh = [m for i, m in enumerate(fresh) if i not in refused]
                if fresh:
                    await self.store.mark_keys(MARKS, fresh, self.ttl_s)
        except BaseException as exc:
            claim.release(exc)
            raise
        claim.release()
        await claim.wait_for_others()  # raises DeliveryError when the other task failed
        self.imported += len(by_mark) - len(too_large)
        return Delivered(len(by_mark) - len(too_large), Counter(by_mark[m].kind for m in fresh),
                         frozenset(by_mark[m].key for m in fresh),
                         Counter(by_mark[m].kind for m in too_large))
