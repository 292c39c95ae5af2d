"""The SQLite store merges the metadata and key-mark writes made while one is under way into
one transaction (a group commit): a backfill's 16 jobs write their records and version marks
some 14 times per project, and one commit and one hand-off to the store's thread per write
cost more than the rows. Each caller returns once its write committed; a merged transaction
that fails fails each of its callers and leaves none of their rows behind."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gitlab_producer.store.base import StoreError
from gitlab_producer.store.sqlite_store import SQLiteStore, Write


def commits(store: SQLiteStore) -> list[str]:
    seen: list[str] = []
    store._db.set_trace_callback(lambda sql: seen.append(sql) if sql == "COMMIT" else None)
    return seen


async def test_concurrent_writes_share_a_transaction_and_each_sees_its_own(
        tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    done = commits(store)
    await asyncio.gather(*(store.set_meta(f"bf:j:{i}", str(i)) for i in range(20)),
                         store.mark_keys("objv", ["a@1", "b@1"], 3600))
    assert len(done) <= 2  # 21 writes: the first alone at most, the rest merged
    assert [await store.get_meta(f"bf:j:{i}") for i in range(20)] == [str(i) for i in range(20)]
    assert await store.unseen_keys("objv", ["a@1", "b@1", "c@1"]) == ["c@1"]
    await store.set_meta("bf:j:0", "again")  # a lone write still commits at once
    assert await store.get_meta("bf:j:0") == "again"
    await store.close()


async def test_a_failed_merged_write_fails_each_caller_and_leaves_nothing(
        tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    real = store._write_all

    async def failing_after_rows(writes: list[Write]) -> list[None]:
        # The callers' rows are written, then the transaction fails.
        return await real([*writes, ("INSERT INTO no_such_table VALUES (?)", [(1,)])])

    store._writes._batch = failing_after_rows
    outcomes = await asyncio.gather(*(store.set_meta(f"k{i}", "v") for i in range(5)),
                                    store.mark_keys("objv", ["x@1"], 3600),
                                    return_exceptions=True)
    assert all(isinstance(o, StoreError) for o in outcomes)
    assert [await store.get_meta(f"k{i}") for i in range(5)] == [None] * 5
    assert await store.unseen_keys("objv", ["x@1"]) == ["x@1"]
    with pytest.raises(sqlite3.OperationalError):  # the failing statement itself
        store._db.execute("SELECT * FROM no_such_table")
    await store.close()
