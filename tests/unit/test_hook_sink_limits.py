"""The webhook sink against the real broker (tansu): it takes bodies up to WEBHOOK_MAX_BODY,
and a message Kafka can never take is a 413 at once, not a 503 GitLab would retry for ever."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from aiohttp import web

from gitlab_producer.config import load_settings
from gitlab_producer.http.webhooks import (
    WebhookConfig,
    WebhookReceiver,
    WebhookRunner,
    build_webhook_app,
)
from gitlab_producer.metrics import Metrics
from gitlab_producer.simulator.server import free_port
from gitlab_producer.sinks import MessageTooLarge, open_sink
from gitlab_producer.sinks.base import Message
from gitlab_producer.sinks.kafka import KafkaSink
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.conftest import Broker, consume

MIB = 1024 * 1024


def big_body(size: int) -> bytes:
    return orjson.dumps({"object_kind": "push", "project_id": 5, "blob": "x" * size})


async def test_hook_sink_takes_bodies_up_to_webhook_max_body(broker: Broker) -> None:
    topic = f"big-{uuid.uuid4().hex[:8]}"
    settings = load_settings(None, gitlab_base_url="http://127.0.0.1:1/api/v4",
                             gitlab_private_token="t", kafka_bootstrap_servers=broker.bootstrap,
                             webhook_max_body=3 * MIB)
    sink = open_sink(settings, topic, low_latency=True)
    body = big_body(3 * MIB - 100)  # librdkafka's default message.max.bytes is 1,000,000
    try:
        await sink.send([Message(b"5", body, (("event", b"Push Hook"),))])
    finally:
        await sink.close()
    got = consume(broker.bootstrap, topic, 1, timeout_s=30)
    assert [m.value() for m in got] == [body]


async def test_a_message_kafka_can_never_take_is_message_too_large(broker: Broker) -> None:
    sink = KafkaSink({"bootstrap.servers": broker.bootstrap, "message.max.bytes": 100_000},
                     f"small-{uuid.uuid4().hex[:8]}")
    try:
        with pytest.raises(MessageTooLarge):
            await sink.send([Message(b"1", big_body(200_000), ())])
        await sink.send([Message(b"1", b"{}", ())])  # and the sink goes on delivering
    finally:
        await sink.close()


@contextlib.asynccontextmanager
async def receiver_on(sink: KafkaSink, tmp_path: Path, metrics: Metrics
                      ) -> AsyncIterator[str]:
    store = SQLiteStore(tmp_path / "state.sqlite3")
    receiver = WebhookReceiver(WebhookConfig("s3cret", "", 300, 3600, "gl.test", 4 * MIB),
                               store, sink, metrics)
    runner = WebhookRunner(build_webhook_app(receiver, 4 * MIB))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/webhooks/gitlab"
    finally:
        await runner.cleanup()
        await sink.close()
        await store.close()


async def test_body_kafka_refuses_gets_413_at_once(broker: Broker, tmp_path: Path) -> None:
    """Under WEBHOOK_MAX_BODY but over what the producer (or the topic) takes."""
    metrics = Metrics()
    sink = KafkaSink({"bootstrap.servers": broker.bootstrap, "message.max.bytes": 100_000,
                      "linger.ms": 0}, f"refuse-{uuid.uuid4().hex[:8]}")
    headers = {"X-Gitlab-Token": "s3cret", "X-Gitlab-Event": "Push Hook"}
    async with receiver_on(sink, tmp_path, metrics) as url, \
            httpx.AsyncClient(timeout=15) as client:
        started = time.monotonic()
        refused = await client.post(url, content=big_body(200_000), headers=headers)
        elapsed = time.monotonic() - started
        small = await client.post(url, content=big_body(10), headers=headers)
    assert (refused.status_code, refused.json()) == (413, {"status": "larger than Kafka accepts"})
    assert elapsed < 2
    assert small.status_code == 200
