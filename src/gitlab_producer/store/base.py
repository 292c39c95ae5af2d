"""What the sync needs to remember: which events were sent, and how far each entity got.

Two implementations share this contract: Redis (``REDIS_ADDRESS`` set) and an embedded SQLite
file (the default, for one machine).

Meaning of the dedup TTL (``CACHE_TTL`` minutes): an event id is marked only after the sink
acknowledged the event, and the mark lives that long. Re-reads reach back at most
``SYNC_OVERLAP`` seconds behind an entity's cursor, which the configuration keeps shorter than
the TTL, so a mark never expires while its event can still be re-read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import orjson


@dataclass(frozen=True)
class Cursor:
    """How far one project or user was synced.

    ``synced_at``: Unix time at which the last complete read of its events began; every event
    created before it (less the overlap) was delivered. ``activity``: the activity marker GitLab
    showed then (``last_activity_at`` of a project, ``last_activity_on`` of a user).
    """

    synced_at: float
    activity: str

    def dumps(self) -> bytes:
        return orjson.dumps([self.synced_at, self.activity])

    @classmethod
    def loads(cls, raw: bytes | str) -> Cursor:
        synced_at, activity = orjson.loads(raw)
        return cls(float(synced_at), str(activity))


ClaimState = Literal["claimed", "done", "pending"]
PENDING = "#pending"  # suffix of the namespace that holds claims beside the marks


class StoreError(Exception):
    """The store could not be reached or answered wrongly."""


class StoreAuthError(StoreError):
    """The store refused our credentials (Redis ``WRONGPASS``, ``NOAUTH``): unlike an outage,
    waiting cannot fix it."""


class Store(Protocol):
    """Dedup marks, per-entity cursors and a little service metadata."""

    async def unseen(self, event_ids: Sequence[int]) -> list[int]:
        """The ids among ``event_ids`` not marked as sent."""

    async def mark_sent(self, event_ids: Sequence[int], ttl_s: int) -> None:
        """Mark ids as sent for ``ttl_s`` seconds (call only after the sink acknowledged)."""

    async def unseen_keys(self, namespace: str, keys: Sequence[str]) -> list[str]:
        """Like :meth:`unseen` for string keys in their own namespace (webhook deliveries)."""

    async def mark_keys(self, namespace: str, keys: Sequence[str], ttl_s: int) -> None:
        """Like :meth:`mark_sent` for string keys."""

    async def claim_key(self, namespace: str, key: str, hold_s: float) -> ClaimState:
        """Atomically, across processes: ``"done"`` when ``key`` is marked
        (:meth:`mark_keys`), ``"pending"`` when another caller holds a claim on it, else take
        the claim for ``hold_s`` seconds and return ``"claimed"``."""

    async def release_key(self, namespace: str, key: str) -> None:
        """Drop a claim taken with :meth:`claim_key` (its delivery failed)."""

    async def cursors(self, kind: str, entity_ids: Sequence[int]) -> dict[int, Cursor]:
        """Stored cursors of ``kind`` (``project`` or ``user``) for the given ids."""

    async def save_cursors(self, kind: str, cursors: Mapping[int, Cursor]) -> None:
        """Store cursors (after every event they cover was acknowledged)."""

    async def get_meta(self, key: str) -> str | None:
        """A metadata value such as the start of the last successful round."""

    async def set_meta(self, key: str, value: str) -> None:
        """Store a metadata value."""

    async def ping(self) -> None:
        """Raise :class:`StoreError` when the store cannot be reached."""

    async def close(self) -> None:
        """Release connections."""

    async def retries(self, kind: str) -> dict[int, str]:
        """Entities of ``kind`` kept for retry (skipped or failed), each with its stored value
        (the sync's own encoding: see :mod:`gitlab_producer.sync.retries`)."""

    async def save_retries(self, kind: str, entries: Mapping[int, str]) -> None:
        """Keep (or update) entities for retry."""

    async def drop_retries(self, kind: str, entity_ids: Sequence[int]) -> None:
        """Forget entities kept for retry (read at last, or gone)."""
