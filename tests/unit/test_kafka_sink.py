"""The Kafka sink against a real broker: batches are acknowledged, values arrive unchanged."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from confluent_kafka import KafkaError

from gitlab_producer.sinks.base import DeliveryError, Message
from gitlab_producer.sinks.kafka import EpochWatch, KafkaSink
from tests.conftest import Broker, OwnBroker, consume


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


async def test_a_restarted_broker_is_written_to_again(own_broker: OwnBroker) -> None:
    """A new broker on the same address does not know the producer id: the sink replaces
    its producer instead of timing out for ever, and the batch it failed is sent again."""
    topic = f"restart-{uuid.uuid4().hex[:8]}"
    sink = KafkaSink({"bootstrap.servers": own_broker.bootstrap, "enable.idempotence": True,
                      "acks": "all", "linger.ms": 5, "message.timeout.ms": 120_000}, topic)
    await sink.send([Message(b"k", b"before", ())])
    own_broker.kill()
    own_broker.start()
    values = [b"after-%d" % i for i in range(100)]
    failures = 0
    async with asyncio.timeout(30):
        while True:
            try:
                await sink.send([Message(b"k", v, ()) for v in values])
                break
            except DeliveryError:  # the stuck producer's batch, failed when it was replaced
                failures += 1
    await sink.close()
    assert failures <= 1
    got = consume(own_broker.bootstrap, topic, len(values), timeout_s=30)
    assert sorted(m.value() for m in got) == sorted(values)


def test_epoch_watch_spots_the_bump_loop_only() -> None:
    now = [0.0]
    watch = EpochWatch(bumps=5, window_s=10.0, clock=lambda: now[0])

    def report(epoch: int) -> bool:
        now[0] += 1.0
        return watch.stuck(orjson.dumps({"eos": {"producer_epoch": epoch}}))

    assert not any(report(n // 3) for n in range(30))  # a bump every 3 s: librdkafka's own
    assert not watch.stuck(b'{"eos": {"producer_epoch": -1}}')  # no producer id yet
    assert not watch.stuck(b"{}") and not watch.stuck(b"not json")
    assert report(9 + 10)  # ten bumps within a second: the broker does not know the id


async def test_a_fatal_producer_error_replaces_the_producer(broker: Broker) -> None:
    """librdkafka reports a fatal error (its idempotence state is gone) through the error
    callback: that producer never delivers again, so it is replaced, once; an older
    producer's late report changes nothing."""
    topic = f"fatal-{uuid.uuid4().hex[:8]}"
    sink = KafkaSink({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True,
                      "acks": "all", "linger.ms": 5}, topic)
    await sink.send([Message(b"k", b"first", ())])
    fatal = KafkaError(KafkaError._FATAL, "test: idempotence state lost", fatal=True)
    sink.on_producer_error(0, fatal)
    async with asyncio.timeout(10):
        while sink.renewals < 1:
            await asyncio.sleep(0.01)
    sink.on_producer_error(0, fatal)  # the replaced producer again: ignored
    sink.on_producer_error(1, KafkaError(KafkaError._TRANSPORT, "not fatal"))
    await asyncio.sleep(0.2)
    assert sink.renewals == 1
    await sink.send([Message(b"k", b"second", ())])
    await sink.close()
    got = consume(broker.bootstrap, topic, 2, timeout_s=30)
    assert sorted(m.value() for m in got) == [b"first", b"second"]


async def delivered_within(sink: KafkaSink, value: bytes, timeout_s: float) -> None:
    """Send ``value`` until the broker acknowledges it (each try fails at the sink's message
    timeout); fails the test after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                await sink.send([Message(b"k", value, ())])
                return
            except DeliveryError:
                continue


async def test_timed_out_messages_replace_the_producer(broker: Broker) -> None:
    topic = f"timeout-{uuid.uuid4().hex[:8]}"
    sink = KafkaSink({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True,
                      "acks": "all", "linger.ms": 0, "message.timeout.ms": 1000}, topic)
    # Delivered before the pause (bounded): on a loaded machine the topic's creation alone
    # took longer than the 1 s timeout once, which also renews the producer.
    await delivered_within(sink, b"first", 30)
    renewed_before = sink.renewals
    broker.pause()
    try:
        with pytest.raises(DeliveryError, match="timed out"):
            await sink.send([Message(b"k", b"lost", ())])
    finally:
        broker.resume()
    assert sink.renewals == renewed_before + 1
    await delivered_within(sink, b"again", 30)
    await sink.close()
    assert b"again" in {m.value() for m in consume(broker.bootstrap, topic, 2, timeout_s=30)}
