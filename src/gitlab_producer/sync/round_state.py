"""The state of the polling rounds shared by the instances on one Redis.

Key layout (``prefix`` is ``REDIS_KEY_PREFIX``):

- ``{prefix}rounds`` hash: ``number`` (the latest round opened), ``opened_at`` (Redis's
  ``TIME`` then).
- ``{prefix}round:<n>`` hash: ``phase`` (``open`` or ``complete``), ``started`` (the round's
  start in GitLab's time: the next round's base once it succeeded), ``started_host``, ``ok``,
  ``error``, ``listed_users``, and counters ``<outcome>:<kind>`` (``queued:project``,
  ``synced:user``, ``failed:project``, ...).
- ``{prefix}round:<n>:open`` set: the keys of its jobs not finished yet (the discovery's own
  key from the moment the round opens); ``{prefix}round:<n>:done`` set: the finished ones;
  ``{prefix}round:<n>:jobs`` hash: key -> the job's arguments (to enqueue it again when SAQ
  lost it); ``{prefix}round:<n>:requeued`` hash: key -> how often it was.

Every transition is one Lua script, so whichever instance (or crash) comes in between, the rule
holds: a round is complete when its open set is empty, which can only happen after the
discovery finished (its key is open until then, and it adds every job before it leaves); and it
became the next round's base (``last_round_started`` in the store's meta hash) only when no job
failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gitlab_producer.store.base import StoreError

KINDS = ("project", "user")
OUTCOMES = ("queued", "synced", "skipped", "failed")
KEEP_ROUND_S = 86_400  # a finished round's summary
KEEP_JOBS_S = 3600  # a finished round's job sets (late duplicates of its jobs find them)

# KEYS: rounds, meta (unused), round prefix; ARGV: min seconds between openings, started (GitLab
# time), started on the host, discovery job key, its arguments.
# Returns {n, state}: 1 opened now, 0 round n is open (join it), -ms: too early (wait that long).
OPEN_SCRIPT = """
local n = tonumber(redis.call('HGET', KEYS[1], 'number') or '0')
if n > 0 and redis.call('HGET', KEYS[3] .. n, 'phase') == 'open' then return {n, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0')
local wait = opened + tonumber(ARGV[1]) - now
if n > 0 and wait > 0 then return {n, -math.max(1, math.floor(wait * 1000))} end
n = n + 1
local round = KEYS[3] .. n
redis.call('HSET', KEYS[1], 'number', n, 'opened_at', string.format('%.6f', now))
redis.call('HSET', round, 'phase', 'open', 'started', ARGV[2], 'started_host', ARGV[3],
           'opened_at', string.format('%.6f', now), 'ok', '1', 'error', '', 'listed_users', '0')
local key = string.gsub(ARGV[4], '<n>', tostring(n))
redis.call('SADD', round .. ':open', key)
redis.call('HSET', round .. ':jobs', key, ARGV[5])
return {n, 1}
"""

# KEYS: round hash, open, done, jobs; ARGV: pairs of job key and arguments.
# Returns the keys added (a key already done is not added again).
ADD_SCRIPT = """
local added = {}
if redis.call('HGET', KEYS[1], 'phase') ~= 'open' then return added end
for i = 1, #ARGV, 2 do
  if redis.call('SISMEMBER', KEYS[3], ARGV[i]) == 0 then
    redis.call('SADD', KEYS[2], ARGV[i])
    redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
    added[#added + 1] = ARGV[i]
  end
end
return added
"""

# KEYS: round hash, open, done, jobs, requeued, meta;
# ARGV: job key, outcome (synced|skipped|failed|discovered), kind (empty: count nothing for the
# outcome itself, a batch's counts say it all), error, counts (JSON object of counter ->
# increment), listed_users (0/1), meta field of the base, of the user listing.
# Returns 0: not open (a duplicate), 1: done, 2: done and the round is complete now.
DONE_SCRIPT = """
if redis.call('SREM', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[3], ARGV[1])
if ARGV[2] ~= 'discovered' and ARGV[3] ~= '' then
  redis.call('HINCRBY', KEYS[1], ARGV[2] .. ':' .. ARGV[3], 1)
end
for name, count in pairs(cjson.decode(ARGV[5])) do
  redis.call('HINCRBY', KEYS[1], name, count)
end
if ARGV[2] == 'failed' then
  redis.call('HSET', KEYS[1], 'ok', '0')
  if redis.call('HGET', KEYS[1], 'error') == '' then
    redis.call('HSET', KEYS[1], 'error', ARGV[4])
  end
end
if ARGV[6] == '1' then redis.call('HSET', KEYS[1], 'listed_users', '1') end
if redis.call('SCARD', KEYS[2]) > 0 then return 1 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'phase', 'complete',
           'finished_at', string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6))
if redis.call('HGET', KEYS[1], 'ok') == '1' then
  local started = redis.call('HGET', KEYS[1], 'started')
  redis.call('HSET', KEYS[6], ARGV[7], started)
  if redis.call('HGET', KEYS[1], 'listed_users') == '1' then
    redis.call('HSET', KEYS[6], ARGV[8], started)
  end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[9]))
for i = 2, 5 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[10])) end
return 2
"""


@dataclass
class RoundSummary:
    """A shared round as Redis holds it."""

    number: int
    complete: bool
    ok: bool
    error: str
    started: float  # GitLab's time
    started_host: float
    duration_s: float
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def parse(cls, number: int, raw: dict[bytes, bytes]) -> RoundSummary:
        text = {k.decode(): v.decode() for k, v in raw.items()}
        counts = {o: {k: int(text.get(f"{o}:{k}", "0")) for k in KINDS} for o in OUTCOMES}
        counts["covered"] = {"project": int(text.get("covered", "0"))}
        opened, finished = float(text.get("opened_at", "0")), float(text.get("finished_at", "0"))
        return cls(number, text.get("phase") == "complete", text.get("ok") == "1",
                   text.get("error", ""), float(text.get("started", "0")),
                   float(text.get("started_host", "0")),
                   max(0.0, finished - opened) if finished else 0.0, counts)


class RoundState:
    """The Redis side of the shared rounds (see the module docstring)."""

    def __init__(self, client: aioredis.Redis, prefix: str, base_field: str,
                 user_listing_field: str) -> None:
        self._redis = client
        self._prefix = prefix
        self._rounds = f"{prefix}rounds"
        self._meta = f"{prefix}meta"
        self._fields = (base_field, user_listing_field)
        self._open: AsyncScript = client.register_script(OPEN_SCRIPT)
        self._add: AsyncScript = client.register_script(ADD_SCRIPT)
        self._done: AsyncScript = client.register_script(DONE_SCRIPT)

    def round_key(self, number: int) -> str:
        return f"{self._prefix}round:{number}"

    def _keys(self, number: int) -> list[str]:
        base = self.round_key(number)
        return [base, f"{base}:open", f"{base}:done", f"{base}:jobs", f"{base}:requeued"]

    async def open(self, min_interval_s: float, started: float, started_host: float,
                   discover_key: str, discover_args: dict[str, Any]) -> tuple[int, int]:
        """Open the next round unless one is open or the last opened less than
        ``min_interval_s`` ago. ``discover_key`` may hold ``<n>`` (the round's number).
        Returns (round, 1) when opened now, (round, 0) when that round is open, (last round,
        -ms) when the next may open in that many milliseconds."""
        try:
            number, state = await self._open(
                keys=[self._rounds, self._meta, f"{self._prefix}round:"],
                args=[min_interval_s, repr(started), repr(started_host), discover_key,
                      orjson.dumps(discover_args)])
        except RedisError as exc:
            raise StoreError(f"opening a round: {exc}") from exc
        return int(number), int(state)

    async def add_jobs(self, number: int, jobs: dict[str, dict[str, Any]]) -> list[str]:
        """Record jobs of round ``number`` as open (those not done yet); returns their keys."""
        args: list[str | bytes] = []
        for key, kwargs in jobs.items():
            args += [key, orjson.dumps(kwargs)]
        try:
            added = await self._add(keys=self._keys(number)[:4], args=args)
        except RedisError as exc:
            raise StoreError(f"adding jobs to round {number}: {exc}") from exc
        return [k.decode() for k in added]

    async def done(self, number: int, key: str, outcome: str, kind: str = "", error: str = "",
                   counts: dict[str, int] | None = None, listed_users: bool = False) -> int:
        """Finish a job: 0 when it was not open (done before), 1 done, 2 done and the round
        is complete now (and, when nothing failed, the next round's base). ``outcome`` failed
        fails the round; ``kind`` empty counts only ``counts`` (a batch of entities)."""
        try:
            found = await self._done(
                keys=[*self._keys(number), self._meta],
                args=[key, outcome, kind, error[:500], orjson.dumps(counts or {}),
                      "1" if listed_users else "0", *self._fields, KEEP_ROUND_S,
                      KEEP_JOBS_S])
        except RedisError as exc:
            raise StoreError(f"finishing {key}: {exc}") from exc
        return int(found)

    async def is_done(self, number: int, key: str) -> bool:
        return bool(await self._redis.sismember(self._keys(number)[2], key))

    async def current(self) -> int:
        """The number of the latest round opened (0: none yet)."""
        return int(await self._redis.hget(self._rounds, "number") or 0)

    async def summary(self, number: int) -> RoundSummary | None:
        raw: Any = await self._redis.hgetall(self.round_key(number))
        return RoundSummary.parse(number, raw) if raw else None

    async def open_jobs(self, number: int) -> dict[str, dict[str, Any]]:
        """The jobs of round ``number`` not finished, with their arguments."""
        _, open_key, _, jobs_key, _ = self._keys(number)
        members: Any = await self._redis.smembers(open_key)
        keys = sorted(k.decode() for k in members)
        if not keys:
            return {}
        args = await self._redis.hmget(jobs_key, keys)
        return {k: orjson.loads(a) if a else {} for k, a in zip(keys, args, strict=True)}

    async def requeued(self, number: int, key: str) -> int:
        """Count one more enqueueing of a lost job; returns how many there were."""
        return int(await self._redis.hincrby(self._keys(number)[4], key, 1))


async def latest_round(client: aioredis.Redis, prefix: str) -> dict[str, Any] | None:
    """The latest shared round for ``instances``: number, phase, open jobs, outcome."""
    number = int(await client.hget(f"{prefix}rounds", "number") or 0)
    if not number:
        return None
    fields: Any = await client.hgetall(f"{prefix}round:{number}")
    summary = RoundSummary.parse(number, fields) if fields else None
    return {"number": number, "complete": summary.complete if summary else None,
            "open_jobs": int(await client.scard(f"{prefix}round:{number}:open")),
            "ok": summary.ok if summary and summary.complete else None,
            "error": summary.error or None if summary else None}
