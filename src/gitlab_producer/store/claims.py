"""In-process claims on keys being delivered, taken before the store is asked about them.

A task that meets a key another task holds waits for that one's outcome instead of producing
it again. Claims are taken before the store lookup: claiming after it let a task whose answer
came back late send a key that a faster task had meanwhile sent, marked and released.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from gitlab_producer.sinks.base import DeliveryError

K = TypeVar("K", bound=Hashable)


class Claim(Generic[K]):
    """The keys one task took (``mine``) and the claims of others it met."""

    def __init__(self, held: dict[K, asyncio.Future[None]], keys: Iterable[K]) -> None:
        self._held = held
        self._others = {held[k] for k in keys if k in held}
        self.mine = [k for k in keys if k not in held]
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key in self.mine:
            held[key] = self._future

    def release(self, error: BaseException | None = None) -> None:
        """Drop the keys; waiters learn the outcome (with ``error``, they raise it)."""
        for key in self.mine:
            self._held.pop(key, None)
        if error is None:
            self._future.set_result(None)
        else:
            self._future.set_exception(DeliveryError(f"delivery by another task failed: {error}"))
            self._future.exception()  # retrieved here so an unwaited claim never warns

    async def wait_for_others(self) -> None:
        """Until every claim held by another task is settled; raises if one failed."""
        for other in self._others:
            await asyncio.shield(other)


class Claims(Generic[K]):
    """The claims held in this process, by key."""

    def __init__(self) -> None:
        self._held: dict[K, asyncio.Future[None]] = {}

    def take(self, keys: Iterable[K]) -> Claim[K]:
        """Claim the keys nobody holds; call :meth:`Claim.release` when done with them."""
        return Claim(self._held, list(keys))
