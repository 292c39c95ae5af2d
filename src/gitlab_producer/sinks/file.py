"""JSON-lines sink for machines without Kafka: a file (appended, flushed per batch) or stdout.

Each line is ``{"topic", "key", "headers", "value"}`` with the event JSON as ``value``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import orjson

from gitlab_producer.sinks.base import DeliveryError, Message

# A batch up to this size is written to a file on the event loop's thread: into the page
# cache, a page of objects costs less than the hand-off to a thread and back (one per page of
# a backfill); larger ones, and stdout (a pipe may block), go to a thread.
INLINE_BYTES = 256 * 1024


class FileSink:
    """Writes messages as JSON lines; ``path`` ``-`` means stdout."""

    def __init__(self, path: str, topic: str) -> None:
        self.topic = topic
        self._lock = asyncio.Lock()
        if path == "-":
            self._out: IO[bytes] = sys.stdout.buffer
            self._owned = False
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._out = open(path, "ab")  # noqa: SIM115 - lives as long as the sink
            self._owned = True

    def _line(self, message: Message) -> bytes:
        return orjson.dumps({
            "topic": message.topic or self.topic,
            "key": message.key.decode(),
            "headers": {k: v.decode() for k, v in message.headers},
            "value": None if message.value is None else orjson.Fragment(_one_line(message.value)),
        }) + b"\n"

    async def send(self, messages: Sequence[Message]) -> None:
        data = b"".join(self._line(m) for m in messages)
        async with self._lock:
            try:
                if self._owned and len(data) <= INLINE_BYTES:
                    self._write(data)
                else:
                    await asyncio.to_thread(self._write, data)
            except OSError as exc:
                raise DeliveryError(f"file sink: {exc}") from exc

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._out.flush()

    async def ping(self) -> None:
        if self._out.closed:
            raise DeliveryError("file sink is closed")

    async def close(self) -> None:
        if self._owned and not self._out.closed:
            self._out.close()


def _one_line(value: bytes) -> bytes:
    """The value on one line. It is valid JSON, where a raw line break can only be whitespace
    between tokens (inside a string it is always escaped), so a space means the same; a body
    sent with a trailing newline or pretty-printed would otherwise split its record."""
    if b"\n" not in value and b"\r" not in value:
        return value
    return value.replace(b"\r", b" ").replace(b"\n", b" ")
