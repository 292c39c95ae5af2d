"""Exactly-once delivery of event pages: check marks, claim, produce, acknowledge, mark.

An event id is marked as sent only after the sink acknowledged it. Project and user event
lists overlap, and both may hold the same new event at the same moment: the first task to see
it claims it, and any other task waits for that claim's outcome instead of producing it again.
With a Redis store (more than one instance may run) the claim is also taken in Redis
(:mod:`gitlab_producer.store.redis_claims`): an event another instance holds is waited for
until it is marked, or taken over when that instance gave it up or died.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from itertools import compress

from gitlab_producer.gitlab.events import Event
from gitlab_producer.metrics import Metrics
from gitlab_producer.sinks.base import DeliveryError, Message, Sink, send_fitting
from gitlab_producer.store.base import Store, StoreError
from gitlab_producer.store.claims import Claims
from gitlab_producer.store.redis_claims import HELD, MINE, RedisClaims, poll_delays


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


# Seconds the marks of an acknowledged page are retried against a failing store.
MARK_RETRY_S = 15.0


class Deliverer:
    """Sends the unsent events of a page and marks them once acknowledged."""

    def __init__(self, store: Store, sink: Sink, ttl_s: int, metrics: Metrics,
                 instance: str, now: Callable[[], float] = time.time,
                 shared: RedisClaims | None = None) -> None:
        self.store = store
        self._now = now  # GitLab's clock: events' ages are measured against their created_at
        self.shared = shared
        self.sink = sink
        self.ttl_s = ttl_s
        self.metrics = metrics
        self._instance = instance.encode()
        self._claims: Claims[int] = Claims()
        # Told of every page of events produced (the object sync marks what they name).
        self.observers: list[Callable[[Sequence[Event]], None]] = []

    async def deliver(self, events: Sequence[Event]) -> int:
        """Deliver what was not sent yet; returns how many this call produced. An event
        another reader holds is waited for (see :mod:`gitlab_producer.store.claims`)."""
        if not events:
            return 0
        by_id = {e.id: e for e in events}
        produced, held = await self._deliver_claimed(by_id)
        delays = poll_delays()
        while held:  # another instance is delivering these: wait for its outcome
            await asyncio.sleep(next(delays))
            more, held = await self._deliver_claimed({i: by_id[i] for i in held})
            if more:
                self.metrics.claims_taken_over.inc(more)
            produced += more
        return produced

    async def _deliver_claimed(self, by_id: dict[int, Event]) -> tuple[int, list[int]]:
        """Deliver the events this task could claim: (how many it produced, ids another
        instance holds)."""
        claim = self._claims.take(by_id)
        fresh: list[int] = []
        fresh_keys: list[bytes] = []  # their claims in Redis (shared claims only)
        held: list[int] = []
        try:
            if claim.mine and self.shared is None:
                fresh = await self.store.unseen(claim.mine)
            elif claim.mine and self.shared is not None:
                keys = self.store_keys(claim.mine)
                outcomes = await self.shared.claim(keys)
                # Per event, on every page: C-level passes instead of a loop.
                mine = [outcome == MINE for outcome in outcomes]
                fresh, fresh_keys = list(compress(claim.mine, mine)), list(compress(keys, mine))
                if HELD in outcomes:
                    held = [i for i, outcome in zip(claim.mine, outcomes, strict=True)
                            if outcome == HELD]
                    self.metrics.claims_held_elsewhere.inc(len(held))
            self.metrics.events_duplicate.inc(len(claim.mine) - len(fresh) - len(held))
            if fresh:
                await self._send([by_id[i] for i in fresh], fresh_keys)
        except BaseException as exc:
            if self.shared is not None:
                self.shared.release_soon(fresh_keys)
            claim.release(exc)
            raise
        claim.release()
        await claim.wait_for_others()
        return len(fresh), held

    async def _mark(self, event_ids: list[int], keys: list[bytes]) -> None:
        """Mark acknowledged events, retrying a store that fails for a moment (a Redis
        restarted): they were delivered, so giving up on their marks means producing them
        again next round. Bounded (``MARK_RETRY_S``, well inside a claim's 30 s life), then
        the error goes up and the page repeats as before. ``keys``: their claims' keys
        (shared claims), which are the marks' own."""
        deadline = time.monotonic() + MARK_RETRY_S
        for delay in poll_delays(0.1, 2.0):
            try:
                if keys and self.shared is not None:
                    await self.shared.store.mark_sent_keys(keys, self.ttl_s)
                else:
                    await self.store.mark_sent(event_ids, self.ttl_s)
                return
            except StoreError:
                if time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)

    def store_keys(self, event_ids: list[int]) -> list[bytes]:
        assert self.shared is not None
        return self.shared.store.event_keys(event_ids)

    async def _send(self, events: list[Event], claimed: list[bytes]) -> None:
        """Produce and mark ``events`` (``claimed``: their claims in Redis, kept alive
        meanwhile). An event Kafka refuses for its size is skipped (logged, counted) and
        marked like the others, so that it neither stalls its project's cursor nor is tried
        again, run after run."""
        messages = [to_message(e, self._instance) for e in events]
        try:
            if self.shared is None:
                refused = await send_fitting(self.sink, messages, self.metrics)
            else:
                async with self.shared.renewed(claimed):
                    refused = await send_fitting(self.sink, messages, self.metrics)
        except DeliveryError:
            self.metrics.delivery_failures.inc(len(messages))
            raise
        await self._mark([e.id for e in events], claimed)
        for observer in self.observers:
            observer(events)
        if refused:
            events = [e for i, e in enumerate(events) if i not in refused]
            if not events:
                return
        in_projects = sum(1 for e in events if e.project_id is not None)
        if in_projects:
            self.metrics.events_produced.labels("project").inc(in_projects)
        if in_projects < len(events):
            self.metrics.events_produced.labels("user").inc(len(events) - in_projects)
        newest = max(events, key=lambda e: e.id)
        self.metrics.newest_event_age.set(max(0.0, self._now() - newest.created_ts))
