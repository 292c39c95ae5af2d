"""Where events go: the message every sink takes, and the sink contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec

from gitlab_producer.logs import get_logger

if TYPE_CHECKING:
    from gitlab_producer.metrics import Metrics

log = get_logger(__name__)


class Message(msgspec.Struct, frozen=True):
    """One record: key, value (the event JSON as GitLab returned it) and headers. ``topic``
    empty: the sink's own topic; the object import names one topic per kind."""

    key: bytes
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    topic: str = ""


class DeliveryError(Exception):
    """The sink did not acknowledge every message of a batch."""


class MessageTooLarge(DeliveryError):
    """A message is larger than the producer or the topic accepts: retrying cannot help.

    ``refused`` holds the indices (in the batch) of the messages refused for their size;
    every other message of the batch was acknowledged."""

    def __init__(self, reason: str, refused: Sequence[int] = ()) -> None:
        super().__init__(reason)
        self.refused = tuple(refused)


class Sink(Protocol):
    """Send batches and return only once every message is acknowledged."""

    async def send(self, messages: Sequence[Message]) -> None:
        """Deliver all of ``messages``; raise :class:`DeliveryError` if any was not."""

    async def ping(self) -> None:
        """Raise :class:`DeliveryError` when the destination cannot be reached."""

    async def close(self) -> None:
        """Flush what is pending and release resources."""


def message_size(message: Message) -> int:
    """The bytes of a message's key, value and headers (what ``message.max.bytes`` bounds,
    without the record framing)."""
    size = len(message.key) + len(message.value or b"")
    for name, value in message.headers:  # a loop: per message, a generator costs 60 % more
        size += len(name) + len(value)
    return size


async def send_fitting(sink: Sink, messages: Sequence[Message],
                       metrics: Metrics | None = None) -> frozenset[int]:
    """Send ``messages``; the indices of those refused for their size are returned instead of
    failing the batch (each logged by key, never its value, and counted in
    ``records_skipped_total{kind,reason="too_large"}``): one record Kafka can never take must
    not block the others, run after run. Any other failure raises as ``send`` does."""
    try:
        await sink.send(messages)
    except MessageTooLarge as exc:
        if not exc.refused:
            raise
        for index in exc.refused:
            message = messages[index]
            kind = dict(message.headers).get("kind", b"").decode() or "unknown"
            log.error("record_too_large_skipped", key=message.key.decode(errors="replace"),
                      kind=kind, topic=message.topic, size=message_size(message),
                      detail="larger than Kafka accepts (message.max.bytes): not produced; "
                      "raise KAFKA_MESSAGE_MAX_BYTES and the topic's max.message.bytes")
            if metrics is not None:
                metrics.records_skipped.labels(kind, "too_large").inc()
        return frozenset(exc.refused)
    return frozenset()
