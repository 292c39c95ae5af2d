"""Redis store: one key per sent event (``SET EX``), a hash of cursors per kind, a meta hash.

Key layout (``prefix`` is ``REDIS_KEY_PREFIX``):

- ``{prefix}event:{id}`` = ``1``, expiring after ``CACHE_TTL`` minutes (seed 000: "ID - true")
- ``{prefix}{namespace}:{key}`` = ``1``, the same for string keys (``hook:<Idempotency-Key>``)
- ``{prefix}{namespace}#pending:{key}`` = ``1``, a claim on a key being delivered (``SET NX PX``)
- ``{prefix}cursor:{kind}`` hash: entity id -> ``[synced_at, activity]``
- ``{prefix}meta`` hash: service metadata (``last_round_started``, ``since``)
- ``{prefix}retry:{kind}`` hash: entity id -> why and since when it is kept for retry

Marks are written by one small Lua script (one round trip, one command to parse) rather than a
pipeline of ``SET``s: on Redis Cluster the event keys of a command would span slots, so this
store targets a standalone Redis (or Sentinel). Lookups and marks that callers make while one
is in flight are merged into the next command (:mod:`gitlab_producer.store.coalesce`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from importlib.metadata import version
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.connection import HiredisRespSerializer
from redis.driver_info import DriverInfo
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from gitlab_producer.store.base import PENDING, ClaimState, Cursor, StoreAuthError, StoreError
from gitlab_producer.store.coalesce import Coalescer

MAX_CONNECTIONS = 64
# Built once: without it redis-py looks its own version up in the installed packages' metadata
# for every new connection, a few milliseconds of blocked event loop each.
DRIVER_INFO = DriverInfo().add_upstream_driver("gitlab-producer", version("gitlab-producer"))


def store_error(exc: BaseException) -> StoreError:
    """Redis's error as the store's: refused credentials apart from everything else."""
    kind = StoreAuthError if isinstance(exc, AuthenticationError) else StoreError
    return kind(f"redis: {exc}")


class HiredisPackingConnection(aioredis.Connection):
    """redis-py's asyncio connection, packing commands with hiredis as its synchronous client
    does. The asyncio one packs in Python: for a 100-key MGET that was half the client's CPU
    time (measured: 460 of 920 us per call under cProfile; hiredis packs it in 21 us)."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)
        return packed


# KEYS: event keys; ARGV[1]: TTL in seconds. SET key 1 EX ttl for each.
MARK_SCRIPT = """
local ttl = ARGV[1]
for _, key in ipairs(KEYS) do
  redis.call('SET', key, '1', 'EX', ttl)
end
return #KEYS
"""


# KEYS: the mark, the claim; ARGV[1]: claim lifetime in ms. The mark wins; else SET NX.
CLAIM_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'done' end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return 'claimed' end
return 'pending'
"""


class RedisStore:
    """The :class:`~gitlab_producer.store.base.Store` contract on Redis."""

    def __init__(self, client: aioredis.Redis, prefix: str = "gitlab-producer:") -> None:
        self._redis = client
        self.prefix = prefix
        self._mark: AsyncScript = client.register_script(MARK_SCRIPT)
        self._claim: AsyncScript = client.register_script(CLAIM_SCRIPT)
        self._event_key = f"{prefix}event:".encode() + b"%d"  # bytes skip redis-py's encoder
        # Calls made while one is in flight go out together (see coalesce.py).
        self._unseen: Coalescer[str | bytes, bool] = Coalescer(self._lookup)
        self._markers: dict[int, Coalescer[str | bytes, None]] = {}

    @classmethod
    def from_address(cls, address: str, password: str = "", db: int = 0,
                     prefix: str = "gitlab-producer:",
                     max_connections: int = MAX_CONNECTIONS) -> RedisStore:
        return cls(connect(address, password, db, max_connections), prefix)

    @property
    def client(self) -> aioredis.Redis:
        """The Redis client (the claims across instances share it)."""
        return self._redis

    def event_keys(self, event_ids: Sequence[int]) -> list[bytes]:
        """The sent-mark keys of events."""
        key = self._event_key
        return [key % i for i in event_ids]

    def namespaced_keys(self, namespace: str, keys: Sequence[str]) -> list[str]:
        """The sent-mark keys of string keys in ``namespace``."""
        return [f"{self.prefix}{namespace}:{k}" for k in keys]

    async def _lookup(self, keys: list[str | bytes]) -> list[bool]:
        try:
            found = await self._redis.mget(keys)
        except RedisError as exc:
            raise store_error(exc) from exc
        return [value is None for value in found]

    async def _set_marks(self, keys: Sequence[str | bytes], ttl_s: int) -> None:
        marker = self._markers.get(ttl_s)
        if marker is None:
            marker = self._markers[ttl_s] = Coalescer(partial(self._mark_all, ttl_s=ttl_s))
        await marker(keys)

    async def _mark_all(self, keys: list[str | bytes], ttl_s: int) -> list[None]:
        try:
            await self._mark(keys=keys, args=[ttl_s])
        except RedisError as exc:
            raise store_error(exc) from exc
        return [None] * len(keys)

    async def unseen(self, event_ids: Sequence[int]) -> list[int]:
        fresh = await self._unseen(self.event_keys(event_ids))
        return [i for i, new in zip(event_ids, fresh, strict=True) if new]

    async def mark_sent(self, event_ids: Sequence[int], ttl_s: int) -> None:
        await self._set_marks(self.event_keys(event_ids), ttl_s)

    async def mark_sent_keys(self, keys: Sequence[bytes], ttl_s: int) -> None:
        """:meth:`mark_sent` for the events whose :meth:`event_keys` the caller holds."""
        await self._set_marks(keys, ttl_s)

    async def unseen_keys(self, namespace: str, keys: Sequence[str]) -> list[str]:
        fresh = await self._unseen(self.namespaced_keys(namespace, keys))
        return [k for k, new in zip(keys, fresh, strict=True) if new]

    async def mark_keys(self, namespace: str, keys: Sequence[str], ttl_s: int) -> None:
        await self._set_marks(self.namespaced_keys(namespace, keys), ttl_s)

    async def claim_key(self, namespace: str, key: str, hold_s: float) -> ClaimState:
        keys = [f"{self.prefix}{namespace}:{key}", f"{self.prefix}{namespace}{PENDING}:{key}"]
        try:
            state = await self._claim(keys=keys, args=[max(1, int(hold_s * 1000))])
        except RedisError as exc:
            raise store_error(exc) from exc
        text = state.decode() if isinstance(state, bytes) else str(state)
        if text not in ("claimed", "done", "pending"):
            raise StoreError(f"redis: unexpected claim answer {text!r}")
        return cast(ClaimState, text)

    async def release_key(self, namespace: str, key: str) -> None:
        try:
            await self._redis.delete(f"{self.prefix}{namespace}{PENDING}:{key}")
        except RedisError as exc:
            raise store_error(exc) from exc

    async def cursors(self, kind: str, entity_ids: Sequence[int]) -> dict[int, Cursor]:
        if not entity_ids:
            return {}
        try:
            raw = await self._redis.hmget(f"{self.prefix}cursor:{kind}",
                                          [str(i) for i in entity_ids])
        except RedisError as exc:
            raise store_error(exc) from exc
        return {i: Cursor.loads(v) for i, v in zip(entity_ids, raw, strict=True) if v}

    async def save_cursors(self, kind: str, cursors: Mapping[int, Cursor]) -> None:
        if not cursors:
            return
        try:
            await self._redis.hset(f"{self.prefix}cursor:{kind}",
                                   mapping={str(k): c.dumps() for k, c in cursors.items()})
        except RedisError as exc:
            raise store_error(exc) from exc

    async def get_meta(self, key: str) -> str | None:
        try:
            value = await self._redis.hget(f"{self.prefix}meta", key)
        except RedisError as exc:
            raise store_error(exc) from exc
        return value.decode() if isinstance(value, bytes) else value

    async def set_meta(self, key: str, value: str) -> None:
        try:
            await self._redis.hset(f"{self.prefix}meta", key, value)
        except RedisError as exc:
            raise store_error(exc) from exc

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise store_error(exc) from exc

    async def close(self) -> None:
        await self._redis.aclose()

    # Entities kept for retry: the hash {prefix}retry:{kind}, entity id -> value.
    async def retries(self, kind: str) -> dict[int, str]:
        try:
            found = await self._redis.hgetall(f"{self.prefix}retry:{kind}")
        except RedisError as exc:
            raise store_error(exc) from exc
        return {int(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in found.items()}

    async def save_retries(self, kind: str, entries: Mapping[int, str]) -> None:
        if not entries:
            return
        try:
            await self._redis.hset(f"{self.prefix}retry:{kind}",
                                   mapping={str(k): v for k, v in entries.items()})
        except RedisError as exc:
            raise store_error(exc) from exc

    async def drop_retries(self, kind: str, entity_ids: Sequence[int]) -> None:
        if not entity_ids:
            return
        try:
            await self._redis.hdel(f"{self.prefix}retry:{kind}", *[str(i) for i in entity_ids])
        except RedisError as exc:
            raise store_error(exc) from exc


def connect(address: str, password: str = "", db: int = 0,
            max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """A client for ``host:port`` with its own pool, connecting at its first command (the
    store, the claims and the request budget each have one)."""
    host, _, port = address.removeprefix("redis://").rpartition(":")
    # A burst (webhooks, many readers) waits for a free connection rather than failing
    # with "Too many connections", which the default pool raises at its limit.
    # A pooled connection that a Redis restart closed fails its next command: that one is
    # retried on a new connection (the store's commands are idempotent), so a restart costs
    # no failed mark, which would have had an acknowledged event sent again.
    pool = aioredis.BlockingConnectionPool(
        host=host, port=int(port), password=password or None, db=db, socket_timeout=10,
        socket_connect_timeout=5, max_connections=max_connections, timeout=10,
        driver_info=DRIVER_INFO, connection_class=HiredisPackingConnection,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3, (RedisConnectionError,)))
    return aioredis.Redis.from_pool(pool)
