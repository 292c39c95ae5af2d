"""A replaced Kafka producer fails the batches it still holds instead of leaving them waiting.

The sink swaps in a new producer after an unrecoverable error (a fenced producer, seen after a
broker outage). Batches sent through the old one may still be waiting for acknowledgements
that will never come: they must fail (and be sent again next round), not hang the round.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gitlab_producer.sinks.base import DeliveryError, Message
from gitlab_producer.sinks.kafka import KafkaSink
from tests.conftest import Broker
from tests.waits import wait_until_async


async def test_batches_on_a_replaced_producer_fail_instead_of_waiting(broker: Broker) -> None:
    topic = f"renew-{uuid.uuid4().hex[:8]}"
    sink = KafkaSink({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True,
                      "acks": "all", "linger.ms": 5, "message.timeout.ms": 60_000}, topic)
    await sink.ping()
    broker.pause()
    try:
        pending = asyncio.create_task(sink.send([Message(b"1", b'{"id":1}', ())]))
        producer = sink._producer

        async def held() -> bool:
            return len(producer) > 0

        await wait_until_async(held, 5, "the message to be queued")
        await sink._renew("test")  # what an unrecoverable delivery error triggers
        with pytest.raises(DeliveryError):
            await asyncio.wait_for(pending, 15)  # well before the 60 s message timeout
    finally:
        broker.resume()
    await sink.close()
