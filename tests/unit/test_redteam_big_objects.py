"""Red-team finding: one object larger than the producer's message.max.bytes (a 1.1 MB note:
GitLab allows notes of 1,000,000 characters, more bytes in UTF-8 and JSON) fails the whole page
with it, so every other note of the issue is never produced, run after run."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.objects.delivery import ObjectDeliverer
from gitlab_producer.objects.executor import Executor, Progress
from gitlab_producer.objects.objsync import NoPositions
from gitlab_producer.objects.streams import KINDS, Scope, stream
from gitlab_producer.simulator.server import running_simulator
from gitlab_producer.simulator.world import WorldSpec
from gitlab_producer.sinks.kafka import KafkaSink
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.conftest import Broker

SPEC = WorldSpec(projects=1, users=6, events=30, history_days=1.0, seed=37, quiet_s=7200.0,
                 objects_per_project=20, feature_off_share=0.0)


async def test_one_oversized_note_costs_only_itself(broker: Broker, tmp_path: Path) -> None:
    with running_simulator(SPEC) as sim:
        small = httpx.post(f"{sim.url}/_simulator/changes", timeout=10, json={
            "kind": "add_note", "project_id": 1, "on": "issue", "body": "small"}).json()
        iid = small["changes"][0]["object"]["iid"]
        httpx.post(f"{sim.url}/_simulator/changes", timeout=30, json={
            "kind": "add_note", "project_id": 1, "on": "issue", "iid": iid,
            "body": "é" * 600_000})  # 1.2 MB in UTF-8
        client = GitLabClient(f"{sim.url}/api/v4", "sim-token", RateLimiter(1000))
        store = SQLiteStore(tmp_path / "s.db")
        prefix = f"big-{uuid.uuid4().hex[:8]}"
        sink = KafkaSink({"bootstrap.servers": broker.bootstrap, "linger.ms": 0},
                         f"{prefix}.objects")
        executor = Executor(client, ObjectDeliverer(store, sink, prefix, "s", 3600,
                                                    metrics=client.metrics),
                            frozenset(KINDS))
        progress = Progress()
        try:
            await executor.read(stream("discussions"), Scope(1, "issues", iid), progress,
                                NoPositions(), "discussions")
        finally:
            await sink.close()
            await client.aclose()
            await store.close()
        assert progress.produced["notes"] >= 1  # the small note at least
        assert progress.too_large["notes"] == 1  # the big one: skipped, counted
        assert progress.imported["notes"] == progress.fetched["notes"] - 1
        assert client.metrics.registry.get_sample_value(
            "gitlab_producer_records_skipped_total",
            {"kind": "notes", "reason": "too_large"}) == 1
