"""Kafka sink on confluent-kafka: idempotent producer, ``acks=all``, SASL when configured.

``send`` produces a whole batch without awaiting each message; a background thread serves
librdkafka's delivery callbacks, and the batch resolves once every message is acknowledged.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from gitlab_producer.config import Settings
from gitlab_producer.logs import get_logger
from gitlab_producer.sinks.base import DeliveryError, Message

log = get_logger(__name__)


def kafka_config(settings: Settings) -> dict[str, Any]:
    """The librdkafka configuration the settings describe (tested on its own)."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 200_000,
        "message.timeout.ms": int(settings.kafka_delivery_timeout * 1000),
        "compression.type": settings.kafka_compression,
        "client.id": "gitlab-producer",
    }
    protocol = settings.kafka_security_protocol
    if settings.kafka_login:
        config.update({
            "security.protocol": protocol or "SASL_SSL",
            "sasl.mechanism": settings.kafka_sasl_mechanism,
            "sasl.username": settings.kafka_login,
            "sasl.password": settings.kafka_password.get_secret_value(),
        })
    elif protocol:
        config["security.protocol"] = protocol
    return config


# Errors after which this producer instance never delivers again (its idempotence state was
# lost or fenced, e.g. by a broker that rejects librdkafka's epoch bump after a timed-out
# request); librdkafka's advice is a new instance.
UNRECOVERABLE = frozenset({
    KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, KafkaError.INVALID_PRODUCER_ID_MAPPING,
    KafkaError._FATAL, KafkaError._FENCED,
})


class _Batch:
    """Counts acknowledgements from librdkafka's thread and wakes the event loop at zero."""

    __slots__ = ("error", "future", "lock", "loop", "remaining", "unrecoverable")

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self.remaining = size
        self.error: str | None = None
        self.unrecoverable = False
        self.lock = threading.Lock()
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()

    def settle(self, count: int, error: str | None) -> None:
        with self.lock:
            if error is not None and self.error is None:
                self.error = error
            self.remaining -= count
            finished = self.remaining == 0
        if finished:
            self.loop.call_soon_threadsafe(self._finish)

    def on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None and (err.fatal() or err.code() in UNRECOVERABLE):
            self.unrecoverable = True
        self.settle(1, None if err is None else str(err))

    def _finish(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class KafkaSink:
    """Produces to one topic and reports each batch only when Kafka acknowledged all of it."""

    def __init__(self, config: dict[str, Any], topic: str) -> None:
        self.topic = topic
        self._config = {**config, "error_cb": self._on_error}
        self._producer = Producer(self._config)
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.05)

    @staticmethod
    def _on_error(err: KafkaError) -> None:
        log.warning("kafka_error", error=str(err), fatal=err.fatal())

    async def send(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        batch = _Batch(len(messages), asyncio.get_running_loop())
        producer = self._producer
        produce = producer.produce
        for index, message in enumerate(messages):
            while True:
                try:
                    produce(message.topic or self.topic, message.value, message.key,
                            headers=list(message.headers), on_delivery=batch.on_delivery)
                    break
                except BufferError:
                    await asyncio.sleep(0.005)  # local queue full: let librdkafka drain
                except KafkaException as exc:
                    batch.settle(len(messages) - index, str(exc))
                    raise DeliveryError(f"kafka produce failed: {exc}") from exc
        await batch.future
        if batch.unrecoverable and producer is self._producer:  # once, not per failed batch
            await self._renew()
        if batch.error is not None:
            raise DeliveryError(f"kafka delivery failed: {batch.error}")

    async def _renew(self) -> None:
        """Swap in a new producer; what the old one still holds was never acknowledged,
        so it was reported as failed and will be sent again."""
        old, self._producer = self._producer, Producer(self._config)
        log.warning("kafka_producer_renewed", topic=self.topic)

        def retire() -> None:
            old.purge()
            old.flush(0)

        await asyncio.get_running_loop().run_in_executor(None, retire)

    async def ping(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                None, lambda: self._producer.list_topics(self.topic, timeout=3))
        except KafkaException as exc:
            raise DeliveryError(f"kafka unreachable: {exc}") from exc

    async def close(self, timeout_s: float = 1.5) -> None:
        """Flush for at most ``timeout_s``: every batch a round waited on is acknowledged
        already, so only a broker outage leaves anything here, and SIGTERM must end within
        10 s (``SHUTDOWN_GRACE`` + this). What stays unflushed was never marked as sent."""
        loop = asyncio.get_running_loop()
        remaining = await loop.run_in_executor(None, self._producer.flush, timeout_s)
        self._closed.set()
        await loop.run_in_executor(None, self._poller.join, 2.0)
        if remaining:
            log.warning("kafka_unflushed", messages=remaining)
