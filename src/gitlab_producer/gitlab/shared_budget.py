"""One request budget for every instance on one Redis: ``OPERATIONS_PER_SECOND`` is the
token's limit, not one process's.

Each request reserves its start slot with one Lua script (GCRA): the script reads Redis's
own ``TIME``, hands out the theoretical arrival time (``tat``) and moves it on by one interval,
and returns how long the caller must wait. No client clock takes part, so instances on machines
whose clocks disagree still share one evenly spaced sequence of slots. The requests of one
instance that wait for a slot at the same moment reserve theirs in one call (consecutive
slots, one round trip): measured 53 us of this process's CPU per request with a call each,
33 us with eight requests waiting at once.

GitLab itself counts in fixed windows: its throttles (``throttle_authenticated_api`` and the
others) are Rack::Attack's, which count a request in the window ``now // period`` when it passes
the middleware, on receipt (rack-attack's ``Cache#key_and_expiry``); the period is the admin's
"rate limit period in seconds" (gitlab.com: per minute). Any one-second window, sliding, is the
stricter reading an outside tester may take; this budget holds that one.

Slots are spaced ``(1 + margin) / rate`` apart, so ``rate`` consecutive slots span
``1 + margin`` seconds: margin seconds of slack (3%: 30 ms, 97% of the budget used). A request
must go within that slack of its slot, or it lands in the same second as the ``rate`` slots
after it (exactly ``1 / rate`` apart, 21 requests landed in one sliding second at 20/s).
Measured with 3 processes at 20/s on a loaded 2-core machine (slot, wake-up, socket write and
the simulator's reading of the request; tests/scaleout/test_budget_processes.py): the wake-up
is late by 0.6 ms at the median, 8-15 ms at the 99th percentile and up to 30-40 ms (the event
loop busy, or no CPU); the write follows 0.3 ms later (p99 1-4 ms, the connection is warm);
handing slots out in one call for several requests adds nothing (each sleeps on its own); and
the simulator itself, on the same 2 cores, read some requests 30-50 ms (once 117 ms) after they
were written, its event loop stalled with nothing to run.

So a request that wakes more than three quarters of the slack after its slot (22 ms at 3%)
gives the slot up (it stays unused, and its second's use counter is told so with the next
reservation) and reserves another; the rest is left for the write. How late it is counts
against Redis's clock, not from when the answer was read: an answer read late (this loop busy
when it came) would start the slot late and hide it. Redis's time is placed on this process's
monotonic clock by the smallest recent gap between the two (never early: an answer never comes
before Redis read its clock), so machines whose clocks disagree still work. After 3 slots given
up in a row the request goes anyway (a starved CPU would otherwise send nothing).

Measured on that machine with other jobs running (load average 9-11; 5 runs each): the
simulator's busiest sliding second 20-21 with at most 2 arrivals over 20, once 22, every
calendar second <= 20, use 0.955-0.975 (giving up after half the slack instead: 20-21, use
0.92-0.97; no guard: 20-23 with up to 21 arrivals over 20, use 0.97; no margin: 22, ~145 over,
use 1.0). At a load average of 12-14 no setting kept both (use down to 0.90, 3 arrivals over).

A 429 with GitLab's ``Retry-After`` / ``RateLimit-*`` headers (the token's limit) pauses every
instance; one without them is a per-endpoint limit, which the client holds back on that
endpoint alone and which never reaches the budget. The pause-until time is a key of its own
that the same script honours (the next slot is never before it) and raises. Slots handed out
before a pause began are checked again after their wait, against the newest pause this
instance learned of (every reservation's answer carries it).

At a limit far above what this instance asks for (the slots a fraction of that slack apart,
``OPERATIONS_PER_SECOND`` in the hundreds or more), a round trip per request is the budget's
whole cost: so when the budget was idle for longer than it would take, a reservation takes a
few spare slots beyond its own (one round trip), and this instance's next requests use them
while they are no more than the slack late; a spare that is later than that is given up like
a missed slot. Only an idle budget lends spares, so they never take slots another instance
was about to use, and a busy budget (the requests waiting for their slots) hands out one each.

When Redis cannot be reached the budget falls back to this process's own limiter (at the
full rate: the store is down too, so rounds fail and few requests go out) and says so once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gitlab_producer.config import Settings
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.logs import get_logger
from gitlab_producer.metrics import Metrics
from gitlab_producer.store.coalesce import Coalescer
from gitlab_producer.store.redis_store import connect

log = get_logger(__name__)
DEFAULT_MARGIN = 0.03  # see the module docstring
LATE_SHARE = 0.75  # of the margin's slack, how late after its slot a request may still go
SPARES_MAX = 8  # spare slots one reservation may take beyond its own (an idle budget only)
SPARE_SHARE = 0.25  # spare slots span at most this share of the slack a request may be late
MISSES_BEFORE_SENDING = 3  # slots a request gives up in a row before it goes late anyway
OFFSETS_KEPT = 32  # recent answers that place Redis's clock on this process's
USE_KEY_TTL_MS = 120_000

# KEYS[1]: tat, KEYS[2]: pause-until, KEYS[3]: prefix of the per-second use counters.
# ARGV[1]: interval (us); ARGV[2]: pause to start now (us, 0: none); ARGV[3]: how many
# consecutive slots to reserve (0: only pause); ARGV[4]: how many spare slots to add when the
# budget was idle for all of them; ARGV[5...]: pairs of a second and how many of its slots were
# given up since the last call (its use counts that many less). Returns {wait_us of the first
# slot, paused_until_us, now_us, slots reserved}; slot i starts i intervals after the first.
RESERVE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local pause = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local spares = tonumber(ARGV[4])
for i = 5, #ARGV, 2 do
  if redis.call('EXISTS', KEYS[3] .. ARGV[i]) == 1 then
    redis.call('DECRBY', KEYS[3] .. ARGV[i], ARGV[i + 1])
  end
end
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if pause > 0 and now + pause > paused then
  paused = now + pause
  redis.call('SET', KEYS[2], string.format('%d', paused), 'PX', math.ceil(pause / 1000) + 1000)
end
if count < 1 then
  return {0, string.format('%d', paused), string.format('%d', now), 0}
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local slot = math.max(now, tat, paused)
if spares > 0 and slot == now and tat + (count + spares) * interval <= now then
  count = count + spares
end
local after = slot + count * interval
redis.call('SET', KEYS[1], string.format('%d', after), 'PX', math.ceil((after - now) / 1000) + 1000)
local second, n = math.floor(slot / 1000000), 0
for i = 0, count - 1 do
  local s = math.floor((slot + i * interval) / 1000000)
  if s ~= second then
    redis.call('INCRBY', KEYS[3] .. string.format('%d', second), n)
    redis.call('PEXPIRE', KEYS[3] .. string.format('%d', second), USE_TTL)
    second, n = s, 0
  end
  n = n + 1
end
redis.call('INCRBY', KEYS[3] .. string.format('%d', second), n)
redis.call('PEXPIRE', KEYS[3] .. string.format('%d', second), USE_TTL)
return {math.floor(slot - now), string.format('%d', paused), string.format('%d', now), count}
""".replace("USE_TTL", str(USE_KEY_TTL_MS))


class Slot(NamedTuple):
    """A reserved slot: its ``start`` on this process's monotonic clock, the ``wait`` Redis
    gave for it, and when it is on Redis's clock (us)."""

    start: float
    wait: float
    redis_us: int


def budget_keys(prefix: str) -> tuple[str, str, str]:
    """(tat key, pause-until key, prefix of the per-second use counters)."""
    return f"{prefix}budget:tat", f"{prefix}budget:paused", f"{prefix}budget:used:"


class SharedBudget(RateLimiter):
    """:class:`RateLimiter`'s interface on a budget kept in Redis for all instances."""

    def __init__(self, client: aioredis.Redis, per_second: float, prefix: str,
                 metrics: Metrics | None = None, margin: float = DEFAULT_MARGIN) -> None:
        super().__init__(per_second)  # this process's fallback while Redis is unreachable
        self._redis = client
        self._keys = budget_keys(prefix)
        self._interval_us = round(1_000_000 * (1.0 + margin) / per_second)
        # ``per_second`` slots span 1 + margin seconds: margin seconds of slack per window.
        self._late_s = margin * LATE_SHARE
        self._offsets: deque[float] = deque(maxlen=OFFSETS_KEPT)
        self._given_up: list[int] = []
        self._spares: deque[Slot] = deque()  # slots reserved beyond their requests', in order
        self._spares_wanted = min(SPARES_MAX, int(self._late_s * SPARE_SHARE * 1e6
                                                  // self._interval_us))
        self._script: AsyncScript = client.register_script(RESERVE_SCRIPT)
        self._metrics = metrics or Metrics()
        self._metrics.budget_limit.set(per_second)
        self._pending_pause_s = 0.0
        self._paused_until_local = 0.0  # monotonic time to which the newest known pause runs
        self._degraded = False
        self._flushes: set[asyncio.Task[None]] = set()
        self._reservations: Coalescer[None, Slot | None] = Coalescer(self._reserve)

    async def acquire(self) -> float:
        """Wait for this request's slot in the shared budget; returns the seconds waited."""
        waited, misses = 0.0, 0
        while True:
            slot = self._spare()
            if slot is None:
                (slot,) = await self._reservations([None])
            if slot is None:
                return waited + await super().acquire()
            self._metrics.budget_wait.observe(slot.wait)
            waited += slot.wait
            if (sleep_s := slot.start - time.monotonic()) > 0:
                await asyncio.sleep(sleep_s)
            if (self._late_s > 0 and time.monotonic() - slot.start > self._late_s
                    and misses < MISSES_BEFORE_SENDING):
                # This late, the request would crowd the slots after it into one second (a
                # busy event loop or CPU): the slot goes unused, the request takes another.
                misses += 1
                self._metrics.budget_missed.inc()
                self._give_up(slot)
                continue
            # A pause that began (on any instance) after this slot was handed out applies too.
            if self._paused_until_local <= slot.start:
                self._metrics.budget_reserved.inc()  # the slot a request goes out in
                return waited

    def _spare(self) -> Slot | None:
        """The next spare slot this request may still go in (those too late for it are given
        up), with its wait from now; None when there is none."""
        now = time.monotonic()
        while self._spares:
            spare = self._spares.popleft()
            if now - spare.start <= self._late_s:
                return spare._replace(wait=max(0.0, spare.start - now))
            self._give_up(spare)
        return None

    def _give_up(self, slot: Slot) -> None:
        """``slot`` goes unused: its second's use counts one less (sent with the next call)."""
        self._given_up.append(slot.redis_us // 1_000_000)

    def pause(self, seconds: float) -> None:
        """Stop every instance for ``seconds`` (GitLab said 429). Sent with this instance's
        next reservation, or at once by a task of its own when none comes first."""
        super().pause(seconds)
        while self._spares:
            self._give_up(self._spares.popleft())
        self._pending_pause_s = max(self._pending_pause_s, seconds)
        self._paused_until_local = max(self._paused_until_local, time.monotonic() + seconds)
        task = asyncio.get_running_loop().create_task(self._flush_pause())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def _flush_pause(self) -> None:
        if self._pending_pause_s > 0:
            await self._call(0)

    async def _reserve(self, requests: list[None]) -> list[Slot | None]:
        """Consecutive slots for the requests waiting now (the spares Redis added after them
        kept for the next requests), or None for all when Redis is unreachable."""
        answer = await self._call(len(requests), self._spares_wanted)
        if answer is None:
            return [None] * len(requests)
        first, reserved = answer
        interval_s = self._interval_us / 1e6
        slots = [Slot(first.start + i * interval_s, first.wait + i * interval_s,
                      first.redis_us + i * self._interval_us) for i in range(reserved)]
        self._spares.extend(slots[len(requests):])
        return list(slots[:len(requests)])

    async def _call(self, count: int, spares: int = 0) -> tuple[Slot, int] | None:
        """Reserve ``count`` slots, and ``spares`` more if the budget was idle for all of
        them (``count`` 0: only send a pending pause): the first slot and how many were
        reserved, or None: Redis unreachable."""
        pause_s, self._pending_pause_s = self._pending_pause_s, 0.0
        given_up, self._given_up = self._given_up, []
        sent = time.monotonic()
        try:
            raw: Any = await self._script(keys=list(self._keys), args=[
                self._interval_us, round(pause_s * 1_000_000), count, spares,
                *(n for pair in Counter(given_up).items() for n in pair)])
        except (RedisError, OSError) as exc:
            self._pending_pause_s = max(self._pending_pause_s, pause_s)
            self._given_up += given_up
            if not self._degraded:
                self._degraded = True
                log.warning("shared_budget_unreachable", error=str(exc),
                            detail="limiting this process alone until Redis answers")
            self._metrics.budget_fallbacks.inc()
            return None
        answered = time.monotonic()
        if self._degraded:
            self._degraded = False
            log.info("shared_budget_restored")
        wait_us, paused_us, now_us, reserved = (int(v) for v in raw)
        # When Redis read its clock, on this process's: Redis's time plus the smallest recent
        # gap between the two clocks (an answer never comes before Redis read its clock, so
        # that is never early), kept between this call's start and its answer. Not simply
        # the answer's arrival: an answer read late (this event loop busy when it came) would
        # start the slot late and hide it.
        self._offsets.append(answered - now_us / 1e6)
        read_at = min(max(now_us / 1e6 + min(self._offsets), sent), answered)
        if paused_us > now_us:
            self._paused_until_local = max(self._paused_until_local,
                                           read_at + (paused_us - now_us) / 1e6)
        return Slot(read_at + wait_us / 1e6, wait_us / 1e6, now_us + wait_us), reserved


async def budget_use(client: aioredis.Redis, prefix: str, seconds: int = 10
                     ) -> dict[int, int]:
    """Requests reserved in each of the last ``seconds`` whole seconds (Redis time), across
    all instances: what ``status`` shows as the shared budget's use."""
    now_s, _ = await client.time()
    used_prefix = budget_keys(prefix)[2]
    wanted = [int(now_s) - i for i in range(1, seconds + 1)]
    values = await client.mget([f"{used_prefix}{s}" for s in wanted])
    return {s: int(v) if v else 0 for s, v in zip(wanted, values, strict=True)}


def open_budget(settings: Settings, metrics: Metrics) -> RateLimiter:
    """The budget the settings ask for: shared in Redis when ``REDIS_ADDRESS`` is set (every
    instance on it shares ``OPERATIONS_PER_SECOND``), else this process's own."""
    if not settings.redis_address:
        metrics.budget_limit.set(settings.operations_per_second)
        return RateLimiter(settings.operations_per_second)
    host, port, password = settings.redis_endpoint
    return SharedBudget(connect(f"{host}:{port}", password, settings.redis_db, 8),
                        settings.operations_per_second, settings.redis_key_prefix, metrics)
