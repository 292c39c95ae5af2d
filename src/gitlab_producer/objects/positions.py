"""A job's page positions and counts, saved together in its record after delivered pages
(at most once per ``SAVE_EVERY_S``, and when the job ends or fails): a resumed job re-reads at
most the pages of its last second, and counts them once. (Saving after every page rewrote a
child job's whole record once per list: 400 times for a page of 100 issues.)

A position reaches the record only with the users its pages referenced: those are produced
first, and when that fails the positions stay where they were, so the job (retried, or the next
run) reads those pages again and finds their users again. The job itself reads the positions
it has reached in this run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from gitlab_producer.objects.executor import Executor, Progress
from gitlab_producer.objects.state import JobRecord, StateStore, add_counts
from gitlab_producer.objects.users import UserCache

SAVE_EVERY_S = 1.0


class JobPositions:
    """:class:`~gitlab_producer.objects.executor.Positions` on a :class:`JobRecord`."""

    def __init__(self, job: JobRecord, state: StateStore, users: UserCache,
                 progress: Progress) -> None:
        self.job = job
        self.state = state
        self.users = users
        self.progress = progress
        self._reached: dict[str, dict[str, Any]] = {}  # delivered, not yet in the record
        self._saved_at = time.monotonic()

    @property
    def executor(self) -> Executor:
        return self.users.executor

    def position(self, stream_id: str) -> Mapping[str, Any] | None:
        return self._reached.get(stream_id) or self.job.positions.get(stream_id)

    async def save_position(self, stream_id: str, position: Mapping[str, Any]) -> None:
        self._reached[stream_id] = dict(position)
        if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
            await self.flush()

    async def flush(self) -> None:
        """Import the users the pages so far referenced, then save counts and positions."""
        progress = self.progress
        if progress.users:
            await self.users.import_users(progress.users, progress)
            progress.users = set()  # only once imported: a failed lookup is tried again
        job = self.job
        job.positions.update(self._reached)
        self._reached = {}
        if progress.uploads:
            job.uploads = sorted(set(job.uploads) | progress.uploads)
            progress.uploads = set()
        add_counts(job.fetched, progress.fetched)
        add_counts(job.imported, progress.imported)
        add_counts(job.produced, progress.produced)
        add_counts(job.too_large, progress.too_large)
        job.user_hits += progress.user_hits
        job.user_requests += progress.user_requests
        progress.fetched.clear()
        progress.imported.clear()
        progress.produced.clear()
        progress.too_large.clear()
        progress.user_hits = progress.user_requests = 0
        await self.state.save_job(job)
        self._saved_at = time.monotonic()
