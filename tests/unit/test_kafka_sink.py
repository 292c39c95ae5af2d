"""The Kafka sink against a real broker: batches are acknowledged, values arrive unchanged."""

from __future__ import annotations

import uuid

import orjson

from gitlab_producer.sinks.base import Message
from gitlab_producer.sinks.kafka import KafkaSink
from tests.conftest import Broker, consume


async def test_batch_is_acknowledged_and_readable(broker: Broker) -> None:
    topic = f"sink-{uuid.uuid4().hex[:8]}"
    sink = KafkaSink({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True,
                      "acks": "all", "linger.ms": 5}, topic)
    values = [orjson.dumps({"id": i, "title": None, "note": "ünï"}) for i in range(500)]
    await sink.send([Message(str(i % 7).encode(), v, (("event_id", str(i).encode()),))
                     for i, v in enumerate(values)])
    await sink.ping()
    await sink.close()
    got = consume(broker.bootstrap, topic, 500, timeout_s=30)
    assert sorted(m.value() for m in got) == sorted(values)
    assert all(dict(m.headers())["event_id"] == orjson.loads(m.value())["id"].__str__().encode()
               for m in got)
