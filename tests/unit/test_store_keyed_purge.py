"""The SQLite store purges expired string marks now and then, not on every write: the purge
scans the whole table, so purging on every batch made a backfill's writes cost more with every
version mark it had already stored. Expired marks are ignored on read meanwhile."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from gitlab_producer.store import sqlite_store
from gitlab_producer.store.sqlite_store import PURGE_EVERY_S, SQLiteStore


async def test_expired_marks_are_purged_at_most_once_per_interval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SimpleNamespace(now=1_000_000.0)
    monkeypatch.setattr(sqlite_store, "time", SimpleNamespace(time=lambda: clock.now))
    store = SQLiteStore(tmp_path / "s.db")
    purges: list[str] = []
    store._db.set_trace_callback(
        lambda sql: purges.append(sql) if sql.startswith("DELETE FROM keyed") else None)
    await store.mark_keys("v", ["old"], 10)
    clock.now += 20  # "old" expired
    for batch in range(50):
        await store.mark_keys("v", [f"k{batch}"], 3600)
    assert len(purges) == 1  # the first write of the store's life; none since
    assert await store.unseen_keys("v", ["old", "k1"]) == ["old"]  # expired: unseen
    clock.now += PURGE_EVERY_S + 1
    await store.mark_keys("v", ["late"], 3600)
    assert len(purges) == 2
    rows = store._db.execute("SELECT key FROM keyed WHERE key = 'old'").fetchall()
    assert rows == []
    await store.close()
