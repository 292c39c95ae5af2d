"""Claims on webhook keys in the store: atomic across instances sharing it (two Redis
clients, or two processes on one SQLite file), and expiring so a crash never blocks a key."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from aiohttp import web

from gitlab_producer.http.webhooks import (
    WebhookConfig,
    WebhookReceiver,
    WebhookRunner,
    build_webhook_app,
)
from gitlab_producer.metrics import Metrics
from gitlab_producer.simulator.server import free_port
from gitlab_producer.sinks.file import FileSink
from gitlab_producer.store.base import Store
from gitlab_producer.store.redis_store import RedisStore
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.conftest import TEST_REDIS_DB
from tests.unit.test_webhook_receiver import serving


@pytest.fixture(params=["sqlite", "redis"])
async def two_instances(request: pytest.FixtureRequest, tmp_path: Path
                        ) -> AsyncIterator[tuple[Store, Store]]:
    """Two store objects over the same data, as two service instances would have."""
    stores: list[Store] = []
    for _ in range(2):
        if request.param == "sqlite":
            stores.append(SQLiteStore(tmp_path / "state.sqlite3"))
        else:
            stores.append(RedisStore.from_address(
                request.getfixturevalue("redis_address"), db=TEST_REDIS_DB,
                prefix=request.getfixturevalue("redis_prefix")))
    yield stores[0], stores[1]
    for store in stores:
        await store.close()


async def test_one_claim_wins_and_a_mark_means_done(two_instances: tuple[Store, Store]) -> None:
    first, second = two_instances
    states = await asyncio.gather(*(store.claim_key("hook", "k1", 30)
                                    for store in (first, second) * 5))
    assert sorted(states) == ["claimed"] + ["pending"] * 9
    await first.mark_keys("hook", ["k1"], ttl_s=60)
    assert await second.claim_key("hook", "k1", 30) == "done"
    assert await second.claim_key("other", "k1", 30) == "claimed"  # namespaces stay apart


async def test_a_released_or_expired_claim_can_be_taken_again(
        two_instances: tuple[Store, Store]) -> None:
    first, second = two_instances
    assert await first.claim_key("hook", "k2", 30) == "claimed"
    await first.release_key("hook", "k2")  # the delivery failed
    assert await second.claim_key("hook", "k2", 0.3) == "claimed"
    assert await first.claim_key("hook", "k2", 30) == "pending"
    deadline = asyncio.get_running_loop().time() + 5  # the claimer died: its claim runs out
    while (state := await first.claim_key("hook", "k2", 30)) == "pending":
        assert asyncio.get_running_loop().time() < deadline
    assert state == "claimed"
    assert await first.unseen_keys("hook", ["k2"]) == ["k2"]  # a claim is not a mark


async def test_a_delivery_another_instance_is_producing_gets_503(tmp_path: Path) -> None:
    """The other instance holds the claim: this one must neither produce nor say duplicate."""
    other = SQLiteStore(tmp_path / "state.sqlite3")
    metrics = Metrics()
    headers = {"X-Gitlab-Token": "s3cret", "X-Gitlab-Event": "Push Hook",
               "Idempotency-Key": "in-flight"}
    body = orjson.dumps({"object_kind": "push", "project_id": 3})
    try:
        assert await other.claim_key("hook", "in-flight", 30) == "claimed"
        async with serving(tmp_path, metrics) as (url, _), \
                httpx.AsyncClient(timeout=10) as client:
            busy = await client.post(url, content=body, headers=headers)
            await other.release_key("hook", "in-flight")  # its delivery failed
            retried = await client.post(url, content=body, headers=headers)
    finally:
        await other.close()
    assert (busy.status_code, busy.headers["Retry-After"]) == (503, "5")
    assert retried.json() == {"status": "delivered"}
    assert len((tmp_path / "hooks.jsonl").read_bytes().splitlines()) == 1


async def test_a_failed_delivery_drops_its_claim(tmp_path: Path) -> None:
    """A retry of a delivery that failed (the sink could not write) may produce at once."""
    store = SQLiteStore(tmp_path / "state.sqlite3")
    sink = FileSink("/dev/full", "bus.hooks")  # every write fails: ENOSPC
    receiver = WebhookReceiver(WebhookConfig("s3cret", "", 300, 3600, "gl.test"), store, sink,
                               Metrics())
    runner = WebhookRunner(build_webhook_app(receiver, 4096))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    headers = {"X-Gitlab-Token": "s3cret", "X-Gitlab-Event": "Push Hook",
               "Idempotency-Key": "fails"}
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            failed = await client.post(f"http://127.0.0.1:{port}/webhooks/gitlab",
                                       content=b'{"object_kind": "push"}', headers=headers)
        await receiver.drain()
        state = await store.claim_key("hook", "fails", 30)
    finally:
        await runner.cleanup()
        with contextlib.suppress(OSError):  # its buffer cannot be flushed either
            await sink.close()
        await store.close()
    assert failed.status_code == 503
    assert state == "claimed"
