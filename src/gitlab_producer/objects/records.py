"""An object as the import produces it, and its Kafka message (the contract in
docs/messages.md): key = REST path under /api/v4, value = GitLab's JSON bytes, headers with the
kind, project, version, operation, source and the CloudEvents Kafka binding's ``ce_*``."""

from __future__ import annotations

import functools
import hashlib
from datetime import UTC, datetime

import msgspec

from gitlab_producer.sinks.base import Message

SPEC_VERSION = b"1.0"


class ObjectRecord(msgspec.Struct, frozen=True):
    """One version of one object."""

    kind: str
    key: str
    raw: bytes | None  # None: a tombstone
    project_id: int | None
    updated_at: str  # GitLab's updated_at; empty for kinds without one
    content_hash: str  # sha256 of ``raw`` (always set, so a version is always named)

    @property
    def version(self) -> str:
        """What makes this version unique on its key (the version mark's suffix)."""
        return self.updated_at or self.content_hash


def content_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


@functools.lru_cache(maxsize=1024)
def _fixed(kind: str, op: str, source: str) -> tuple[tuple[str, bytes], ...]:
    """The headers that depend only on the kind, the operation and the source, encoded once
    (in the order of :func:`to_message`: kind, op, source, ce_specversion, ce_source,
    ce_type)."""
    return (("kind", kind.encode()), ("op", op.encode()), ("source", source.encode()),
            ("ce_specversion", SPEC_VERSION), ("ce_source", f"//{source}/api/v4".encode()),
            ("ce_type", f"com.gitlab.{kind}.{op}".encode()))


def to_message(record: ObjectRecord, topic: str, source: str, op: str) -> Message:
    """The Kafka record of ``record`` on ``topic``; ``op`` is snapshot, update or delete."""
    ce_id = hashlib.sha256(f"{record.key}@{record.version}".encode()).hexdigest()[:32]
    when = record.updated_at or datetime.now(UTC).isoformat(timespec="milliseconds")
    kind, op_h, source_h, spec, ce_source, ce_type = _fixed(record.kind, op, source)
    key = record.key.encode()
    headers = (
        kind,
        ("project_id", b"" if record.project_id is None else str(record.project_id).encode()),
        ("updated_at", record.updated_at.encode()) if record.updated_at else
        ("content_hash", record.content_hash.encode()),
        op_h,
        source_h,
        spec,
        ("ce_id", ce_id.encode()),
        ce_source,
        ce_type,
        ("ce_time", when.encode()),
        ("ce_subject", key),
        ("content-type", b"application/json"),
    )
    return Message(key=key, value=record.raw, headers=headers, topic=topic)
