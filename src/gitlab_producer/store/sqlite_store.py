"""Embedded store: one SQLite file on disk (WAL), used when no ``REDIS_ADDRESS`` is set.

SQLite calls run on one worker thread so the event loop never blocks on disk. Each write is
one transaction (a failed batch leaves nothing behind). The metadata and key-mark writes made
while one is under way are merged into the next transaction (a group commit: one hand-off to
the thread and one commit for all of them, each caller answered when it committed; a failure
fails each caller of the merged transaction and leaves nothing of any behind). Expired dedup
marks are ignored on read and purged now and then.

Ids are stored in untyped columns: as SQLite integers while they fit its signed 64 bits, and
as their decimal text beyond (GitLab's ids are JSON numbers; nothing bounds them to 2^63).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar, cast

from gitlab_producer.store.base import PENDING, ClaimState, Cursor, StoreError
from gitlab_producer.store.coalesce import Coalescer

T = TypeVar("T")

SCHEMA_VERSION = 1
# Version 1: id columns without a type (no affinity), so that an id past 2^63 stored as text
# is kept as it is (an INTEGER column turns such text into an inexact REAL).
SCHEMA = """
CREATE TABLE IF NOT EXISTS sent (id PRIMARY KEY NOT NULL, expires_at REAL NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cursors (kind TEXT NOT NULL, id NOT NULL,
    synced_at REAL NOT NULL, activity TEXT NOT NULL, PRIMARY KEY (kind, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keyed (namespace TEXT NOT NULL, key TEXT NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (namespace, key));
"""
# Version 0 (id INTEGER columns) to 1: the old tables set aside, the same rows in new ones.
SET_ASIDE_V0 = "ALTER TABLE sent RENAME TO sent_v0; ALTER TABLE cursors RENAME TO cursors_v0;"
COPY_V0 = """
INSERT INTO sent SELECT id, expires_at FROM sent_v0;
INSERT INTO cursors SELECT kind, id, synced_at, activity FROM cursors_v0;
DROP TABLE sent_v0;
DROP TABLE cursors_v0;
"""
PURGE_EVERY_S = 300.0
CHUNK = 500  # SQLite's bound-parameter limit is generous, but stay well below it
INT64 = range(-(2**63), 2**63)

SQLiteId = int | str
# One statement of a merged write and its rows (``executemany``).
Write = tuple[str, Sequence[tuple[object, ...]]]
SET_META = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
MARK_KEYS = "INSERT OR REPLACE INTO keyed (namespace, key, expires_at) VALUES (?, ?, ?)"
PURGE_KEYS = "DELETE FROM keyed WHERE expires_at <= ?"


def db_id(entity_id: int) -> SQLiteId:
    """An id as stored: an integer when SQLite's INTEGER holds it, else its decimal text."""
    return entity_id if entity_id in INT64 else str(entity_id)


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN`` .. ``COMMIT``, or ``ROLLBACK`` on any error. (With ``isolation_level=None``
    the connection's own ``with db:`` opens no transaction: every statement commits alone.)"""
    db.execute("BEGIN")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class SQLiteStore:
    """The :class:`~gitlab_producer.store.base.Store` contract on an SQLite file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()
        # Single-key reads of the state records, on the event loop's thread: a committed WAL
        # row from the page cache costs less than the hand-off to the writer's thread and
        # back (a backfill reads a job's or project's record several times per job).
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._reader.execute("PRAGMA busy_timeout = 5000")
        self._last_purge = 0.0
        self._last_keyed_purge = 0.0
        # A backfill writes a job's, a project's or a page's marks some 14 times per project,
        # from 16 jobs at once: one commit per write (33 us of CPU each) and one hand-off to
        # the thread and back each cost more than the rows.
        self._writes: Coalescer[Write, None] = Coalescer(self._write_all)

    def _migrate(self) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            return
        old = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sent'"
                         ).fetchone()
        script = (SET_ASIDE_V0, SCHEMA, COPY_V0) if old else (SCHEMA,)
        with transaction(db):
            for statement in ";".join(script).split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, work, self._db)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    async def _write_all(self, writes: list[Write]) -> list[None]:
        def write(db: sqlite3.Connection) -> None:
            with transaction(db):
                for statement, rows in writes:
                    db.executemany(statement, rows)

        await self._run(write)
        return [None] * len(writes)

    async def unseen(self, event_ids: Sequence[int]) -> list[int]:
        if not event_ids:
            return []

        def query(db: sqlite3.Connection) -> set[SQLiteId]:
            now, found = time.time(), set[SQLiteId]()
            for start in range(0, len(event_ids), CHUNK):
                chunk = [db_id(i) for i in event_ids[start:start + CHUNK]]
                marks = ",".join("?" * len(chunk))
                found.update(row[0] for row in db.execute(
                    f"SELECT id FROM sent WHERE id IN ({marks}) AND expires_at > ?",  # noqa: S608
                    [*chunk, now]))
            return found

        seen = await self._run(query)
        return [i for i in event_ids if db_id(i) not in seen]

    async def mark_sent(self, event_ids: Sequence[int], ttl_s: int) -> None:
        if not event_ids:
            return

        def write(db: sqlite3.Connection) -> None:
            now = time.time()
            with transaction(db):
                db.executemany("INSERT OR REPLACE INTO sent (id, expires_at) VALUES (?, ?)",
                               [(db_id(i), now + ttl_s) for i in event_ids])
                if now - self._last_purge > PURGE_EVERY_S:
                    db.execute("DELETE FROM sent WHERE expires_at <= ?", (now,))
            if now - self._last_purge > PURGE_EVERY_S:
                self._last_purge = now

        await self._run(write)

    async def unseen_keys(self, namespace: str, keys: Sequence[str]) -> list[str]:
        # On the event loop's thread, through the reader's connection (as get_meta): a
        # backfill looks up every page's version marks, and the hand-off cost more.
        if not keys:
            return []
        now, seen = time.time(), set[str]()
        try:
            for start in range(0, len(keys), CHUNK):
                chunk = list(keys[start:start + CHUNK])
                marks = ",".join("?" * len(chunk))
                seen.update(row[0] for row in self._reader.execute(
                    f"SELECT key FROM keyed WHERE namespace = ? AND key IN ({marks}) "  # noqa: S608
                    "AND expires_at > ?", [namespace, *chunk, now]))
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc
        return [k for k in keys if k not in seen]

    async def mark_keys(self, namespace: str, keys: Sequence[str], ttl_s: int) -> None:
        if not keys:
            return
        now = time.time()
        writes: list[Write] = [(MARK_KEYS, [(namespace, k, now + ttl_s) for k in keys])]
        # The purge scans the whole table (no index on expires_at): now and then, like the
        # event marks. (On every call, a backfill's version marks made each batch cost more
        # than the last: 5.7 ms of CPU per record at 1,300 projects.)
        if now - self._last_keyed_purge > PURGE_EVERY_S:
            self._last_keyed_purge = now
            writes.append((PURGE_KEYS, [(now,)]))
        await self._writes(writes)

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
                chunk = [db_id(i) for i in entity_ids[start:start + CHUNK]]
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
            with transaction(db):
                db.executemany(
                    "INSERT OR REPLACE INTO cursors (kind, id, synced_at, activity) "
                    "VALUES (?, ?, ?, ?)",
                    [(kind, db_id(i), c.synced_at, c.activity) for i, c in cursors.items()])

        await self._run(write)

    async def get_meta(self, key: str) -> str | None:
        try:
            row = self._reader.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        await self._writes([(SET_META, [(key, value)])])

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        await self._run(lambda db: db.close())
        self._pool.shutdown(wait=True)
        self._reader.close()

    # Entities kept for retry, in their own table (ids as text: any size GitLab uses), made
    # on first use.
    _RETRY_TABLE = ("CREATE TABLE IF NOT EXISTS retry (kind TEXT NOT NULL, id TEXT NOT NULL, "
                    "value TEXT NOT NULL, PRIMARY KEY (kind, id))")

    async def retries(self, kind: str) -> dict[int, str]:
        def query(db: sqlite3.Connection) -> dict[int, str]:
            db.execute(self._RETRY_TABLE)
            return {int(row[0]): str(row[1]) for row in db.execute(
                "SELECT id, value FROM retry WHERE kind = ?", (kind,))}

        return await self._run(query)

    async def save_retries(self, kind: str, entries: Mapping[int, str]) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(self._RETRY_TABLE)
            with db:
                db.executemany("INSERT OR REPLACE INTO retry (kind, id, value) VALUES (?, ?, ?)",
                               [(kind, str(i), v) for i, v in entries.items()])

        if entries:
            await self._run(write)

    async def drop_retries(self, kind: str, entity_ids: Sequence[int]) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(self._RETRY_TABLE)
            with db:
                db.executemany("DELETE FROM retry WHERE kind = ? AND id = ?",
                               [(kind, str(i)) for i in entity_ids])

        if entity_ids:
            await self._run(write)
