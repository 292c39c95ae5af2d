"""Kafka sink on confluent-kafka: idempotent producer, ``acks=all``, SASL when configured.

``send`` produces a whole batch without awaiting each message; a background thread serves
librdkafka's delivery callbacks, and the batch resolves once every message is acknowledged.

A producer that can no longer deliver (fenced, a fatal error, timed-out messages, or a
restarted broker that does not know its producer id) is replaced by a new one; what the old
one held was never acknowledged, so it fails its batches and is sent again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer

from gitlab_producer.config import Settings
from gitlab_producer.logs import get_logger
from gitlab_producer.sinks.base import DeliveryError, Message, MessageTooLarge, message_size

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
        "message.max.bytes": settings.kafka_message_max_bytes,
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


STATS_INTERVAL_MS = 1000
STUCK_BUMPS = 5  # local epoch bumps within ...
STUCK_WINDOW_S = 10.0  # ... this long: the broker does not know the producer id
RETIRE_FLUSH_S = 5.0  # serve the purged messages' reports of a replaced producer
DEFAULT_MAX_BYTES = 1_000_000  # librdkafka's message.max.bytes


class EpochWatch:
    """Spots an idempotent producer that a restarted broker no longer knows. librdkafka meets
    each ``UNKNOWN_PRODUCER_ID`` by bumping its epoch locally and retrying, many times a
    second, and never asks for a new id: nothing is delivered, every message times out, for
    ever. Fed librdkafka's statistics (``producer_epoch`` in their ``eos`` part)."""

    def __init__(self, bumps: int = STUCK_BUMPS, window_s: float = STUCK_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bumps = bumps
        self.window_s = window_s
        self._clock = clock
        self._seen: deque[tuple[float, int]] = deque()

    def stuck(self, stats: str | bytes) -> bool:
        """Whether the epoch rose by ``bumps`` within ``window_s`` (this report included)."""
        try:
            epoch = orjson.loads(stats).get("eos", {}).get("producer_epoch")
        except (orjson.JSONDecodeError, AttributeError):
            return False
        if not isinstance(epoch, int) or epoch < 0:
            return False
        now = self._clock()
        self._seen.append((now, epoch))
        while self._seen[0][0] < now - self.window_s:
            self._seen.popleft()
        return epoch - self._seen[0][1] >= self.bumps


class _Batch:
    """Counts acknowledgements from librdkafka's thread and wakes the event loop at zero.
    A message refused for its size is only noted (``refused``): it fails no other."""

    __slots__ = ("error", "future", "lock", "loop", "refused", "remaining", "timed_out",
                 "unrecoverable")

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self.remaining = size
        self.error: str | None = None
        self.unrecoverable = False
        self.timed_out = False
        self.refused: list[int] = []  # indices of the messages refused for their size
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

    def refuse(self, index: int) -> None:
        with self.lock:
            self.refused.append(index)
        self.settle(1, None)

    def on_delivery(self, index: int, err: KafkaError | None, _msg: Any) -> None:
        if err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
            self.refuse(index)  # the broker's (topic's) limit
            return
        if err is not None and (err.fatal() or err.code() in UNRECOVERABLE):
            self.unrecoverable = True
        elif err is not None and err.code() == KafkaError._MSG_TIMED_OUT:
            self.timed_out = True
        self.settle(1, None if err is None else str(err))

    def _finish(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class KafkaSink:
    """Produces to one topic and reports each batch only when Kafka acknowledged all of it."""

    def __init__(self, config: dict[str, Any], topic: str) -> None:
        self.topic = topic
        self.renewals = 0
        # What librdkafka refuses at once (the broker's or topic's limit may be lower).
        self.max_bytes = int(config.get("message.max.bytes", DEFAULT_MAX_BYTES))
        self._config = {**config, "statistics.interval.ms": STATS_INTERVAL_MS}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation = 0
        self._renewing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._producer = self._new_producer()
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-poll", daemon=True)
        self._poller.start()

    def _new_producer(self) -> Producer:
        watch, generation = EpochWatch(), self._generation

        def on_stats(stats: str) -> None:  # on the poll thread
            if watch.stuck(stats):
                self._renew_soon(generation, "the broker does not know the producer id "
                                             "(a restarted broker?)")

        def on_error(err: KafkaError) -> None:
            self.on_producer_error(generation, err)

        return Producer({**self._config, "stats_cb": on_stats, "error_cb": on_error})

    def on_producer_error(self, generation: int, err: KafkaError) -> None:
        """librdkafka's error callback for producer ``generation`` (any thread): logged; a
        fatal error (the instance never produces again) has the producer replaced."""
        log.warning("kafka_error", error=str(err), fatal=err.fatal())
        if err.fatal():
            self._renew_soon(generation, f"fatal error: {err.str()}")

    def _renew_soon(self, generation: int, reason: str) -> None:
        """Replace producer ``generation``, unless it was already (from any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._renew_current, generation, reason)

    def _renew_current(self, generation: int, reason: str) -> None:
        if generation != self._generation or self._renewing:
            return  # an older producer's report, or being replaced already
        task = asyncio.create_task(self._renew(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _poll(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.05)

    async def send(self, messages: Sequence[Message]) -> None:
        """Produce ``messages``; a message over ``message.max.bytes`` (checked before it is
        produced) or refused for its size by librdkafka or the broker is left out, and
        reported by :class:`MessageTooLarge` once every other one was acknowledged."""
        if not messages:
            return
        self._loop = loop = asyncio.get_running_loop()
        batch = _Batch(len(messages), loop)
        producer = self._producer
        produce = producer.produce
        limit = self.max_bytes
        for index, message in enumerate(messages):
            if message_size(message) > limit:
                batch.refuse(index)
                continue
            while True:
                try:
                    produce(message.topic or self.topic, message.value, message.key,
                            headers=list(message.headers),
                            on_delivery=partial(batch.on_delivery, index))
                    break
                except BufferError:
                    await asyncio.sleep(0.005)  # local queue full: let librdkafka drain
                    if producer is not self._producer:
                        break
                except KafkaException as exc:
                    error = exc.args[0] if exc.args else None
                    if (isinstance(error, KafkaError)
                            and error.code() == KafkaError.MSG_SIZE_TOO_LARGE):
                        batch.refuse(index)  # with its framing, over the limit
                        break
                    batch.settle(len(messages) - index, str(exc))
                    if (isinstance(error, KafkaError) and error.fatal()
                            and producer is self._producer):
                        await self._renew(f"fatal error: {error.str()}")
                    raise DeliveryError(f"kafka produce failed: {exc}") from exc
            if producer is not self._producer:  # replaced while waiting for room: retired
                batch.settle(len(messages) - index, "kafka producer replaced")
                break
        await batch.future
        if (batch.unrecoverable or batch.timed_out) and producer is self._producer:
            await self._renew("fatal error" if batch.unrecoverable else "messages timed out")
        if batch.error is not None:
            raise DeliveryError(f"kafka delivery failed: {batch.error}")
        if batch.refused:
            raise MessageTooLarge(f"kafka refused {len(batch.refused)} message(s) larger "
                                  f"than it accepts (message.max.bytes {limit})",
                                  sorted(batch.refused))

    async def _renew(self, reason: str) -> None:
        """Swap in a new producer; what the old one still holds was never acknowledged,
        so it was reported as failed and will be sent again."""
        if self._renewing:
            return
        self._renewing = True
        try:
            old = self._producer
            self._generation += 1
            self._producer = self._new_producer()
            self.renewals += 1
            log.warning("kafka_producer_renewed", topic=self.topic, reason=reason)

            def retire() -> None:
                old.purge()
                old.flush(RETIRE_FLUSH_S)

            await asyncio.get_running_loop().run_in_executor(None, retire)
        finally:
            self._renewing = False

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
