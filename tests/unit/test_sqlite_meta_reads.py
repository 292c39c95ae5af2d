"""The SQLite store's state reads (on the event loop's thread, through their own connection)
see every committed write at once: this store's, and another process's on the same file."""

from __future__ import annotations

from pathlib import Path

import pytest

from gitlab_producer.store.base import StoreError
from gitlab_producer.store.sqlite_store import SQLiteStore


async def test_meta_reads_see_every_committed_write_at_once(tmp_path: Path) -> None:
    mine, other = SQLiteStore(tmp_path / "s.db"), SQLiteStore(tmp_path / "s.db")
    assert await mine.get_meta("bf:p:1") is None
    await mine.set_meta("bf:p:1", "a")
    assert await mine.get_meta("bf:p:1") == "a"
    await other.set_meta("bf:p:1", "b")  # another process's write
    assert await mine.get_meta("bf:p:1") == "b"
    await other.close()
    await mine.close()
    with pytest.raises(StoreError):  # a closed store answers with the store's error
        await mine.get_meta("bf:p:1")
