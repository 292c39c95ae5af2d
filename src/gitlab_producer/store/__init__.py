"""Dedup marks and cursors: Redis when configured, an embedded SQLite file otherwise."""

from __future__ import annotations

import sqlite3

from gitlab_producer.config import ConfigError, Settings
from gitlab_producer.store.base import Cursor, Store, StoreError
from gitlab_producer.store.redis_store import RedisStore
from gitlab_producer.store.sqlite_store import SQLiteStore

__all__ = ["Cursor", "RedisStore", "SQLiteStore", "Store", "StoreError", "open_store"]


def open_store(settings: Settings) -> Store:
    """The store the settings ask for; a ``STATE_PATH`` that cannot be opened is a
    :class:`ConfigError`."""
    if settings.redis_address:
        host, port, password = settings.redis_endpoint
        return RedisStore.from_address(f"{host}:{port}", password, settings.redis_db,
                                       settings.redis_key_prefix)
    try:
        return SQLiteStore(settings.state_path)
    except (OSError, sqlite3.Error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"STATE_PATH: {settings.state_path} cannot be opened: {reason}"
                          ) from None
