"""A paginated read's saved position moves past a page only once every record of that page
(with the notes inside its discussions) was acknowledged: a read whose delivery failed resumes
at the page that failed, and the resumed read produces what was missing, once. Real simulator
over loopback HTTP, real SQLite store (the embedded mode), a sink that refuses one batch."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest

from gitlab_producer.gitlab.client import GitLabClient, RetryPolicy
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.objects.delivery import ObjectDeliverer
from gitlab_producer.objects.executor import Executor, Progress
from gitlab_producer.objects.positions import JobPositions
from gitlab_producer.objects.state import JobRecord, StateStore
from gitlab_producer.objects.streams import KINDS, Scope, stream
from gitlab_producer.objects.users import UserCache
from gitlab_producer.simulator.server import running_simulator
from gitlab_producer.simulator.world import WorldSpec
from gitlab_producer.sinks.base import DeliveryError, Message
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.unit.test_objects_delivery import ListSink

PAGE = 10  # items per page, so that every stream below has several pages


class RefusingSink(ListSink):
    """Acknowledges every batch but the ``refuse``-th (1-based); 0: every batch."""

    def __init__(self, refuse: int) -> None:
        super().__init__()
        self.refuse = refuse
        self.batches = 0

    async def send(self, messages: Sequence[Message]) -> None:
        self.batches += 1
        if self.batches == self.refuse:
            raise DeliveryError("broker did not acknowledge")
        await super().send(messages)


@pytest.mark.parametrize(("name", "scope"), [
    ("commits", Scope(1)),  # offset pages (X-Next-Page)
    ("jobs", Scope(1)),  # keyset pages (Link rel=next)
    ("issues", Scope(1)),  # a time cursor (updated_after, ascending updated_at)
    ("discussions", Scope(1, "merge_requests", 1)),  # with the notes inside each discussion
])
async def test_a_failed_page_is_read_again_and_nothing_is_lost_or_doubled(
        tmp_path: Path, name: str, scope: Scope) -> None:
    spec = WorldSpec(projects=1, users=6, events=60, seed=17, objects_per_project=60,
                     feature_off_share=0.0)
    base = stream(name)
    paged = dataclasses.replace(base, params=tuple(
        (k, str(PAGE) if k == "per_page" else v) for k, v in base.params))
    wanted = frozenset(KINDS) - {"users"}
    with running_simulator(spec) as sim:
        client = GitLabClient(f"{sim.url}/api/v4", "sim-token", RateLimiter(1000),
                              policy=RetryPolicy(max_retries=0))
        store = SQLiteStore(tmp_path / "state.db")
        state = StateStore(store)
        job = JobRecord("1:s6:page", 1, 6, "children")
        await state.save_job(job)
        sink = RefusingSink(refuse=2)  # the second page is not acknowledged
        try:
            executor = Executor(client, ObjectDeliverer(store, sink, "p", "s", 3600), wanted)
            positions = JobPositions(job, state, UserCache(store, executor, 60), Progress())
            with pytest.raises(DeliveryError):
                await executor.read(paged, scope, positions.progress, positions, name)
            await positions.flush()  # as a failing job does (stages._run)
            after_first = len(sink.sent)
            assert after_first > 0  # the first page went out
            saved = (await state.job(job.id) or job).positions[name]
            assert not saved.get("done")
            # Resumed from the saved position by a new run of the job: the refused page first.
            job = await state.job(job.id) or job
            positions = JobPositions(job, state, UserCache(store, executor, 60), Progress())
            await executor.read(paged, scope, positions.progress, positions, name)
            await positions.flush()
            assert (await state.job(job.id) or job).positions[name] == {"done": True}
            # Everything, read in one go without a fault, for the comparison.
            whole = ListSink()
            fresh = SQLiteStore(tmp_path / "fresh.db")
            try:
                reader = Executor(client, ObjectDeliverer(fresh, whole, "p", "s", 3600), wanted)
                again = JobPositions(JobRecord("x", 1, 6, "children"), StateStore(fresh),
                                     UserCache(fresh, reader, 60), Progress())
                await reader.read(paged, scope, again.progress, again, name)
            finally:
                await fresh.close()
        finally:
            await client.aclose()
            await store.close()
    produced = [(m.topic, m.key) for m in sink.sent]
    expected = {(m.topic, m.key) for m in whole.sent}
    assert len(whole.sent) > 2 * PAGE  # several pages
    assert len(produced) == len(set(produced))  # nothing twice
    assert set(produced) == expected  # nothing missing
    # The resumed read did not begin past the refused page: it sent that page's records.
    assert sink.sent[after_first].key == whole.sent[after_first].key
