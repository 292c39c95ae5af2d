"""The core rules of a round, one path at a time: real rounds (SyncRound) against the simulator
over HTTP, a real SQLite store and a real JSON-lines file sink that can be told to refuse
batches. What is checked is public behaviour: the requests the simulator counted, the events in
the file, the stored cursors and round base.

Each test pins one rule and fails when that rule alone is broken:

1. the round base advances only after a successful round;
2. an entity's cursor is saved only after its last page was acknowledged;
3. user lists skip project events that the project's cursor covers;
4. a failed Kafka delivery fails the entity (with the real broker: test_failed_kafka_...);
5. the activity lag rule (re-read within the lag; not once settled);
6. warm projects are covered by their authors when cheaper, and read themselves later;
7. a project throttled without headers holds up neither the others nor the round.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from gitlab_producer.gitlab.client import GitLabClient, RetryPolicy
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.metrics import Metrics
from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from gitlab_producer.sinks.base import DeliveryError, Message, Sink
from gitlab_producer.sinks.file import FileSink
from gitlab_producer.sinks.kafka import KafkaSink
from gitlab_producer.store import Cursor, SQLiteStore
from gitlab_producer.sync.delivery import Deliverer
from gitlab_producer.sync.entities import SyncContext
from gitlab_producer.sync.round import LAST_ROUND_KEY, RoundResult, SyncRound
from gitlab_producer.sync.windows import WindowRules
from tests.conftest import Broker, consume
from tests.waits import wait_until_async

RULES = WindowRules(overlap_s=300, project_lag_s=3600, user_resync_s=600)
# The generated history ends two hours before start-up: after one round every project is
# settled and no user is due, so whatever a later round reads is what the test caused.
QUIET = WorldSpec(projects=30, users=6, events=900, history_days=1.0, quiet_s=7200, seed=21)
PER_PAGE = 20


class SwitchableSink:
    """The real file sink, refusing (DeliveryError) any batch that holds a listed event id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = FileSink(str(path), "events")
        self.refuse: set[int] = set()
        self.refused = 0

    async def send(self, messages: Sequence[Message]) -> None:
        await asyncio.sleep(0.01)  # an acknowledgement takes a moment, as Kafka's does
        if any(int(dict(m.headers)["event_id"]) in self.refuse for m in messages):
            self.refused += 1
            raise DeliveryError("refused by the test")
        await self.file.send(messages)

    async def ping(self) -> None:
        await self.file.ping()

    async def close(self) -> None:
        await self.file.close()

    def delivered(self) -> Counter[int]:
        if not self.path.exists():
            return Counter()
        return Counter(int(orjson.loads(line)["value"]["id"])
                       for line in self.path.read_bytes().splitlines())


@dataclass(frozen=True)
class TruthEvent:
    id: int
    project: int | None
    author: int
    created_ms: int


@dataclass
class Harness:
    """One service's state (store, client, deliverer) against one simulator."""

    sim: SimulatorThread
    store: SQLiteStore
    ctx: SyncContext
    sink: Sink

    @property
    def url(self) -> str:
        return self.sim.url

    async def round(self, sync_users: bool) -> RoundResult:
        return await SyncRound(self.ctx, 4, sync_users).run()

    def truth(self) -> list[TruthEvent]:
        rows = httpx.get(f"{self.url}/_simulator/truth", params={"times": "1"},
                         timeout=30).json()["events"]
        return [TruthEvent(*row) for row in rows]

    def add_events(self, project_id: int, author_id: int, count: int = 1) -> list[int]:
        answer = httpx.post(f"{self.url}/_simulator/events", timeout=10,
                            json={"count": count, "project_id": project_id,
                                  "author_id": author_id})
        ids: list[int] = answer.json()["ids"]
        return ids

    def reset_requests(self) -> None:
        httpx.post(f"{self.url}/_simulator/stats/reset", timeout=10)

    def requests(self, route: str) -> int:
        by_route = httpx.get(f"{self.url}/_simulator/stats", timeout=10).json()["by_route"]
        return sum(by_route.get(route, {}).values())

    async def project_cursor(self, project_id: int) -> Cursor | None:
        return (await self.store.cursors("project", [project_id])).get(project_id)


@pytest.fixture
def world_spec() -> WorldSpec:
    return QUIET


@pytest.fixture
def rules() -> WindowRules:
    return RULES


@pytest.fixture
def simulator(world_spec: WorldSpec) -> Iterator[SimulatorThread]:
    with running_simulator(world_spec) as sim:
        yield sim


async def harness_for(sim: SimulatorThread, tmp_path: Path, sink: Sink, rules: WindowRules,
                      ttl_s: int = 3600, policy: RetryPolicy | None = None
                      ) -> AsyncIterator[Harness]:
    store = SQLiteStore(tmp_path / f"state-{uuid.uuid4().hex[:6]}.sqlite3")
    metrics = Metrics()
    client = GitLabClient(f"{sim.url}/api/v4", "sim-token", RateLimiter(1000), metrics, 10.0,
                          policy or RetryPolicy(max_retries=2, base_s=0.01))
    ctx = SyncContext(client, store, Deliverer(store, sink, ttl_s, metrics, "gitlab.test"),
                      metrics, rules, PER_PAGE, sim.sim.world.start_ms / 1000, asyncio.Event())
    try:
        yield Harness(sim, store, ctx, sink)
    finally:
        await client.aclose()
        await sink.close()
        await store.close()


@pytest.fixture
def sink(tmp_path: Path) -> SwitchableSink:
    return SwitchableSink(tmp_path / "events.jsonl")


@pytest.fixture
async def harness(simulator: SimulatorThread, tmp_path: Path, sink: SwitchableSink,
                  rules: WindowRules) -> AsyncIterator[Harness]:
    async for made in harness_for(simulator, tmp_path, sink, rules):
        yield made


def in_projects(events: list[TruthEvent]) -> set[int]:
    return {e.id for e in events if e.project is not None}


def by_project(events: list[TruthEvent]) -> Counter[int]:
    return Counter(e.project for e in events if e.project is not None)


def smallest_project(events: list[TruthEvent]) -> int:
    """A project with events, all on one page."""
    counts = by_project(events)
    return min((n, p) for p, n in counts.items() if n <= PER_PAGE // 2)[1]


# -- 1. the round base advances only after a successful round --------------------------------
async def test_round_base_stays_until_a_round_succeeds(harness: Harness,
                                                       sink: SwitchableSink) -> None:
    """A round with a failed project keeps the old base, so the next round lists that project
    again (its activity is hours old: a base moved to the failed round would not list it)."""
    truth = harness.truth()
    failing = smallest_project(truth)
    sink.refuse = {e.id for e in truth if e.project == failing}

    first = await harness.round(sync_users=False)
    assert not first.ok and first.failed["project"] == 1
    assert await harness.store.get_meta(LAST_ROUND_KEY) is None
    assert not set(sink.delivered()) & sink.refuse

    sink.refuse = set()
    second = await harness.round(sync_users=False)
    assert second.ok, second.error
    base = harness.ctx.client.clock.to_gitlab(second.started)  # the base is in GitLab's time
    assert await harness.store.get_meta(LAST_ROUND_KEY) == repr(base)
    delivered = sink.delivered()
    assert set(delivered) == in_projects(truth)  # the failed project's events arrived
    assert max(delivered.values()) == 1


# -- 2. an entity's cursor is saved only after its last page was acknowledged ---------------
async def test_cursor_is_saved_only_after_the_last_page_was_acknowledged(
        harness: Harness, sink: SwitchableSink) -> None:
    truth = harness.truth()
    counts = by_project(truth)
    busiest = max(counts, key=lambda p: counts[p])
    assert counts[busiest] > 2 * PER_PAGE  # several pages: the refused one is the last
    oldest = min(e.id for e in truth if e.project == busiest)
    sink.refuse = {oldest}

    first = await harness.round(sync_users=False)
    assert sink.refused >= 1
    assert await harness.project_cursor(busiest) is None
    assert not first.ok and first.failed["project"] == 1
    others = [p for p in counts if p != busiest]
    assert len(await harness.store.cursors("project", others)) == len(others)
    # Its newer pages were acknowledged, only the last one is missing.
    mine = sorted(e.id for e in truth if e.project == busiest)
    missing = set(mine) - set(sink.delivered())
    assert oldest in missing and len(missing) <= PER_PAGE and mine[-1] not in missing

    sink.refuse = set()
    second = await harness.round(sync_users=False)
    assert second.ok, second.error
    assert await harness.project_cursor(busiest) is not None
    delivered = sink.delivered()
    assert set(delivered) == in_projects(truth)
    assert max(delivered.values()) == 1


# -- 3. user lists skip project events that the project's cursor covers ---------------------
@pytest.fixture
async def short_marks(simulator: SimulatorThread, tmp_path: Path, sink: SwitchableSink,
                      rules: WindowRules) -> AsyncIterator[Harness]:
    """Dedup marks that expire after a second (CACHE_TTL's floor is a minute; the rule is
    about what happens after any expiry)."""
    async for made in harness_for(simulator, tmp_path, sink, rules, ttl_s=1):
        yield made


async def test_user_lists_skip_project_events_the_project_cursor_covers(
        short_marks: Harness, sink: SwitchableSink) -> None:
    harness = short_marks
    truth = harness.truth()
    first = await harness.round(sync_users=False)  # the project path alone
    assert first.ok, first.error
    sent = in_projects(truth)
    assert set(sink.delivered()) == sent

    async def marks_expired() -> bool:
        return len(await harness.store.unseen(sorted(sent))) == len(sent)

    await wait_until_async(marks_expired, 10, "the dedup marks to expire")

    # The users were never read: their lists go back to the start and hold every project
    # event again. Only the events outside projects may come from them.
    second = await harness.round(sync_users=True)
    assert second.ok, second.error
    assert second.synced["user"] > 0
    again = sink.delivered() - Counter(sent)
    outside = {e.id for e in truth if e.project is None}
    assert outside  # the world has events outside projects
    assert set(again) == outside
    assert max(sink.delivered().values()) == 1


# -- 4. a failed Kafka delivery fails the entity ---------------------------------------------
SMALL = WorldSpec(projects=6, users=3, events=200, history_days=1.0, quiet_s=7200, seed=25)


@pytest.mark.parametrize("world_spec", [SMALL])
async def test_failed_kafka_delivery_fails_the_entity_and_is_sent_next_round(
        simulator: SimulatorThread, tmp_path: Path, broker: Broker) -> None:
    """The real broker stops answering: every send times out, so no entity succeeds, no
    cursor, mark or round base is written, and later rounds send everything."""
    topic = f"rules-{uuid.uuid4().hex[:8]}"
    config = {"bootstrap.servers": broker.bootstrap, "enable.idempotence": True,
              "acks": "all", "linger.ms": 5, "message.timeout.ms": 1000}
    kafka = KafkaSink(config, topic)
    async for harness in harness_for(simulator, tmp_path, kafka, RULES):
        truth = harness.truth()
        expected = in_projects(truth)
        await kafka.ping()  # connected (and the topic known) before the outage
        broker.pause()
        try:
            first = await harness.round(sync_users=False)
        finally:
            broker.resume()
        assert not first.ok
        assert first.failed["project"] == first.queued["project"] == len(by_project(truth))
        assert first.synced["project"] == 0
        assert await harness.store.cursors("project", sorted(by_project(truth))) == {}
        assert await harness.store.get_meta(LAST_ROUND_KEY) is None
        assert sorted(await harness.store.unseen(sorted(expected))) == sorted(expected)

        # The first sends after the outage may meet a fenced producer (its timed-out
        # requests made the broker bump the epoch); the sink replaces it, and what the old
        # one held fails once more. A few rounds at most.
        later = [await harness.round(sync_users=False)]
        while not later[-1].ok and len(later) < 5:
            later.append(await harness.round(sync_users=False))
        assert later[-1].ok, later[-1].error
        got = {int(orjson.loads(m.value())["id"])
               for m in consume(broker.bootstrap, topic, len(expected), timeout_s=30)}
        assert got == expected


SCALED = WindowRules(overlap_s=2, project_lag_s=8, user_resync_s=600)
SCALED_WORLD = WorldSpec(projects=24, users=5, events=400, history_days=1.0, quiet_s=7200,
                         seed=23, activity_interval_s=SCALED.project_lag_s)


# -- 5. the activity lag rule ------------------------------------------------------------------
@pytest.mark.parametrize(("world_spec", "rules"), [(SCALED_WORLD, SCALED)])
async def test_unchanged_activity_within_the_lag_is_read_again(harness: Harness,
                                                               sink: SwitchableSink) -> None:
    """A new event within the lag after last_activity_at moved leaves it unchanged; the
    project is read again anyway (the users' lists are off: the project path alone). The
    lag is scaled down to 8 s, and the first read comes more than the overlap (2 s) after
    last_activity_at, so that the lag itself, not the overlap, is what makes the re-read."""
    project = 3
    moved = harness.add_events(project, author_id=2)  # moves last_activity_at to now
    moved_at = next(e.created_ms for e in harness.truth() if e.id == moved[0]) / 1000

    async def past_the_overlap() -> bool:
        return time.time() > moved_at + SCALED.overlap_s + 0.2

    await wait_until_async(past_the_overlap, 10, "the overlap to pass")
    first = await harness.round(sync_users=False)
    assert first.ok, first.error
    before = await harness.project_cursor(project)
    assert before is not None

    hidden = harness.add_events(project, author_id=2)  # last_activity_at stays put
    harness.reset_requests()
    second = await harness.round(sync_users=False)
    assert second.ok, second.error
    assert set(hidden) <= set(sink.delivered())
    assert harness.requests("project_events") == 1  # only that project was read
    after = await harness.project_cursor(project)
    assert after is not None and after.activity == before.activity  # it had not moved


async def test_settled_projects_are_not_read_again(harness: Harness,
                                                   sink: SwitchableSink) -> None:
    """After a failed round the next one lists every project again (the base stayed), but
    only the one that failed is read: the others' cursors were taken after their
    last_activity_at + lag + overlap, which proves them complete."""
    truth = harness.truth()
    failing = smallest_project(truth)
    sink.refuse = {e.id for e in truth if e.project == failing}
    first = await harness.round(sync_users=False)
    assert not first.ok and first.synced["project"] == len(by_project(truth)) - 1

    sink.refuse = set()
    harness.reset_requests()
    second = await harness.round(sync_users=False)
    assert second.ok, second.error
    listed = harness.requests("projects_list")
    assert listed >= 2  # 30 projects on pages of 20: every project was listed again
    assert harness.requests("project_events") == 1
    assert second.queued["project"] == 1


# -- 6. warm projects covered by their authors ------------------------------------------------
WARM = list(range(1, 15))  # 14 warm projects; covering them costs 1 listing page + 5 users


@pytest.mark.parametrize(("world_spec", "rules"), [(SCALED_WORLD, SCALED)])
async def test_warm_projects_are_covered_by_their_authors_then_read_themselves(
        harness: Harness, sink: SwitchableSink) -> None:
    """GitLab's hourly lag scaled down to 8 s (simulator and rules alike), so that the
    covered projects' "hour" passes within the test."""
    activity = [harness.add_events(p, author_id=1 + p % 5)[0] for p in WARM]
    first = await harness.round(sync_users=True)  # reads everything, counts the users
    assert first.ok and first.covered == 0
    assert first.synced["project"] == len(by_project(harness.truth()))

    new = [i for p in WARM for i in harness.add_events(p, author_id=1 + (p + 1) % 5)]
    harness.reset_requests()
    second = await harness.round(sync_users=True)
    assert second.ok, second.error
    assert second.covered == len(WARM), "warm projects not covered (or their lag had passed)"
    assert harness.requests("project_events") == 0  # not read...
    assert harness.requests("user_events") == 5  # ...their authors were,
    assert set(new) <= set(sink.delivered())  # and the new events arrived
    for project in WARM:
        cursor = await harness.project_cursor(project)
        assert cursor is not None and cursor.synced_at < first.started + first.duration_s

    # Once their lag (and overlap) has passed, each covered project is read once itself.
    settled_at = max(e.created_ms for e in harness.truth() if e.id in activity) / 1000 + \
        SCALED.project_lag_s + SCALED.overlap_s
    async def lag_passed() -> bool:  # GitLab's clock, known from whole-second Date headers,
        return time.time() > settled_at + 1.5  # may be taken up to a second behind ours

    await wait_until_async(lag_passed, 2 * SCALED.project_lag_s, "the warm projects' lag")
    harness.reset_requests()
    third = await harness.round(sync_users=True)
    assert third.ok and third.covered == 0
    assert harness.requests("project_events") == len(WARM)
    for project in WARM:
        cursor = await harness.project_cursor(project)
        assert cursor is not None and cursor.synced_at >= settled_at
    harness.reset_requests()
    fourth = await harness.round(sync_users=True)
    assert fourth.ok and harness.requests("project_events") == 0
    delivered = sink.delivered()
    assert set(delivered) == {e.id for e in harness.truth()}
    assert max(delivered.values()) == 1


async def test_few_warm_projects_are_read_rather_than_covered(harness: Harness,
                                                              sink: SwitchableSink) -> None:
    """Three warm projects cost three requests; covering them would cost a listing page and
    six users' lists, so they are read themselves."""
    warm = [4, 5, 6]
    for project in warm:
        harness.add_events(project, author_id=1)
    first = await harness.round(sync_users=True)
    assert first.ok, first.error
    new = [i for p in warm for i in harness.add_events(p, author_id=2)]
    harness.reset_requests()
    second = await harness.round(sync_users=True)
    assert second.ok and second.covered == 0
    assert harness.requests("project_events") == len(warm)
    assert harness.requests("users_list") == 0
    assert set(new) <= set(sink.delivered())


# -- 7. a project throttled without headers holds up neither the others nor the round --------
async def test_a_project_throttled_without_headers_is_left_for_a_later_round(
        simulator: SimulatorThread, tmp_path: Path, sink: SwitchableSink,
        rules: WindowRules) -> None:
    """Its endpoint's 429s carry no header (a per-endpoint limit): it waits alone, then goes to
    the retry set; every other project is delivered in the round, and it in the next one."""
    policy = RetryPolicy(max_retries=2, base_s=0.01, throttle_base_s=0.5, throttle_cap_s=2,
                         endpoint_wait_s=1.5)  # a global pause would take 30 x 1-2 s
    async for harness in harness_for(simulator, tmp_path, sink, rules, policy=policy):
        truth = harness.truth()
        stuck = smallest_project(truth)
        settings = f"{harness.url}/_simulator/settings"
        httpx.post(settings, json={"throttled_projects": [stuck]}, timeout=10)
        first = await asyncio.wait_for(harness.round(sync_users=False), 15)
        assert first.ok and first.skipped["project"] == 1, first
        assert set(await harness.store.retries("project")) == {stuck}
        others = {e.id for e in truth if e.project not in (None, stuck)}
        assert set(sink.delivered()) == others

        httpx.post(settings, json={"throttled_projects": []}, timeout=10)
        second = await harness.round(sync_users=False)
        assert second.ok and not await harness.store.retries("project")
        assert set(sink.delivered()) == in_projects(truth)
