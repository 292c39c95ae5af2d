"""Claims across instances: the claim before produce, in Redis, wherever more than one
instance can run (that is, wherever the store is Redis).

A claim is the sent-mark's own key holding an owner token instead of ``1``: ``SET key token NX
PX ttl``. Claiming and looking up are thus one atomic step (one script, one round trip for a
page, merged with the calls of other readers like the store's lookups); the mark written after
the sink's acknowledgement replaces the token with ``1``, which settles the claim. A failed
delivery deletes its own claims (compare-and-delete); a crashed owner's claims expire after
``ttl_s``, and an owner whose delivery is slow renews them meanwhile.

Each key comes back as :data:`MINE` (claimed now, deliver it), :data:`SENT` (marked: a
duplicate) or :data:`HELD` (another instance is delivering it: wait for the outcome).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gitlab_producer.store.base import Store, StoreError
from gitlab_producer.store.coalesce import Coalescer
from gitlab_producer.store.redis_store import RedisStore

SENT, MINE, HELD = 0, 1, 2
CLAIM_TTL_S = 30.0  # how long a crashed owner's claims block the others
FIRST_POLL_S, MAX_POLL_S = 0.01, 0.5  # waiting for another instance's outcome

# KEYS: sent-mark keys; ARGV[1]: owner token, ARGV[2]: claim TTL (ms).
CLAIM_SCRIPT = """
local token = ARGV[1]
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, token, 'NX', 'PX', ARGV[2]) then
    out[i] = 1
  else
    local value = redis.call('GET', key)
    if value == token then out[i] = 1 elseif value == '1' then out[i] = 0 else out[i] = 2 end
  end
end
return out
"""

# KEYS: keys claimed by ARGV[1]; ARGV[2]: new TTL (ms), or 0 to release them.
OWN_SCRIPT = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    if ARGV[2] == '0' then redis.call('DEL', key) else redis.call('PEXPIRE', key, ARGV[2]) end
    n = n + 1
  end
end
return n
"""


def shared_claims(store: Store, owner: str) -> RedisClaims | None:
    """Claims across instances when the store is Redis (more than one instance may run on
    it); None for the embedded store, where this process's own claims suffice."""
    return RedisClaims(store, owner) if isinstance(store, RedisStore) else None


class RedisClaims:
    """This instance's claims on the store's sent-mark keys."""

    def __init__(self, store: RedisStore, owner: str, ttl_s: float = CLAIM_TTL_S) -> None:
        self.store = store
        client: aioredis.Redis = store.client
        self.token = f"claim:{owner}:{uuid.uuid4().hex}"  # never "1", unique per process
        self.ttl_ms = round(ttl_s * 1000)
        self._claim: AsyncScript = client.register_script(CLAIM_SCRIPT)
        self._own: AsyncScript = client.register_script(OWN_SCRIPT)
        self._claims: Coalescer[str | bytes, int] = Coalescer(self._claim_all)
        self._background: set[asyncio.Task[None]] = set()
        self._renewing: dict[object, Sequence[str | bytes]] = {}  # the pending sends' keys
        self._renewer: asyncio.Task[None] | None = None

    async def claim(self, keys: Sequence[str | bytes]) -> list[int]:
        """:data:`MINE`, :data:`SENT` or :data:`HELD` for each key, in order."""
        return await self._claims(keys)

    async def _claim_all(self, keys: list[str | bytes]) -> list[int]:
        try:
            return [int(v) for v in await self._claim(keys=keys, args=[self.token,
                                                                          self.ttl_ms])]
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc

    async def _own_call(self, keys: Sequence[str | bytes], ttl_ms: int) -> None:
        try:
            await self._own(keys=list(keys), args=[self.token, ttl_ms])
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc

    def release_soon(self, keys: Sequence[str | bytes]) -> None:
        """Give up claims after a failed delivery, so others need not wait for the expiry.
        In a task of its own: the caller may be being cancelled; failing, they expire."""
        if not keys:
            return
        task = asyncio.get_running_loop().create_task(self._release(list(keys)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, keys: list[str | bytes]) -> None:
        with contextlib.suppress(StoreError):
            await self._own_call(keys, 0)

    @contextlib.asynccontextmanager
    async def renewed(self, keys: Sequence[str | bytes]) -> AsyncIterator[None]:
        """Keep the claims alive while the body runs (a slow sink), so only a dead owner's
        claims expire. One task of the instance renews the keys of every pending send every
        third of their TTL in one call (a task per send cost more than the claim itself)."""
        token = object()
        self._renewing[token] = keys
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew())
        try:
            yield
        finally:
            del self._renewing[token]

    async def _renew(self) -> None:
        """Renew the pending sends' claims until none is pending. A send that began just
        before a renewal is renewed early: harmless."""
        while self._renewing:
            await asyncio.sleep(self.ttl_ms / 3000)
            keys = [k for pending in list(self._renewing.values()) for k in pending]
            if keys:
                with contextlib.suppress(StoreError):
                    await self._own_call(keys, self.ttl_ms)


def poll_delays(first_s: float = FIRST_POLL_S, cap_s: float = MAX_POLL_S) -> Iterator[float]:
    """Waits between tries, doubling from ``first_s`` up to ``cap_s`` (by default: between
    looks at keys another instance holds)."""
    delay = first_s
    while True:
        yield delay
        delay = min(cap_s, delay * 2)
