"""Object delivery: a version is produced once; the user cache's TTL rules (seed 002)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gitlab_producer.gitlab.errors import NotFoundError
from gitlab_producer.metrics import Metrics
from gitlab_producer.objects.delivery import ObjectDeliverer
from gitlab_producer.objects.executor import Progress
from gitlab_producer.objects.records import ObjectRecord, content_hash
from gitlab_producer.objects.users import UserCache
from gitlab_producer.sinks.base import Message
from gitlab_producer.store import sqlite_store
from gitlab_producer.store.sqlite_store import SQLiteStore


class ListSink:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def send(self, messages: Sequence[Message]) -> None:
        self.sent.extend(messages)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


def record(key: str, raw: bytes, updated_at: str = "") -> ObjectRecord:
    return ObjectRecord("issues", key, raw, 7, updated_at, content_hash(raw))


async def test_a_version_is_produced_once_and_a_new_version_again(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    sink = ListSink()
    deliverer = ObjectDeliverer(store, sink, "p", "gitlab.test", 3600)
    first = record("projects/7/issues/1", b'{"a":1}', "2026-01-01T00:00:00.000Z")
    assert (await deliverer.deliver([first])).produced["issues"] == 1
    assert (await deliverer.deliver([first])).produced["issues"] == 0
    newer = record("projects/7/issues/1", b'{"a":2}', "2026-01-02T00:00:00.000Z")
    hashed = record("projects/7/labels/3", b'{"l":1}')
    assert sum((await deliverer.deliver([newer, hashed])).produced.values()) == 2
    assert sum((await deliverer.deliver([hashed])).produced.values()) == 0
    assert [m.topic for m in sink.sent] == ["p.issues"] * 3
    headers = dict(sink.sent[0].headers)
    assert headers["updated_at"] == b"2026-01-01T00:00:00.000Z"
    assert headers["ce_type"] == b"com.gitlab.issues.snapshot"
    assert "content_hash" in dict(sink.sent[2].headers)
    await store.close()


class FakeExecutor:
    """Answers user reads: ids in ``missing`` are 404."""

    def __init__(self, missing: set[int]) -> None:
        self.missing = missing
        self.asked: list[int] = []
        self.client = SimpleNamespace(metrics=Metrics())

    async def read_one(self, _stream: Any, _scope: Any, _progress: Progress,
                       fields: dict[str, str]) -> dict[str, Any]:
        uid = int(fields["user"])
        self.asked.append(uid)
        if uid in self.missing:
            raise NotFoundError("404", 404)
        return {"id": uid}


async def test_user_cache_refreshes_found_users_and_never_missing_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SimpleNamespace(now=1_000_000.0)
    monkeypatch.setattr(sqlite_store, "time", SimpleNamespace(time=lambda: clock.now))
    store = SQLiteStore(tmp_path / "s.db")
    executor = FakeExecutor(missing={2})
    cache = UserCache(store, executor, ttl_s=100)  # type: ignore[arg-type]
    await cache.import_users([1, 2], Progress())
    assert executor.asked == [1, 2]
    clock.now += 60
    await cache.import_users([1, 2], Progress())
    assert executor.asked == [1, 2]  # both cached: found and missing
    clock.now += 60  # 120 s after the first lookup, 60 s after the hit
    await cache.import_users([1, 2], Progress())
    assert executor.asked == [1, 2, 2]  # the hit kept user 1; the missing user expired
    assert cache.stats.hits == 3 and cache.stats.requests == 3
    await store.close()
