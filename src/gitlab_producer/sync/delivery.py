"""Exactly-once delivery of event pages: check marks, claim, produce, acknowledge, mark.

An event id is marked as sent only after the sink acknowledged it. Project and user event
lists overlap, and both may hold the same new event at the same moment: the first task to see
it claims it, and any other task waits for that claim's outcome instead of producing it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from gitlab_producer.gitlab.events import Event
from gitlab_producer.metrics import Metrics
from gitlab_producer.sinks.base import DeliveryError, Message, Sink
from gitlab_producer.store.base import Store


def to_message(event: Event, instance: bytes) -> Message:
    """The Kafka record of an event: keyed by project (author when it has no project)."""
    owner = event.project_id if event.project_id is not None else event.author_id
    return Message(
        key=str(owner).encode(),
        value=event.raw,
        headers=(
            ("event_id", str(event.id).encode()),
            ("kind", b"project" if event.project_id is not None else b"user"),
            ("source", instance),
        ),
    )


class Deliverer:
    """Sends the unsent events of a page and marks them once acknowledged."""

    def __init__(self, store: Store, sink: Sink, ttl_s: int, metrics: Metrics,
                 instance: str) -> None:
        self.store = store
        self.sink = sink
        self.ttl_s = ttl_s
        self.metrics = metrics
        self._instance = instance.encode()
        self._claims: dict[int, asyncio.Future[None]] = {}

    async def deliver(self, events: Sequence[Event]) -> int:
        """Deliver what was not sent yet; returns how many this call produced.

        Events are claimed before the store is asked about them: a reader meeting an event
        another one holds waits for that one's outcome. (Claiming only after the lookup let a
        reader whose answer came back late send an event that a faster reader had meanwhile
        sent, marked and released.)"""
        if not events:
            return 0
        by_id = {e.id: e for e in events}
        waits = {self._claims[i] for i in by_id if i in self._claims}
        mine = [i for i in by_id if i not in self._claims]
        claim: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for event_id in mine:
            self._claims[event_id] = claim
        fresh: list[int] = []
        try:
            fresh = await self.store.unseen(mine) if mine else []
            self.metrics.events_duplicate.inc(len(mine) - len(fresh))
            if fresh:
                await self._send([by_id[i] for i in fresh])
            claim.set_result(None)
        except BaseException as exc:
            claim.set_exception(DeliveryError(f"delivery by another task failed: {exc}"))
            claim.exception()  # retrieved here so an unwaited claim never warns
            raise
        finally:
            for event_id in mine:
                self._claims.pop(event_id, None)
        for other in waits:
            await asyncio.shield(other)
        return len(fresh)

    async def _send(self, events: list[Event]) -> None:
        messages = [to_message(e, self._instance) for e in events]
        try:
            await self.sink.send(messages)
        except DeliveryError:
            self.metrics.delivery_failures.inc(len(messages))
            raise
        await self.store.mark_sent([e.id for e in events], self.ttl_s)
        in_projects = sum(1 for e in events if e.project_id is not None)
        if in_projects:
            self.metrics.events_produced.labels("project").inc(in_projects)
        if in_projects < len(events):
            self.metrics.events_produced.labels("user").inc(len(events) - in_projects)
        newest = max(events, key=lambda e: e.id)
        self.metrics.newest_event_age.set(max(0.0, time.time() - newest.created_ts))
