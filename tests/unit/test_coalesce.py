"""Concurrent batch calls merge into fewer calls; every caller gets its own results or error."""

from __future__ import annotations

import asyncio

import pytest

from gitlab_producer.store import RedisStore
from gitlab_producer.store.coalesce import Coalescer
from tests.conftest import TEST_REDIS_DB
from tests.waits import wait_until_async


class Doubler:
    """A batch function that records the batches it was given."""

    def __init__(self, fail_on: int | None = None, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.delay_s = delay_s

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        await asyncio.sleep(self.delay_s)
        if self.fail_on in items:
            raise RuntimeError(f"refused {self.fail_on}")
        return [2 * i for i in items]


async def test_callers_waiting_together_share_one_call_and_get_their_own_results() -> None:
    batch = Doubler(delay_s=0.01)
    double = Coalescer(batch)
    answers = await asyncio.gather(*(double([i, i + 100]) for i in range(20)))
    assert answers == [[2 * i, 2 * (i + 100)] for i in range(20)]
    assert len(batch.batches) < 20
    assert sorted(x for b in batch.batches for x in b) == sorted(
        [i for i in range(20)] + [i + 100 for i in range(20)])


async def test_a_lone_call_goes_out_alone() -> None:
    batch = Doubler()
    double = Coalescer(batch)
    assert await double([1, 2]) == [2, 4]
    assert await double([3]) == [6]
    assert await double([]) == []
    assert batch.batches == [[1, 2], [3]]


async def test_merged_calls_stay_under_the_item_limit() -> None:
    batch = Doubler(delay_s=0.01)
    double = Coalescer(batch, max_items=10)
    answers = await asyncio.gather(*(double(list(range(i * 4, i * 4 + 4))) for i in range(10)))
    assert answers == [[2 * x for x in range(i * 4, i * 4 + 4)] for i in range(10)]
    assert max(len(b) for b in batch.batches) <= 10


async def test_a_failed_call_fails_every_caller_in_it_and_not_the_next() -> None:
    batch = Doubler(fail_on=3, delay_s=0.01)
    double = Coalescer(batch)
    first = asyncio.create_task(double([1]))  # goes out alone
    await asyncio.sleep(0)
    # Both wait while the first call is in flight, so they go out together, and fail together.
    second, third = double([2]), double([3])
    results = await asyncio.gather(first, second, third, return_exceptions=True)
    assert results[0] == [2]
    assert all(isinstance(r, RuntimeError) for r in results[1:])
    assert await double([4]) == [8]


async def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    batch = Doubler(delay_s=0.02)
    double = Coalescer(batch)
    leaving = asyncio.create_task(double([1]))
    staying = asyncio.create_task(double([2]))

    async def in_flight() -> bool:
        return len(batch.batches) == 1

    await wait_until_async(in_flight, 2, "the merged call to go out", interval_s=0.001)
    leaving.cancel()
    assert await staying == [4]
    with pytest.raises(asyncio.CancelledError):
        await leaving


async def test_callers_are_not_left_waiting_when_the_flusher_is_cancelled() -> None:
    gate = asyncio.Event()

    async def stuck(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    echo: Coalescer[int, int] = Coalescer(stuck)
    callers = [asyncio.create_task(echo([i])) for i in range(3)]

    async def flushing() -> bool:
        return echo._flusher is not None

    await wait_until_async(flushing, 2, "the flusher to start", interval_s=0.001)
    assert echo._flusher is not None
    echo._flusher.cancel()
    done, pending = await asyncio.wait(callers, timeout=2)
    assert not pending and all(c.cancelled() for c in done)


async def test_redis_store_merges_concurrent_lookups_and_marks(
        redis_address: str, redis_prefix: str) -> None:
    store = RedisStore.from_address(redis_address, db=TEST_REDIS_DB, prefix=redis_prefix)
    calls = {"mget": 0}
    mget = store._redis.mget

    async def counting_mget(keys: list[bytes]) -> list[bytes | None]:
        calls["mget"] += 1
        return await mget(keys)

    store._redis.mget = counting_mget  # type: ignore[method-assign]
    try:
        pages = [list(range(i * 100, i * 100 + 100)) for i in range(30)]
        await asyncio.gather(*(store.mark_sent(page[::2], ttl_s=60) for page in pages),
                             store.mark_sent([99_999], ttl_s=5))
        answers = await asyncio.gather(*(store.unseen(page) for page in pages))
        assert answers == [page[1::2] for page in pages]
        assert calls["mget"] < len(pages)
        assert await store.unseen([99_999, 99_998]) == [99_998]
    finally:
        await store.close()
