"""One request budget for the whole process: ``OPERATIONS_PER_SECOND``, evenly spaced.

Requests are given start slots ``1 / rate`` seconds apart, and never more than ``rate``
starts fall within one second (a sliding window with a small guard, so float rounding or a
little network jitter cannot squeeze an extra request into a second). A busy service uses all
of it. A 429 with GitLab's ``Retry-After`` or ``RateLimit-*`` headers (the token's whole
limit) pauses every caller until GitLab's reset time. A 429 without them comes from one
endpoint's own limit (the projects, groups and users APIs): :class:`EndpointPauses` holds
back that endpoint only, so the others go on.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

WINDOW_GUARD_S = 0.005


class RateLimiter:
    """Evenly spaced request slots plus a shared pause."""

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self.interval_s = 1.0 / per_second
        self._clock = clock
        self._next_slot = 0.0
        self._paused_until = 0.0
        self._recent: deque[float] = deque(maxlen=max(1, math.floor(per_second)))
        self._lock = asyncio.Lock()

    async def acquire(self) -> float:
        """Wait for a slot; returns the seconds waited."""
        waited = 0.0
        while True:
            async with self._lock:
                now = self._clock()
                slot = max(now, self._next_slot, self._paused_until)
                if len(self._recent) == self._recent.maxlen:
                    slot = max(slot, self._recent[0] + 1.0 + WINDOW_GUARD_S)
                self._recent.append(slot)
                self._next_slot = slot + self.interval_s
            if slot > now:
                await asyncio.sleep(slot - now)
                waited += slot - now
            # A pause that began while this caller slept applies to it too.
            if self._clock() >= self._paused_until:
                return waited

    def pause(self, seconds: float) -> None:
        """Stop everyone for ``seconds`` (GitLab said 429)."""
        until = self._clock() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self._next_slot = max(self._next_slot, until)

    async def aclose(self) -> None:
        """Release what the limiter holds (nothing here; a shared budget's connections)."""


class EndpointPauses:
    """Pauses of single endpoints (a URL path, so one entity's list), each with the number of
    429s in a row that set it, from which the next backoff grows. Cleared by a success."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._state: dict[str, tuple[float, int]] = {}  # key -> (paused until, streak)

    def remaining(self, key: str) -> float:
        """Seconds until ``key`` may be asked again."""
        state = self._state.get(key)
        return 0.0 if state is None else max(0.0, state[0] - self._clock())

    def streak(self, key: str) -> int:
        """429s in a row on ``key``."""
        state = self._state.get(key)
        return 0 if state is None else state[1]

    def pause(self, key: str, seconds: float) -> None:
        """``key`` answered 429 again: hold it back ``seconds``."""
        now = self._clock()
        if key not in self._state and len(self._state) >= self._max_keys:
            # Forget the pauses that ended (their streak too); then the oldest.
            self._state = {k: v for k, v in self._state.items() if v[0] > now}
            if len(self._state) >= self._max_keys:
                del self._state[next(iter(self._state))]
        until, streak = self._state.get(key, (0.0, 0))
        self._state[key] = (max(until, now + seconds), streak + 1)

    def clear(self, key: str) -> None:
        """``key`` answered: its backoff starts again from the bottom."""
        self._state.pop(key, None)
