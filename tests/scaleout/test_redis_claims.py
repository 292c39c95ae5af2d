"""Claims across instances (issue 15): two instances on one Redis meeting the same events or
webhook repeats produce each once; a failed or dead owner's events are taken over."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gitlab_producer.metrics import Metrics
from gitlab_producer.sinks.base import DeliveryError
from gitlab_producer.store import RedisStore
from gitlab_producer.store.redis_claims import HELD, MINE, SENT, RedisClaims, shared_claims
from gitlab_producer.sync.delivery import Deliverer
from tests.conftest import TEST_REDIS_DB
from tests.unit.test_store_and_delivery import RecordingSink, event


@pytest.fixture
async def stores(redis_address: str, redis_prefix: str) -> AsyncIterator[list[RedisStore]]:
    """Two instances' stores: their own connections, one Redis and prefix."""
    made = [RedisStore.from_address(redis_address, db=TEST_REDIS_DB, prefix=redis_prefix)
            for _ in range(2)]
    yield made
    for store in made:
        await store.close()


def instance(store: RedisStore, sink: RecordingSink, name: str,
             metrics: Metrics | None = None) -> Deliverer:
    return Deliverer(store, sink, 3600, metrics or Metrics(), "gitlab.test",
                     shared=shared_claims(store, name))


async def test_two_instances_meeting_the_same_events_produce_each_once(
        stores: list[RedisStore]) -> None:
    sinks = [RecordingSink(delay_s=0.05), RecordingSink(delay_s=0.05)]
    one, other = (instance(s, k, f"i{n}") for n, (s, k) in enumerate(zip(stores, sinks,
                                                                          strict=True)))
    a = [event(i) for i in range(1, 41)]
    b = [event(i) for i in range(20, 61)]
    produced = await asyncio.gather(one.deliver(a), other.deliver(b), one.deliver(b),
                                    other.deliver(a))
    assert sum(produced) == 60
    sent = sorted(int(m.headers[0][1]) for k in sinks for m in k.sent)
    assert sent == list(range(1, 61))
    assert await stores[0].unseen(list(range(1, 61))) == []  # every one marked


async def test_a_waiting_instance_returns_only_after_the_owner_marked(
        stores: list[RedisStore]) -> None:
    """The cursor of the waiting reader may move past the event only once it is delivered."""
    slow = RecordingSink(delay_s=0.4)
    one, other = instance(stores[0], slow, "a"), instance(stores[1], RecordingSink(), "b")
    first = asyncio.create_task(one.deliver([event(7)]))
    await asyncio.wait_for(slow.sending.wait(), 5)  # the first holds the claim, sending
    assert await other.deliver([event(7)]) == 0
    # Marked (not merely claimed) before the waiter returned.
    assert await stores[1].client.get(stores[1].event_keys([7])[0]) == b"1"
    assert await first == 1


async def test_a_failed_owner_releases_and_the_other_instance_delivers(
        stores: list[RedisStore]) -> None:
    # The owner's send fails after a second: time for the other to meet its claims (on a
    # loaded machine a fixed 50 ms head start was not always enough for the owner to claim).
    failing = RecordingSink(fail=True, delay_s=1.0)
    good = RecordingSink()
    metrics = Metrics()
    one, other = instance(stores[0], failing, "a"), instance(stores[1], good, "b", metrics)
    first = asyncio.create_task(one.deliver([event(1), event(2)]))
    await asyncio.wait_for(failing.sending.wait(), 10)  # claimed, and sending
    assert await asyncio.wait_for(other.deliver([event(2), event(3)]), 10) == 2
    with pytest.raises(DeliveryError):
        await first
    assert sorted(int(m.headers[0][1]) for m in good.sent) == [2, 3]
    assert metrics.claims_taken_over._value.get() == 1  # event 2, after the owner gave up


async def test_a_dead_owners_claim_expires_and_is_taken_over(
        stores: list[RedisStore]) -> None:
    dead = RedisClaims(stores[0], "dead", ttl_s=0.6)
    assert await dead.claim(stores[0].event_keys([5])) == [MINE]  # then it was kill -9ed
    sink = RecordingSink()
    survivor = instance(stores[1], sink, "alive")
    assert await asyncio.wait_for(survivor.deliver([event(5)]), 10) == 1
    assert len(sink.sent) == 1


async def test_claim_outcomes_and_renewal(stores: list[RedisStore]) -> None:
    one = RedisClaims(stores[0], "a", ttl_s=0.6)
    other = RedisClaims(stores[1], "b", ttl_s=0.6)
    keys = stores[0].event_keys([1, 2])
    assert await one.claim(keys) == [MINE, MINE]
    assert await one.claim(keys) == [MINE, MINE]  # its own (a retried call) stays its own
    await stores[0].mark_sent([2], 60)
    assert await other.claim(keys) == [HELD, SENT]
    async with one.renewed(keys[:1]):
        await asyncio.sleep(1.0)  # beyond the TTL: renewed meanwhile
        assert await other.claim(keys[:1]) == [HELD]
    one.release_soon(keys[:1])
    await asyncio.sleep(0.1)
    assert await other.claim(keys[:1]) == [MINE]
