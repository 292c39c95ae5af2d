"""User lookups shared by every project (seed 002's user cache): each referenced user is read
once (``GET /users/:id``) and produced once to ``users``.

A found user stays cached for ``ttl_s`` (24 h by default) and every hit refreshes that TTL; a
user GitLab does not know (404) is cached as missing for the same time, never refreshed, so it
is asked again once a day at most. The more projects imported, the fewer user requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gitlab_producer.gitlab.errors import NotFoundError
from gitlab_producer.objects.executor import Executor, Progress
from gitlab_producer.objects.streams import Scope, stream
from gitlab_producer.store.base import Store
from gitlab_producer.store.claims import Claims

FOUND = "user+"
MISSING = "user-"


@dataclass
class UserStats:
    """Lookups answered by the cache (``hits``, found or missing) and by GitLab."""

    hits: int = 0
    requests: int = 0
    missing: int = 0

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.requests
        return self.hits / total if total else 0.0


Lookups = Claims[str]


class UserCache:
    """Positive and negative user lookups in the store, shared by all projects and workers.

    ``in_flight`` (the claims of one process's jobs, as the deliverer's) holds the lookups
    under way: a job that meets a user another job is reading waits for that answer instead of
    asking GitLab again (the jobs starting together all meet the same few users); when that
    lookup fails, the waiting job fails too and keeps its users for its next try."""

    def __init__(self, store: Store, executor: Executor, ttl_s: int,
                 in_flight: Lookups | None = None) -> None:
        self.store = store
        self.executor = executor
        self.ttl_s = ttl_s
        self.in_flight: Lookups = Claims() if in_flight is None else in_flight
        self.stats = UserStats()

    async def import_users(self, user_ids: Iterable[int], progress: Progress) -> None:
        """Produce every user of ``user_ids`` not produced within the TTL."""
        ids = sorted({int(u) for u in user_ids})
        if not ids:
            return
        keys = [str(u) for u in ids]
        unknown = set(await self.store.unseen_keys(FOUND, keys))
        found = [k for k in keys if k not in unknown]
        if found:
            await self.store.mark_keys(FOUND, found, self.ttl_s)  # a hit refreshes the TTL
        claim = self.in_flight.take(await self.store.unseen_keys(MISSING,
                                                                 sorted(unknown, key=int)))
        ask = claim.mine  # the others are being read by another job
        self.stats.hits += len(keys) - len(ask)
        progress.user_hits += len(keys) - len(ask)
        progress.user_requests += len(ask)
        lookups = self.executor.client.metrics.user_lookups
        lookups.labels("cached").inc(len(keys) - len(ask))
        lookups.labels("requested").inc(len(ask))
        try:
            for key in ask:
                await self._ask(key, progress)
        except BaseException as exc:
            claim.release(exc)
            raise
        claim.release()
        await claim.wait_for_others()

    async def _ask(self, key: str, progress: Progress) -> None:
        self.stats.requests += 1
        try:
            await self.executor.read_one(stream("user"), Scope(0), progress, {"user": key})
        except NotFoundError:
            self.stats.missing += 1
            await self.store.mark_keys(MISSING, [key], self.ttl_s)  # never refreshed
            return
        await self.store.mark_keys(FOUND, [key], self.ttl_s)
