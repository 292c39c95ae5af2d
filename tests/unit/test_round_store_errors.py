"""A round whose store fails outside its task group (reading or writing the round's own
state) fails as a round; it never raises the store's error to the service."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.metrics import Metrics
from gitlab_producer.simulator.server import running_simulator
from gitlab_producer.simulator.world import WorldSpec
from gitlab_producer.sinks.file import FileSink
from gitlab_producer.store import SQLiteStore, StoreError
from gitlab_producer.sync.delivery import Deliverer
from gitlab_producer.sync.entities import SyncContext
from gitlab_producer.sync.round import SyncRound
from gitlab_producer.sync.windows import WindowRules


class FlakyStore(SQLiteStore):
    """Round metadata reads or writes fail on demand, like a Redis that just went away."""

    fail_get = False
    fail_set = False

    async def get_meta(self, key: str) -> str | None:
        if self.fail_get:
            raise StoreError("redis: Error 111 connecting. Connection refused.")
        return await super().get_meta(key)

    async def set_meta(self, key: str, value: str) -> None:
        if self.fail_set:
            raise StoreError("redis: Connection closed by server.")
        await super().set_meta(key, value)


@pytest.mark.parametrize("failing", ["fail_get", "fail_set"])
async def test_round_state_store_errors_fail_the_round(tmp_path: Path, failing: str) -> None:
    spec = WorldSpec(projects=3, users=2, events=30, history_days=1.0, seed=3)
    with running_simulator(spec) as sim:
        store = FlakyStore(tmp_path / "s.sqlite3")
        sink = FileSink(str(tmp_path / "events.jsonl"), "t")
        client = GitLabClient(f"{sim.url}/api/v4", "sim-token", RateLimiter(1000.0))
        metrics = Metrics()
        ctx = SyncContext(client, store, Deliverer(store, sink, 3600, metrics, "g"), metrics,
                          WindowRules(), 100, sim.sim.world.start_ms / 1000, asyncio.Event())
        sync_round = SyncRound(ctx, 2, sync_users=False)  # no state written inside the group
        try:
            setattr(store, failing, True)
            failed = await sync_round.run()
            assert not failed.ok and failed.error.startswith("StoreError: redis:")
            setattr(store, failing, False)
            assert (await sync_round.run()).ok  # and the next round, with the store back
        finally:
            await client.aclose()
            await sink.close()
            await store.close()
