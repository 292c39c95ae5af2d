"""The shared byte budget of webhook bodies: bounded, first come first served, and a waiter
that gives up neither keeps its place nor blocks the ones behind it."""

from __future__ import annotations

import asyncio

import pytest

from gitlab_producer.http.inflight import ByteBudget


async def test_waiters_are_served_in_order_and_never_over_capacity() -> None:
    budget = ByteBudget(100)
    await budget.acquire(60)
    order: list[str] = []

    async def take(name: str, size: int) -> None:
        await budget.acquire(size)
        order.append(name)
        assert budget.used <= budget.capacity

    big = asyncio.create_task(take("big", 90))
    await asyncio.sleep(0)
    small = asyncio.create_task(take("small", 20))  # would fit now, but big came first
    await asyncio.sleep(0)
    assert order == [] and budget.used == 60
    budget.release(60)
    await asyncio.wait_for(big, 1)
    assert order == ["big"]
    budget.release(90)
    await asyncio.wait_for(small, 1)
    assert order == ["big", "small"] and budget.used == 20


async def test_a_waiter_that_gives_up_lets_the_next_in() -> None:
    budget = ByteBudget(100)
    await budget.acquire(50)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await budget.acquire(80)  # first in line, gives up
    await asyncio.wait_for(budget.acquire(50), 1)  # fits beside the first holder
    assert budget.used == 100
    with pytest.raises(ValueError):
        await budget.acquire(101)
