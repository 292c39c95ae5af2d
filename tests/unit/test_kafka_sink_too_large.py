"""A record Kafka cannot take for its size costs only itself: the sink leaves it out (checked
against message.max.bytes before producing, or refused by librdkafka with its framing) and
delivers the rest of the batch; the event path skips, counts and marks it, so a project's
cursor moves on."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from gitlab_producer.gitlab.events import Event
from gitlab_producer.metrics import Metrics
from gitlab_producer.sinks.base import Message, MessageTooLarge, message_size
from gitlab_producer.sinks.kafka import KafkaSink
from gitlab_producer.store.sqlite_store import SQLiteStore
from gitlab_producer.sync.delivery import Deliverer
from tests.conftest import Broker, consume

LIMIT = 100_000


def sample(metrics: Metrics, kind: str) -> float:
    value = metrics.registry.get_sample_value(
        "gitlab_producer_records_skipped_total", {"kind": kind, "reason": "too_large"})
    return value or 0.0


async def test_only_the_oversized_messages_of_a_batch_are_refused(broker: Broker) -> None:
    topic = f"tl-{uuid.uuid4().hex[:8]}"
    sink = KafkaSink({"bootstrap.servers": broker.bootstrap, "message.max.bytes": LIMIT,
                      "linger.ms": 0}, topic)
    at_limit = Message(b"3", b"", ())
    at_limit = Message(b"3", b"x" * (LIMIT - message_size(at_limit)), ())
    assert message_size(at_limit) == LIMIT  # passes the check, not librdkafka's framing
    batch = [Message(b"1", b"small-1", ()), Message(b"2", b"x" * (LIMIT + 1), ()),
             at_limit, Message(b"4", b"small-4", ())]
    try:
        with pytest.raises(MessageTooLarge) as raised:
            await sink.send(batch)
    finally:
        await sink.close()
    assert raised.value.refused == (1, 2)
    got = consume(broker.bootstrap, topic, 2, timeout_s=30)
    assert sorted(m.value() for m in got) == [b"small-1", b"small-4"]


async def test_an_oversized_event_is_skipped_counted_and_marked(broker: Broker,
                                                               tmp_path: Path) -> None:
    topic = f"te-{uuid.uuid4().hex[:8]}"
    sink = KafkaSink({"bootstrap.servers": broker.bootstrap, "message.max.bytes": LIMIT,
                      "linger.ms": 0}, topic)
    store = SQLiteStore(tmp_path / "s.db")
    metrics = Metrics()
    deliverer = Deliverer(store, sink, 3600, metrics, "gl.test")
    events = [Event(1, 7, 2, 0.0, b'{"id":1}'),
              Event(2, 7, 2, 0.0, b'{"id":2,"x":"' + b"x" * LIMIT + b'"}'),
              Event(3, 7, 2, 0.0, b'{"id":3}')]
    try:
        produced = await deliverer.deliver(events)
        again = await deliverer.deliver(events)  # a re-read: nothing is tried again
        unseen = await store.unseen([1, 2, 3])
    finally:
        await sink.close()
        await store.close()
    assert (produced, again, unseen) == (3, 0, [])
    assert sample(metrics, "project") == 1
    assert metrics.registry.get_sample_value(
        "gitlab_producer_events_produced_total", {"kind": "project"}) == 2
    got = consume(broker.bootstrap, topic, 2, timeout_s=30)
    assert sorted(m.value() for m in got) == [b'{"id":1}', b'{"id":3}']
