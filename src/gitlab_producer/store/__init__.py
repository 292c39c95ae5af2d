"""Dedup marks and cursors: Redis when configured, an embedded SQLite file otherwise."""

from __future__ import annotations

from gitlab_producer.config import Settings
from gitlab_producer.store.base import Cursor, Store, StoreError
from gitlab_producer.store.redis_store import RedisStore
from gitlab_producer.store.sqlite_store import SQLiteStore

__all__ = ["Cursor", "RedisStore", "SQLiteStore", "Store", "StoreError", "open_store"]


def open_store(settings: Settings) -> Store:
    """The store the settings ask for."""
    if settings.redis_address:
        host, port, password = settings.redis_endpoint
        return RedisStore.from_address(f"{host}:{port}", password, settings.redis_db,
                                       settings.redis_key_prefix)
    return SQLiteStore(settings.state_path)
