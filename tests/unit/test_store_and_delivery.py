"""Both stores honour one contract; delivery marks only acknowledged events, once."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from gitlab_producer.gitlab.events import Event, decode_events
from gitlab_producer.metrics import Metrics
from gitlab_producer.sinks.base import DeliveryError, Message
from gitlab_producer.store import Cursor, RedisStore, SQLiteStore, Store, StoreError
from gitlab_producer.sync.delivery import Deliverer, to_message
from tests.conftest import TEST_REDIS_DB, OwnRedis
from tests.waits import wait_until_async


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        made: Store = SQLiteStore(tmp_path / "state.sqlite3")
    else:
        address = request.getfixturevalue("redis_address")
        made = RedisStore.from_address(address, db=TEST_REDIS_DB,
                                       prefix=request.getfixturevalue("redis_prefix"))
    yield made
    await made.close()


async def test_marks_and_ttl(store: Store) -> None:
    assert await store.unseen([1, 2, 3]) == [1, 2, 3]
    await store.mark_sent([2], ttl_s=60)
    await store.mark_sent([3], ttl_s=1)
    assert await store.unseen([1, 2, 3]) == [1]

    async def short_mark_expired() -> bool:
        return await store.unseen([1, 2, 3]) == [1, 3]

    await wait_until_async(short_mark_expired, 5, "the one-second mark to expire")


async def test_cursors_and_meta(store: Store) -> None:
    await store.save_cursors("project", {5: Cursor(100.5, "2026-01-01T00:00:00.000Z")})
    await store.save_cursors("user", {5: Cursor(7.0, "2026-01-01")})
    assert await store.cursors("project", [5, 6]) == {
        5: Cursor(100.5, "2026-01-01T00:00:00.000Z")}
    assert (await store.cursors("user", [5]))[5].activity == "2026-01-01"
    assert await store.get_meta("since") is None
    await store.set_meta("since", "123.0")
    assert await store.get_meta("since") == "123.0"
    await store.ping()


async def test_many_ids_in_one_call(store: Store) -> None:
    ids = list(range(1, 2501))
    await store.mark_sent(ids[::2], ttl_s=60)
    assert await store.unseen(ids) == ids[1::2]


async def test_sqlite_survives_restart(tmp_path: Path) -> None:
    first = SQLiteStore(tmp_path / "s.sqlite3")
    await first.mark_sent([9], ttl_s=60)
    await first.save_cursors("project", {1: Cursor(1.0, "a")})
    await first.close()
    second = SQLiteStore(tmp_path / "s.sqlite3")
    assert await second.unseen([9]) == []
    assert await second.cursors("project", [1]) == {1: Cursor(1.0, "a")}
    await second.close()


BIG = [2**63 - 1, 2**63, 2**63 + 1, 2**64 + 5, 10**30]  # past SQLite's signed 64-bit INTEGER


async def test_ids_past_2_63_are_kept_exactly(store: Store) -> None:
    await store.mark_sent([1, *BIG[::2]], ttl_s=60)
    assert await store.unseen([1, *BIG]) == BIG[1::2]  # neighbours stay apart (no REAL)
    await store.save_cursors("project", {i: Cursor(float(n), f"a{n}") for n, i in enumerate(BIG)})
    await store.save_cursors("user", {2**64: Cursor(1.0, "2026-01-01")})
    assert await store.cursors("project", [*BIG, 2**64]) == {
        i: Cursor(float(n), f"a{n}") for n, i in enumerate(BIG)}
    assert await store.cursors("user", [2**64, 2**64 + 1]) == {2**64: Cursor(1.0, "2026-01-01")}


async def test_a_failed_batch_of_marks_leaves_none(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = SQLiteStore(path)
    other = sqlite3.connect(path)  # the disk "fails" at the third row of the batch
    other.execute("CREATE TRIGGER fail BEFORE INSERT ON sent WHEN NEW.id = 3 "
                  "BEGIN SELECT RAISE(ABORT, 'disk trouble'); END")
    other.commit()
    with pytest.raises(StoreError, match="disk trouble"):
        await store.mark_sent([1, 2, 3, 4], ttl_s=60)
    assert await store.unseen([1, 2, 3, 4]) == [1, 2, 3, 4]
    other.execute("CREATE TRIGGER fail_cursor BEFORE INSERT ON cursors WHEN NEW.id = 8 "
                  "BEGIN SELECT RAISE(ABORT, 'disk trouble'); END")
    other.commit()
    with pytest.raises(StoreError):
        await store.save_cursors("project", {7: Cursor(1.0, "a"), 8: Cursor(1.0, "b")})
    assert await store.cursors("project", [7, 8]) == {}
    other.close()
    await store.close()


async def test_a_store_file_of_the_previous_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE sent (id INTEGER PRIMARY KEY, expires_at REAL NOT NULL);
        CREATE TABLE cursors (kind TEXT NOT NULL, id INTEGER NOT NULL, synced_at REAL NOT NULL,
            activity TEXT NOT NULL, PRIMARY KEY (kind, id));
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE keyed (namespace TEXT NOT NULL, key TEXT NOT NULL,
            expires_at REAL NOT NULL, PRIMARY KEY (namespace, key));
        INSERT INTO sent VALUES (9, 1e12);
        INSERT INTO cursors VALUES ('project', 1, 5.0, 'a');
        INSERT INTO meta VALUES ('since', '12.0');""")
    old.close()
    store = SQLiteStore(path)
    assert await store.unseen([9, 10]) == [10]
    assert await store.cursors("project", [1]) == {1: Cursor(5.0, "a")}
    assert await store.get_meta("since") == "12.0"
    await store.mark_sent([2**64], ttl_s=60)
    assert await store.unseen([2**64]) == []
    await store.close()


class RecordingSink:
    def __init__(self, fail: bool = False, delay_s: float = 0.0) -> None:
        self.sent: list[Message] = []
        self.fail = fail
        self.delay_s = delay_s
        self.sending = asyncio.Event()  # set once a send has begun

    async def send(self, messages: Sequence[Message]) -> None:
        self.sending.set()
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise DeliveryError("broker down")
        self.sent.extend(messages)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


def event(event_id: int, project_id: int | None = 1) -> Event:
    return Event(event_id, project_id, 4, 1_767_225_600.0,
                 b'{"id":%d,"created_at":"2026-01-01T00:00:00.000Z"}' % event_id)


async def test_overlapping_lists_deliver_each_event_once(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite3")
    sink = RecordingSink(delay_s=0.05)
    deliverer = Deliverer(store, sink, 3600, Metrics(), "gitlab.test")
    a = [event(i) for i in range(1, 11)]
    b = [event(i) for i in range(5, 16)]
    produced = await asyncio.gather(deliverer.deliver(a), deliverer.deliver(b))
    assert sum(produced) == 15
    assert sorted(int(m.headers[0][1]) for m in sink.sent) == list(range(1, 16))
    assert await deliverer.deliver(a + b) == 0
    await store.close()


class LaggingStore(SQLiteStore):
    """Answers ``unseen`` from the state at the call, but hands it back only after a delay:
    a reader whose lookup result sits in a busy event loop while another reader finishes."""

    def __init__(self, path: Path, lags: list[float]) -> None:
        super().__init__(path)
        self.lags = lags

    async def unseen(self, event_ids: Sequence[int]) -> list[int]:
        answer = await super().unseen(event_ids)
        await asyncio.sleep(self.lags.pop(0))
        return answer


async def test_a_reader_whose_lookup_lags_does_not_send_again(tmp_path: Path) -> None:
    """The first reader claims, sends, marks and releases the event while the second one's
    lookup (taken before the mark) is still on its way: the second must not send it too."""
    store = LaggingStore(tmp_path / "s.sqlite3", lags=[0.0, 0.3])
    sink = RecordingSink(delay_s=0.05)
    deliverer = Deliverer(store, sink, 3600, Metrics(), "gitlab.test")
    first = asyncio.create_task(deliverer.deliver([event(1)]))
    await asyncio.sleep(0)  # the first reader starts first
    produced = await asyncio.gather(first, deliverer.deliver([event(1)]))
    assert sorted(produced) == [0, 1]
    assert len(sink.sent) == 1
    await store.close()


async def test_failed_delivery_marks_nothing_and_fails_waiters(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite3")
    deliverer = Deliverer(store, RecordingSink(fail=True, delay_s=0.05), 3600, Metrics(), "g")
    results = await asyncio.gather(deliverer.deliver([event(1), event(2)]),
                                   deliverer.deliver([event(2)]), return_exceptions=True)
    assert all(isinstance(r, DeliveryError) for r in results)
    assert await store.unseen([1, 2]) == [1, 2]
    await store.close()


def test_message_contract() -> None:
    first = (b'{"id": 7, "project_id": null, "author_id": 4, "x": "\\u00fc",'
             b' "created_at": "2026-01-01T10:00:00.123Z"}')
    second = b'{"id":8,"project_id":3,"author_id":4,"created_at":"2026-01-01T10:00:01.000Z"}'
    user_event, project_event = decode_events(b"[" + first + b",\n " + second + b"]")
    message = to_message(user_event, b"gl.test")
    assert message.key == b"4"  # the author keys events outside projects
    assert dict(message.headers) == {"event_id": b"7", "kind": b"user", "source": b"gl.test"}
    # The value is the event's bytes exactly as GitLab sent them, escapes and spacing kept.
    assert message.value == first
    project = to_message(project_event, b"gl.test")
    assert project.key == b"3" and dict(project.headers)["kind"] == b"project"
    assert project_event.created_ts == 1_767_261_601.0


def test_pages_that_are_not_event_arrays_are_refused() -> None:
    for body in (b'[{"id": 1', b"<html>502</html>", b'{"message": "x"}', b"null"):
        with pytest.raises(ValueError):
            decode_events(body)


def test_bad_events_are_left_out_and_the_good_ones_kept() -> None:
    good = [b'{"id":%d,"project_id":3,"author_id":4,"created_at":"2026-01-01T10:00:0%d.000Z"}'
            % (i, i) for i in (1, 2, 3)]
    bad = [b'{"project_id":3,"created_at":"2026-01-01T10:00:00Z"}',  # no id
           b'{"id":9,"project_id":3}',  # no created_at
           b'{"id":"x","created_at":"2026-01-01T00:00:00Z"}',  # id not an integer
           b'{"id":10,"created_at":null}', b"null", b"[]"]
    body = b"[" + b",".join([good[0], *bad[:3], good[1], *bad[3:], good[2]]) + b"]"
    page = decode_events(body)
    assert [e.id for e in page] == [1, 2, 3]
    assert [e.raw for e in page] == good  # their bytes, untouched
    assert len(page.malformed) == len(bad)
    assert "id" in page.malformed[0] and "created_at" in page.malformed[1]
    assert decode_events(b"[" + good[0] + b"]").malformed == []


async def test_entities_kept_for_retry(store: Store) -> None:
    assert await store.retries("project") == {}
    big = 2**63 + 5  # GitLab ids are not bounded by SQLite's integers
    await store.save_retries("project", {7: "a", big: "b"})
    await store.save_retries("user", {7: "u"})
    await store.save_retries("project", {7: "a2"})
    assert await store.retries("project") == {7: "a2", big: "b"}
    await store.drop_retries("project", [7, 8])
    assert await store.retries("project") == {big: "b"}
    assert await store.retries("user") == {7: "u"}
    await store.drop_retries("user", [])


async def test_keyed_marks_have_their_own_namespace(store: Store) -> None:
    assert await store.unseen_keys("hook", ["a", "b"]) == ["a", "b"]
    await store.mark_keys("hook", ["a"], ttl_s=60)
    assert await store.unseen_keys("hook", ["a", "b"]) == ["b"]
    assert await store.unseen_keys("other", ["a"]) == ["a"]
    await store.mark_keys("hook", ["b"], ttl_s=1)
    assert await store.unseen_keys("hook", ["a", "b"]) == []

    async def short_key_expired() -> bool:
        return await store.unseen_keys("hook", ["a", "b"]) == ["b"]

    await wait_until_async(short_key_expired, 5, "the one-second key to expire")


async def test_redis_burst_beyond_the_pool_waits_instead_of_failing(
        redis_address: str, redis_prefix: str) -> None:
    """More concurrent calls than connections (a burst of webhooks) queue for a connection;
    redis-py's default pool would raise "Too many connections" and the hooks would get 503."""
    store = RedisStore.from_address(redis_address, db=TEST_REDIS_DB, prefix=redis_prefix,
                                    max_connections=2)
    try:
        answers = await asyncio.gather(*(store.unseen_keys("hook", [f"k{i}"]) for i in range(40)))
    finally:
        await store.close()
    assert answers == [[f"k{i}"] for i in range(40)]


async def test_redis_restart_costs_no_failed_command(own_redis: OwnRedis) -> None:
    """Pooled connections that a Redis restart closed are replaced, not failed: a mark that
    failed after Kafka's acknowledgement would have the event sent again."""
    own_redis.persistent = True
    own_redis.start()
    store = RedisStore.from_address(own_redis.address, prefix="gp-restart:")
    await asyncio.gather(*(store.mark_sent([i], ttl_s=60) for i in range(20)))  # many conns
    own_redis.kill()
    own_redis.start()
    await store.mark_sent([100], ttl_s=60)
    assert await store.unseen([1, 100, 101]) == [101]
    await store.close()
