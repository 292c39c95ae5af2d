"""The rule of the shared rounds (issue 15): a round is complete only when all its jobs are done,
and its start becomes the next round's base only when all of them succeeded, wherever they ran.

First the Redis scripts alone (:class:`RoundState`), then real shared rounds: two instances'
:class:`SharedRounds` (their own clients, stores and SAQ workers, one Redis and prefix) against
the simulator over HTTP, with a sink that refuses one project's events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from math import ceil
from pathlib import Path

import httpx
import pytest

from gitlab_producer.config import Settings, load_settings
from gitlab_producer.gitlab.client import GitLabClient, RetryPolicy
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.metrics import Metrics
from gitlab_producer.objects.engine import Call
from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.store import RedisStore
from gitlab_producer.sync.delivery import Deliverer
from gitlab_producer.sync.entities import SyncContext, Work
from gitlab_producer.sync.round import LAST_ROUND_KEY, RoundResult, SyncRound
from gitlab_producer.sync.round_state import RoundState
from gitlab_producer.sync.shared_rounds import (
    ENTITY,
    ENTITY_BATCH,
    SharedRounds,
    discover_key,
    job_args,
    job_key,
)
from tests.conftest import TEST_REDIS_DB
from tests.integration.test_delivery import requests_served
from tests.unit.test_round_rules import PER_PAGE, QUIET, RULES, SwitchableSink

BASE, LISTED = LAST_ROUND_KEY, "last_user_listing"


@pytest.fixture
async def store(redis_address: str, redis_prefix: str) -> AsyncIterator[RedisStore]:
    made = RedisStore.from_address(redis_address, db=TEST_REDIS_DB, prefix=redis_prefix)
    yield made
    await made.close()


@pytest.fixture
def state(store: RedisStore, redis_prefix: str) -> RoundState:
    return RoundState(store.client, redis_prefix, BASE, LISTED)


async def open_round(state: RoundState, started: float = 1000.0) -> int:
    number, opened = await state.open(0, started, started, discover_key("<n>"), {})
    assert opened == 1
    return number


# -- the scripts ------------------------------------------------------------------------------
async def test_a_round_is_complete_only_when_its_last_job_is_done(state: RoundState,
                                                                  store: RedisStore) -> None:
    n = await open_round(state)
    assert await state.add_jobs(n, {"a": {}, "b": {}}) == ["a", "b"]
    assert await state.done(n, discover_key(n), "discovered", "round") == 1
    assert await state.done(n, "a", "synced", "project") == 1
    summary = await state.summary(n)
    assert summary is not None and not summary.complete
    assert await store.get_meta(BASE) is None  # not before every job is done
    assert await state.done(n, "b", "skipped", "user") == 2  # the last one completes it
    summary = await state.summary(n)
    assert summary is not None and summary.complete and summary.ok
    assert summary.counts["synced"]["project"] == 1 and summary.counts["skipped"]["user"] == 1
    assert await store.get_meta(BASE) == repr(1000.0)  # skipped entities are kept for retry


async def test_discovery_keeps_the_round_open_until_it_is_done(state: RoundState,
                                                               store: RedisStore) -> None:
    n = await open_round(state)
    await state.add_jobs(n, {"a": {}})
    assert await state.done(n, "a", "synced", "project") == 1  # discovery still running
    assert await state.add_jobs(n, {"a": {}, "b": {}}) == ["b"]  # a done job is not redone
    await state.done(n, "b", "synced", "project")
    assert await state.done(n, discover_key(n), "discovered", "round", listed_users=True) == 2
    assert await store.get_meta(BASE) == await store.get_meta(LISTED) == repr(1000.0)


async def test_one_failed_job_completes_the_round_without_moving_the_base(
        state: RoundState, store: RedisStore) -> None:
    await store.set_meta(BASE, "500.0")
    n = await open_round(state)
    await state.add_jobs(n, {"a": {}, "b": {}})
    await state.done(n, "a", "failed", "project")
    await state.done(n, "b", "synced", "project")
    assert await state.done(n, discover_key(n), "discovered", "round") == 2
    summary = await state.summary(n)
    assert summary is not None and summary.complete and not summary.ok
    assert await store.get_meta(BASE) == "500.0"
    # The next round opens (its windows still from the old base), and may succeed.
    m = await open_round(state, 2000.0)
    assert m == n + 1
    assert await state.done(m, discover_key(m), "discovered", "round") == 2
    assert await store.get_meta(BASE) == repr(2000.0)


async def test_a_job_done_twice_counts_once(state: RoundState) -> None:
    n = await open_round(state)
    await state.add_jobs(n, {"a": {}, "b": {}})
    assert await state.done(n, "a", "synced", "project") == 1
    assert await state.done(n, "a", "failed", "project") == 0  # a late duplicate: ignored
    summary = await state.summary(n)
    assert summary is not None and summary.ok and summary.counts["synced"]["project"] == 1


async def test_n_instances_open_a_round_once_and_wait_their_turn(state: RoundState) -> None:
    opened = await asyncio.gather(*(state.open(3600, 1.0, 1.0, discover_key("<n>"), {})
                                    for _ in range(5)))
    assert sorted(o for _, o in opened) == [0, 0, 0, 0, 1] and {n for n, _ in opened} == {1}
    await state.done(1, discover_key(1), "discovered", "round")
    number, wait = await state.open(3600, 2.0, 2.0, discover_key("<n>"), {})
    assert number == 1 and -3600_000 <= wait < 0  # complete, but the next is not due yet


# -- real shared rounds -----------------------------------------------------------------------
def settings_for(redis_address: str, prefix: str, interval_s: float = 0) -> Settings:
    return load_settings(None, gitlab_base_url="https://gitlab.test/api/v4",
                         gitlab_private_token="t0ken", redis_address=redis_address,
                         redis_db=TEST_REDIS_DB, redis_key_prefix=prefix, gitlab_concurrency=2,
                         scheduling_poll_interval=interval_s, sync_users=False)


@contextlib.asynccontextmanager
async def instance(sim: SimulatorThread, settings: Settings, sink: SwitchableSink,
                   stop: asyncio.Event, interval_s: float | None = None
                   ) -> AsyncIterator[SharedRounds]:
    store = RedisStore.from_address(settings.redis_address, db=TEST_REDIS_DB,
                                    prefix=settings.redis_key_prefix)
    metrics = Metrics()
    client = GitLabClient(f"{sim.url}/api/v4", "sim-token", RateLimiter(1000), metrics, 10.0,
                          RetryPolicy(max_retries=1, base_s=0.01))
    ctx = SyncContext(client, store, Deliverer(store, sink, 3600, metrics, "gitlab.test"),
                      metrics, RULES, PER_PAGE, sim.sim.world.start_ms / 1000, stop)
    shared = SharedRounds(ctx, settings, interval_s)
    await shared.start()
    try:
        yield shared
    finally:
        stop.set()
        await shared.close()
        await client.aclose()
        await store.close()


async def test_a_shared_round_with_a_failed_job_keeps_the_base_and_retries_it(
        redis_address: str, redis_prefix: str, tmp_path: Path) -> None:
    settings = settings_for(redis_address, redis_prefix)
    sink = SwitchableSink(tmp_path / "events.jsonl")
    with running_simulator(QUIET) as sim:
        rows = httpx.get(f"{sim.url}/_simulator/truth", timeout=30).json()["events"]
        projects = sorted({row[1] for row in rows if row[1] is not None})
        failing = projects[0]
        sink.refuse = {row[0] for row in rows if row[1] == failing}
        stops = [asyncio.Event(), asyncio.Event()]
        async with instance(sim, settings, sink, stops[0]) as one, \
                instance(sim, settings, sink, stops[1]) as other:
            first = await asyncio.wait_for(one.run(), 60)
            assert not first.ok and first.failed["project"] == 1, first
            assert first.synced["project"] == len(projects) - 1
            assert await one.ctx.store.get_meta(LAST_ROUND_KEY) is None
            assert failing in await one.ctx.store.retries("project")
            ran = [sum(s.value for m in i.ctx.metrics.round_jobs.collect() for s in m.samples
                       if s.name.endswith("_total") and s.labels["kind"] == "project")
                   for i in (one, other)]
            # Both instances took jobs; a job reads a batch of entities (one of them failed
            # the round, the others of its batch were read all the same).
            assert all(ran) and ceil(len(projects) / ENTITY_BATCH) <= sum(ran) < len(projects), \
                ran
            sink.refuse = set()
            second = await asyncio.wait_for(other.run(), 60)
            assert second.ok, second
            assert await other.ctx.store.get_meta(LAST_ROUND_KEY) is not None
            assert failing not in await one.ctx.store.retries("project")
    delivered = sink.delivered()
    in_projects = {row[0] for row in rows if row[1] is not None}
    assert in_projects <= set(delivered) and max(delivered.values()) == 1


async def test_a_job_the_queue_lost_is_enqueued_again(
        redis_address: str, redis_prefix: str, tmp_path: Path) -> None:
    """An open job without a pending SAQ job (its discoverer died between recording and
    enqueueing it) is enqueued again at the second look, and the round completes."""
    settings = settings_for(redis_address, redis_prefix)
    sink = SwitchableSink(tmp_path / "events.jsonl")
    with running_simulator(QUIET) as sim:
        async with instance(sim, settings, sink, asyncio.Event()) as one:
            n = await open_round(one.state, 1.0)
            args = {"kind": "project", "id": 1, "activity": "", "cursor": None, "retry": None}
            await one.state.add_jobs(n, {f"round:{n}:project:1": args})
            await one.state.done(n, discover_key(n), "discovered", "round")
            await one.supervise(n)  # first look: a suspect only
            assert await one.dispatcher.pending([f"round:{n}:project:1"]) == set()
            await one.supervise(n)
            summary = None
            for _ in range(200):
                summary = await one.state.summary(n)
                if summary is not None and summary.complete:
                    break
                await asyncio.sleep(0.05)
            assert summary is not None and summary.complete and summary.ok, summary
            assert ENTITY in one.handlers


async def test_run_once_opens_a_round_at_once_whenever_the_last_one_opened(
        redis_address: str, redis_prefix: str, tmp_path: Path) -> None:
    """``run --once`` (interval 0) does not wait out SCHEDULING_POLL_INTERVAL after the last
    round; the rounds forever (the interval) would."""
    settings = settings_for(redis_address, redis_prefix, interval_s=3600)
    sink = SwitchableSink(tmp_path / "events.jsonl")
    with running_simulator(QUIET) as sim:
        async with instance(sim, settings, sink, asyncio.Event(), interval_s=0.0) as once:
            for _ in range(2):
                assert (await asyncio.wait_for(once.run(), 30)).ok
            assert await once.state.current() == 2
        async with instance(sim, settings, sink, asyncio.Event()) as forever:
            waiting = asyncio.create_task(forever.run())
            await asyncio.sleep(1.0)
            assert not waiting.done() and await forever.state.current() == 2
            forever.ctx.stop.set()
            assert (await waiting).error == "interrupted"


async def _no_beat() -> None:
    return None


async def test_a_batch_run_again_reads_from_the_stored_cursors(
        redis_address: str, redis_prefix: str, tmp_path: Path) -> None:
    """A batch job taken over (its second run) reads each entity from the cursor its first
    run saved, not from the one discovery saw: the entities already read cost a request
    each, and nothing is delivered again."""
    settings = settings_for(redis_address, redis_prefix)
    sink = SwitchableSink(tmp_path / "events.jsonl")
    with running_simulator(QUIET) as sim:
        rows = httpx.get(f"{sim.url}/_simulator/truth", timeout=30).json()["events"]
        projects = sorted({row[1] for row in rows if row[1] is not None})[:ENTITY_BATCH]
        async with instance(sim, settings, sink, asyncio.Event()) as one:
            assert (await asyncio.wait_for(one.run(), 60)).ok  # every cursor saved
            delivered = sum(sink.delivered().values())
            n = await open_round(one.state, 2000.0)
            # As discovery saw them before the first run: no cursors.
            args = job_args("project", [(Work("project", p, "", None), None) for p in projects])
            await one.state.add_jobs(n, {job_key(n, args): args})
            await one.state.done(n, discover_key(n), "discovered", "round")
            served = requests_served(sim.url)
            await one.read_entities(Call(2, 10, _no_beat), {"round": n, **args})
            assert requests_served(sim.url) - served <= len(projects)
            assert sum(sink.delivered().values()) == delivered
            summary = await one.state.summary(n)
            assert summary is not None and summary.complete and summary.ok, summary
            assert summary.counts["synced"]["project"] == len(projects)


async def test_a_lost_batch_given_up_keeps_every_entity_for_retry(
        redis_address: str, redis_prefix: str, tmp_path: Path) -> None:
    """A batch the queue lost more than the allowed times fails the round, and every entity
    of it is kept in the retry set (read by the next round whatever the windows say)."""
    settings = settings_for(redis_address, redis_prefix)
    sink = SwitchableSink(tmp_path / "events.jsonl")
    with running_simulator(QUIET) as sim:
        async with instance(sim, settings, sink, asyncio.Event()) as one:
            n = await open_round(one.state, 1.0)
            args = job_args("project", [(Work("project", p, "", None), None) for p in (3, 5)])
            key = job_key(n, args)
            await one.state.add_jobs(n, {key: args})
            await one.state.done(n, discover_key(n), "discovered", "round")
            await one._give_up(n, key, args)
            summary = await one.state.summary(n)
            assert summary is not None and summary.complete and not summary.ok, summary
            assert summary.counts["failed"]["project"] == 2
            assert {3, 5} <= set(await one.ctx.store.retries("project"))
            assert await one.ctx.store.get_meta(LAST_ROUND_KEY) is None


async def test_a_batch_reads_its_entities_at_once_within_the_read_slots(
        redis_address: str, redis_prefix: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's entities are read at the same time, as many as the instance's read slots (the
    in-process round's readers: ``GITLAB_CONCURRENCY`` per kind), not one after the other."""
    settings = settings_for(redis_address, redis_prefix)  # 2 reads at once
    sink = SwitchableSink(tmp_path / "events.jsonl")
    reading, most = 0, 0
    two_in = asyncio.Event()

    async def read_one(self: SyncRound, work: Work, result: RoundResult) -> None:
        nonlocal reading, most
        reading += 1
        most = max(most, reading)
        if reading >= 2:
            two_in.set()
        with contextlib.suppress(TimeoutError):  # bounded: one after the other never gets 2
            await asyncio.wait_for(two_in.wait(), 2)
        await asyncio.sleep(0.01)
        reading -= 1
        result.synced[work.kind] += 1

    monkeypatch.setattr(SyncRound, "read_one", read_one)
    with running_simulator(QUIET) as sim:
        async with instance(sim, settings, sink, asyncio.Event()) as one:
            n = await open_round(one.state, 1.0)
            args = job_args("project", [(Work("project", p, "", None), None)
                                        for p in range(1, 7)])
            await one.state.add_jobs(n, {job_key(n, args): args})
            await one.state.done(n, discover_key(n), "discovered", "round")
            await one.read_entities(Call(1, 10, _no_beat), {"round": n, **args})
            summary = await one.state.summary(n)
            assert summary is not None and summary.complete and summary.ok, summary
            assert summary.counts["synced"]["project"] == 6
    assert most == 2  # at once, and never more than the read slots
