"""Embedded store: one SQLite file on disk (WAL), used when no ``REDIS_ADDRESS`` is set.

SQLite calls run on one worker thread so the event loop never blocks on disk. Expired dedup
marks are ignored on read and purged now and then.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar, cast

from gitlab_producer.store.base import PENDING, ClaimState, Cursor, StoreError

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sent (id INTEGER PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS cursors (kind TEXT NOT NULL, id INTEGER NOT NULL,
    synced_at REAL NOT NULL, activity TEXT NOT NULL, PRIMARY KEY (kind, id));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keyed (namespace TEXT NOT NULL, key TEXT NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (namespace, key));
"""
PURGE_EVERY_S = 300.0
CHUNK = 500  # SQLite's bound-parameter limit is generous, but stay well below it


class SQLiteStore:
    """The :class:`~gitlab_producer.store.base.Store` contract on an SQLite file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._last_purge = 0.0

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, work, self._db)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    async def unseen(self, event_ids: Sequence[int]) -> list[int]:
        if not event_ids:
            return []

        def query(db: sqlite3.Connection) -> set[int]:
            now, found = time.time(), set[int]()
            for start in range(0, len(event_ids), CHUNK):
                chunk = list(event_ids[start:start + CHUNK])
                marks = ",".join("?" * len(chunk))
                found.update(row[0] for row in db.execute(
                    f"SELECT id FROM sent WHERE id IN ({marks}) AND expires_at > ?",  # noqa: S608
                    [*chunk, now]))
            return found

        seen = await self._run(query)
        return [i for i in event_ids if i not in seen]

    async def mark_sent(self, event_ids: Sequence[int], ttl_s: int) -> None:
        if not event_ids:
            return

        def write(db: sqlite3.Connection) -> None:
            now = time.time()
            with db:
                db.executemany("INSERT OR REPLACE INTO sent (id, expires_at) VALUES (?, ?)",
                               [(i, now + ttl_s) for i in event_ids])
                if now - self._last_purge > PURGE_EVERY_S:
                    db.execute("DELETE FROM sent WHERE expires_at <= ?", (now,))
                    self._last_purge = now

        await self._run(write)

    async def unseen_keys(self, namespace: str, keys: Sequence[str]) -> list[str]:
        def query(db: sqlite3.Connection) -> set[str]:
            now = time.time()
            return {k for k in keys if db.execute(
                "SELECT 1 FROM keyed WHERE namespace = ? AND key = ? AND expires_at > ?",
                (namespace, k, now)).fetchone()}

        seen = await self._run(query) if keys else set()
        return [k for k in keys if k not in seen]

    async def mark_keys(self, namespace: str, keys: Sequence[str], ttl_s: int) -> None:
        def write(db: sqlite3.Connection) -> None:
            now = time.time()
            with db:
                db.executemany("INSERT OR REPLACE INTO keyed (namespace, key, expires_at) "
                               "VALUES (?, ?, ?)", [(namespace, k, now + ttl_s) for k in keys])
                db.execute("DELETE FROM keyed WHERE expires_at <= ?", (now,))

        if keys:
            await self._run(write)

    async def claim_key(self, namespace: str, key: str, hold_s: float) -> ClaimState:
        def claim(db: sqlite3.Connection) -> ClaimState:
            now = time.time()
            db.execute("BEGIN IMMEDIATE")  # other processes on the file wait for this one
            try:
                for space, state in ((namespace, "done"), (namespace + PENDING, "pending")):
                    if db.execute("SELECT 1 FROM keyed WHERE namespace = ? AND key = ? "
                                  "AND expires_at > ?", (space, key, now)).fetchone():
                        return cast(ClaimState, state)
                db.execute("INSERT OR REPLACE INTO keyed (namespace, key, expires_at) "
                           "VALUES (?, ?, ?)", (namespace + PENDING, key, now + hold_s))
                return "claimed"
            finally:
                db.execute("COMMIT")

        return await self._run(claim)

    async def release_key(self, namespace: str, key: str) -> None:
        await self._run(lambda db: db.execute(
            "DELETE FROM keyed WHERE namespace = ? AND key = ?", (namespace + PENDING, key)))

    async def cursors(self, kind: str, entity_ids: Sequence[int]) -> dict[int, Cursor]:
        if not entity_ids:
            return {}

        def query(db: sqlite3.Connection) -> dict[int, Cursor]:
            out = {}
            for start in range(0, len(entity_ids), CHUNK):
                chunk = list(entity_ids[start:start + CHUNK])
                marks = ",".join("?" * len(chunk))
                for row in db.execute(
                    f"SELECT id, synced_at, activity FROM cursors WHERE kind = ? "  # noqa: S608
                    f"AND id IN ({marks})", [kind, *chunk]):
                    out[int(row[0])] = Cursor(float(row[1]), str(row[2]))
            return out

        return await self._run(query)

    async def save_cursors(self, kind: str, cursors: Mapping[int, Cursor]) -> None:
        if not cursors:
            return

        def write(db: sqlite3.Connection) -> None:
            with db:
                db.executemany(
                    "INSERT OR REPLACE INTO cursors (kind, id, synced_at, activity) "
                    "VALUES (?, ?, ?, ?)",
                    [(kind, i, c.synced_at, c.activity) for i, c in cursors.items()])

        await self._run(write)

    async def get_meta(self, key: str) -> str | None:
        def query(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])

        return await self._run(query)

    async def set_meta(self, key: str, value: str) -> None:
        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

        await self._run(write)

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        await self._run(lambda db: db.close())
        self._pool.shutdown(wait=True)
