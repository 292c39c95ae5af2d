"""Spare slots of the shared budget (issue 15): at a limit far above what one instance asks
for, an idle budget lends a reservation a few slots more, so the next requests need no round
trip of their own; a busy budget lends none, and spares too late to use are given up, never
counted as used."""

from __future__ import annotations

import asyncio

import pytest

from gitlab_producer.gitlab.shared_budget import SPARES_MAX, SharedBudget, budget_keys
from gitlab_producer.metrics import Metrics
from gitlab_producer.store.redis_store import connect
from tests.conftest import TEST_REDIS_DB

pytestmark = pytest.mark.integration
HIGH_RATE = 10_000  # slots 0.1 ms apart: spares span well under the 22 ms a request may be late


def counting_calls(budget: SharedBudget) -> list[int]:
    """The slots each reservation asked for, one entry per round trip."""
    script = budget._script
    asked: list[int] = []

    async def counted(*args: object, **kwargs: object) -> object:
        asked.append(int(kwargs["args"][2]))  # type: ignore[index]
        return await script(*args, **kwargs)  # type: ignore[arg-type]

    budget._script = counted  # type: ignore[assignment]
    return asked


async def used_slots(redis_address: str, prefix: str) -> int:
    client = connect(redis_address, db=TEST_REDIS_DB)
    try:
        keys = await client.keys(f"{budget_keys(prefix)[2]}*")
        return sum(int(v) for v in await client.mget(keys)) if keys else 0
    finally:
        await client.aclose()


async def reserved_by_then(redis_address: str, prefix: str) -> None:
    """Until some instance's reservation is in Redis (bounded: fails after 5 s)."""
    client = connect(redis_address, db=TEST_REDIS_DB)
    try:
        async with asyncio.timeout(5):
            while not await client.exists(budget_keys(prefix)[0]):
                await asyncio.sleep(0.001)
    finally:
        await client.aclose()


async def test_an_idle_budget_lends_spares_and_those_too_late_are_given_up(
        redis_address: str, redis_prefix: str) -> None:
    budget = SharedBudget(connect(redis_address, db=TEST_REDIS_DB), HIGH_RATE, redis_prefix,
                          Metrics())
    calls = counting_calls(budget)
    try:
        for _ in range(20):  # one request every 5 ms, as a reader's pages come
            await asyncio.wait_for(budget.acquire(), 10)
            await asyncio.sleep(0.005)
        assert 0 < len(calls) <= 8, calls  # far fewer round trips than requests
        await asyncio.sleep(0.1)  # every spare left is now too late: given up, not used
        await asyncio.wait_for(budget.acquire(), 10)
        assert len(budget._spares) <= SPARES_MAX
        # Every slot handed out was either used by a request or given up with a later call.
        assert await used_slots(redis_address, redis_prefix) == 21 + len(budget._spares)
    finally:
        await budget.aclose()


async def test_a_busy_budget_lends_no_spares(redis_address: str, redis_prefix: str) -> None:
    other = SharedBudget(connect(redis_address, db=TEST_REDIS_DB), HIGH_RATE, redis_prefix,
                         Metrics())
    budget = SharedBudget(connect(redis_address, db=TEST_REDIS_DB), HIGH_RATE, redis_prefix,
                          Metrics())
    calls = counting_calls(budget)
    try:
        # Another instance's requests hold the next ~20 ms of slots.
        busy = asyncio.gather(*(other.acquire() for _ in range(200)))
        await reserved_by_then(redis_address, redis_prefix)
        waited = await asyncio.wait_for(budget.acquire(), 10)
        await asyncio.wait_for(busy, 10)
        assert waited > 0.005  # it queued behind the other's slots
        assert calls == [1] and not budget._spares  # its own slot, nothing more
    finally:
        await other.aclose()
        await budget.aclose()


async def test_no_spares_where_the_limit_is_near_the_demand(redis_address: str,
                                                            redis_prefix: str) -> None:
    """At GitLab's usual limits (tens per second) slots are too far apart for spares: a spare
    unused would hold the budget for others."""
    budget = SharedBudget(connect(redis_address, db=TEST_REDIS_DB), 50, redis_prefix, Metrics())
    calls = counting_calls(budget)
    try:
        for _ in range(3):
            await asyncio.wait_for(budget.acquire(), 10)
        assert calls == [1, 1, 1] and not budget._spares
    finally:
        await budget.aclose()
