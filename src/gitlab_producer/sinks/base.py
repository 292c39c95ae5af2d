"""Where events go: the message every sink takes, and the sink contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec


class Message(msgspec.Struct, frozen=True):
    """One record: key, value (the event JSON as GitLab returned it) and headers."""

    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


class DeliveryError(Exception):
    """The sink did not acknowledge every message of a batch."""


class MessageTooLarge(DeliveryError):
    """A message is larger than the producer or the topic accepts: retrying cannot help."""


class Sink(Protocol):
    """Send batches and return only once every message is acknowledged."""

    async def send(self, messages: Sequence[Message]) -> None:
        """Deliver all of ``messages``; raise :class:`DeliveryError` if any was not."""

    async def ping(self) -> None:
        """Raise :class:`DeliveryError` when the destination cannot be reached."""

    async def close(self) -> None:
        """Flush what is pending and release resources."""
