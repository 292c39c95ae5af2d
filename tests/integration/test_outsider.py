"""Outsider attacks: the real service process against a GitLab stand-in written from GitLab's
documentation (``outsider_gitlab.py``, not the project's simulator), a real Redis and the
real broker, with faults. Each test checks completeness: every event once, none doubled."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gitlab_producer.simulator.server import free_port
from tests.conftest import (
    Broker,
    OwnBroker,
    OwnRedis,
    ServiceRun,
    consume,
    gitlab_process,
)
from tests.waits import wait_until

STANDIN = Path(__file__).with_name("outsider_gitlab.py")
TOKEN = "outsider-token"


@dataclass
class StandIn:
    """The stand-in GitLab process."""

    url: str
    proc: subprocess.Popen[bytes]

    def ctl(self, path: str, body: Any | None = None) -> Any:
        if body is None:
            return httpx.get(f"{self.url}/_ctl/{path}", timeout=10).json()
        return httpx.post(f"{self.url}/_ctl/{path}", json=body, timeout=10).json()

    def add(self, *specs: dict[str, Any]) -> list[int]:
        return list(self.ctl("events", {"events": list(specs)})["ids"])

    def fault(self, path: str, kind: str, times: int = 1, seconds: float = 0) -> None:
        self.ctl("faults", {"faults": [{"path": path, "kind": kind, "times": times,
                                        "seconds": seconds}]})

    def truth(self) -> set[int]:
        return {e["id"] for e in self.ctl("events")}


@contextlib.contextmanager
def standin(log: Path, utc_offset: str = "+00:00", clock_shift_s: float = 0.0
            ) -> Iterator[StandIn]:
    def command(port: int) -> list[str]:
        return [sys.executable, str(STANDIN), "--port", str(port), f"--utc-offset={utc_offset}",
                "--token", TOKEN]

    with gitlab_process(log, command, clock_shift_s, ready_s=30) as (url, proc):
        yield StandIn(url, proc)


@pytest.fixture
def gitlab(tmp_path: Path) -> Iterator[StandIn]:
    with standin(tmp_path / "standin.log") as server:
        yield server


def configure(env: ServiceRun, gl: StandIn, bootstrap: str, redis_address: str,
              topic: str, **extra: str) -> None:
    env.env.update({
        "GITLAB_BASE_URL": f"{gl.url}/api/v4", "GITLAB_PRIVATE_TOKEN": TOKEN,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_TOPIC": topic,
        "REDIS_ADDRESS": redis_address, "REDIS_KEY_PREFIX": f"out-{uuid.uuid4().hex[:6]}:",
        "REDIS_DB": "0", "SYNC_SINCE": (datetime.now(UTC) - timedelta(days=2)).isoformat(),
        "GITLAB_PER_PAGE_PAGINATION": "20", "GITLAB_MAX_RETRIES": "8",
        "USER_RESYNC_INTERVAL": "0", "SHUTDOWN_GRACE": "5",
    })
    env.env.update(extra)


def delivered(bootstrap: str, topic: str, expected: int, timeout_s: float = 60) -> Counter[int]:
    messages = consume(bootstrap, topic, expected, timeout_s=timeout_s, settle_s=2)
    return Counter(json.loads(m.value())["id"] for m in messages)


def assert_exactly_once(counts: Counter[int], truth: set[int]) -> None:
    missing = truth - set(counts)
    doubled = {i: n for i, n in counts.items() if n > 1}
    extra = set(counts) - truth
    assert not missing and not doubled and not extra, (
        f"missing {len(missing)} {sorted(missing)[:10]}, doubled {len(doubled)} "
        f"{sorted(doubled.items())[:10]}, extra {sorted(extra)[:10]}")


def spread(n: int, projects: int, users: int, start: datetime, step_s: float,
           **extra: Any) -> list[dict[str, Any]]:
    """``n`` events over projects and users, ``step_s`` apart from ``start``."""
    return [{"project_id": 1 + i % projects, "author_id": 100 + i % users,
             "created_at": (start + timedelta(seconds=i * step_s)).isoformat(), **extra}
            for i in range(n)]


def run_once(env: ServiceRun, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return env.run("run", "--once", timeout_s=timeout_s)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout_s)


# -- baseline with hostile pages --------------------------------------------------------------
def test_hostile_pages_every_event_once(gitlab: StandIn, broker: Broker, own_redis: OwnRedis,
                                        service_env: ServiceRun) -> None:
    """Same created_at, unicode, nulls, missing optional fields, user-only events, and a
    fault of every kind on the event lists: each event exactly once, in one --once round."""
    own_redis.start()
    topic = f"out-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    same = (now - timedelta(hours=3)).isoformat()
    gitlab.add(*spread(150, 5, 4, now - timedelta(hours=20), 400))
    gitlab.add(*[{"project_id": 2, "author_id": 101, "created_at": same,
                  "target_title": "€ 名前 \u2028 \"quoted\" \\ 🚀"} for _ in range(45)])
    gitlab.add(*[{"project_id": None, "author_id": 102, "action_name": "joined"}
                 for _ in range(5)])
    gitlab.add({"project_id": 3, "author_id": 103, "extra": {"author": None, "title": None,
                                                              "push_data": None}})
    for kind in ("429", "500", "html", "truncated", "drop", "html200", "notjson_object"):
        gitlab.fault(r"/projects/\d+/events", kind)
        gitlab.fault(r"/users/\d+/events", kind)
    gitlab.fault(r"/projects\?", "500")
    gitlab.fault(r"/users\?", "html")
    gitlab.fault(r"/projects/2/events.*[?&]page=2", "slow", seconds=2)
    configure(service_env, gitlab, broker.bootstrap, own_redis.address, topic)
    first = run_once(service_env)
    assert first.returncode == 0, first.stderr[-3000:]
    truth = gitlab.truth()
    assert_exactly_once(delivered(broker.bootstrap, topic, len(truth)), truth)
    again = run_once(service_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_exactly_once(delivered(broker.bootstrap, topic, len(truth)), truth)


# -- live activity with faults ----------------------------------------------------------------
class Feeder:
    """Adds events live (``per_tick`` every 0.2 s) from a thread until stopped."""

    def __init__(self, gl: StandIn, projects: int = 12, users: int = 6, per_tick: int = 3
                 ) -> None:
        import threading

        self.gl, self.projects, self.users, self.per_tick = gl, projects, users, per_tick
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.n = 0

    def _run(self) -> None:
        while not self.done.wait(0.2):
            specs = []
            for _ in range(self.per_tick):
                self.n += 1
                specs.append({"project_id": None if self.n % 17 == 0 else
                              1 + self.n % self.projects,
                              "author_id": 100 + self.n % self.users})
            with contextlib.suppress(httpx.HTTPError):
                self.gl.add(*specs)

    def __enter__(self) -> Feeder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(10)


def metric(env: ServiceRun, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{env.env['METRICS_PORT']}/metrics", timeout=5).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def produced(env: ServiceRun) -> float:
    try:
        return metric(env, "gitlab_producer_events_produced_total")
    except httpx.HTTPError:
        return 0.0


def settle(env: ServiceRun, gl: StandIn, bootstrap: str, topic: str, timeout_s: float = 90
           ) -> Counter[int]:
    """Wait (bounded) until every event of the truth was delivered, then read the topic."""
    truth = gl.truth()

    def complete() -> bool:
        return len(set(delivered(bootstrap, topic, 0, timeout_s=5))) >= len(truth)

    wait_until(complete, timeout_s, "every event delivered", interval_s=2)
    return delivered(bootstrap, topic, len(truth))


def a_long_round(gitlab: StandIn, broker: Broker, own_redis: OwnRedis, service_env: ServiceRun,
                 projects: int = 12, users: int = 6, rate: int = 15) -> str:
    """A persistent Redis and the service configured to read 1,500 events through slow event
    pages at ``rate`` requests/s: a round long enough to be cut in the middle. Returns the
    topic."""
    own_redis.persistent = True
    own_redis.start()
    topic = f"out-{uuid.uuid4().hex[:8]}"
    gitlab.add(*spread(1500, projects, users, datetime.now(UTC) - timedelta(hours=10), 20))
    gitlab.fault(r"/events", "slow", times=10_000, seconds=0.05)
    configure(service_env, gitlab, broker.bootstrap, own_redis.address, topic,
              OPERATIONS_PER_SECOND=str(rate))
    return topic


def start_a_long_round(gitlab: StandIn, broker: Broker, own_redis: OwnRedis,
                       service_env: ServiceRun) -> tuple[str, subprocess.Popen[bytes]]:
    """:func:`a_long_round` and the service reading it. Returns (topic, process)."""
    topic = a_long_round(gitlab, broker, own_redis, service_env)
    return topic, service_env.start("run")


def test_redis_killed_mid_round_and_restarted(gitlab: StandIn, broker: Broker,
                                              own_redis: OwnRedis, service_env: ServiceRun
                                              ) -> None:
    """A persistent Redis killed -9 while a round delivers, restarted 3 s later: nothing
    missing, nothing doubled."""
    topic, proc = start_a_long_round(gitlab, broker, own_redis, service_env)
    try:
        with Feeder(gitlab):
            wait_until(lambda: produced(service_env) > 200, 60, "a round delivering")
            own_redis.kill()
            time.sleep(3)  # the outage itself
            own_redis.start()
            wait_until(lambda: produced(service_env) > 1700, 120, "delivery resumed")
        counts = settle(service_env, gitlab, broker.bootstrap, topic)
    finally:
        rc = stop(proc)
    assert rc == 0, service_env.all_logs()[-3000:]
    assert_exactly_once(counts, gitlab.truth())


def test_service_killed_mid_round_and_restarted(gitlab: StandIn, broker: Broker,
                                                own_redis: OwnRedis, service_env: ServiceRun
                                                ) -> None:
    """The service killed -9 while a round delivers, started again: nothing missing; what
    repeats is at most what was in flight (a page per reader)."""
    topic, proc = start_a_long_round(gitlab, broker, own_redis, service_env)
    try:
        with Feeder(gitlab):
            wait_until(lambda: produced(service_env) > 300, 60, "a round delivering")
            proc.kill()
            proc.wait(10)
            proc = service_env.start("run")
            wait_until(lambda: produced(service_env) > 1300, 120, "delivery resumed")
        counts = settle(service_env, gitlab, broker.bootstrap, topic)
    finally:
        rc = stop(proc)
    assert rc == 0, service_env.all_logs()[-3000:]
    truth = gitlab.truth()
    assert not truth - set(counts), f"missing {sorted(truth - set(counts))[:10]}"
    doubled = sum(n - 1 for n in counts.values())
    # 8 project readers + 8 user readers, a page of 20 each in flight at most
    assert doubled <= 16 * 20, f"{doubled} repeats"
    print(f"repeats after kill -9: {doubled}")


def test_broker_restarted_memory_only(gitlab: StandIn, own_broker: OwnBroker,
                                      own_redis: OwnRedis, service_env: ServiceRun) -> None:
    """The broker (memory only) killed and started again on its address: it lost the topic.
    Every event that arrives after the restart must still reach it, once."""
    own_redis.persistent = True
    own_redis.start()
    topic = f"out-{uuid.uuid4().hex[:8]}"
    gitlab.add(*spread(200, 6, 3, datetime.now(UTC) - timedelta(hours=5), 30))
    configure(service_env, gitlab, own_broker.bootstrap, own_redis.address, topic,
              KAFKA_DELIVERY_TIMEOUT="30")
    proc = service_env.start("run")
    try:
        wait_until(lambda: produced(service_env) >= 200, 60, "the first events delivered")
        own_broker.kill()
        after = set(gitlab.add(*[{"project_id": 1 + i % 6, "author_id": 100 + i % 3}
                                 for i in range(30)]))
        time.sleep(4)
        own_broker.start()
        after |= set(gitlab.add(*[{"project_id": 1 + i % 6, "author_id": 100 + i % 3}
                                  for i in range(30)]))

        def arrived() -> bool:
            return after <= set(delivered(own_broker.bootstrap, topic, 0, timeout_s=5))

        wait_until(arrived, 120, "the events after the broker restart", interval_s=2)
        counts = delivered(own_broker.bootstrap, topic, len(after))
    finally:
        rc = stop(proc)
    assert rc == 0, service_env.all_logs()[-3000:]
    doubled = {i: n for i, n in counts.items() if n > 1 and i in after}
    assert not doubled, doubled


def midnight_shift(offset_h: float, seconds_before: float) -> float:
    """A (negative) clock shift that puts a GitLab at UTC``offset_h`` ``seconds_before`` its
    next local midnight."""
    now = datetime.now(UTC)
    local = now + timedelta(hours=offset_h)
    target = local.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(
        seconds=seconds_before)
    if target > local:
        target -= timedelta(days=1)
    return (target - local).total_seconds()


@pytest.mark.parametrize("offset", ["+14:00", "-12:00"])
def test_events_across_gitlab_midnight_in_its_zone(tmp_path: Path, broker: Broker,
                                                   own_redis: OwnRedis,
                                                   service_env: ServiceRun,
                                                   offset: str) -> None:
    """GitLab in a zone far from UTC (its date differs from UTC's for hours; UTC-08:00 is
    tests/integration/test_time.py's), its clock (moved back with faketime) 20 s before its
    local midnight, events arriving across it, the default SYNC_SINCE: each event once."""
    own_redis.start()
    hours = int(offset[:3])
    shift = midnight_shift(hours, 20)
    topic = f"out-{uuid.uuid4().hex[:8]}"
    with standin(tmp_path / "standin.log", offset, clock_shift_s=shift) as gl:
        configure(service_env, gl, broker.bootstrap, own_redis.address, topic,
                  SCHEDULING_POLL_INTERVAL="2")
        del service_env.env["SYNC_SINCE"]
        proc = service_env.start("run")
        try:
            with Feeder(gl, projects=4, users=3, per_tick=1):
                wait_until(lambda: sum(e["created_at"][11:13] == "00"
                                       for e in gl.ctl("events")) >= 40, 90,
                           "40 events after GitLab's midnight", interval_s=1)
            counts = settle(service_env, gl, broker.bootstrap, topic)
        finally:
            rc = stop(proc)
        assert rc == 0, service_env.all_logs()[-3000:]
        events = gl.ctl("events")
        assert sum(e["created_at"][11:13] == "23" for e in events) >= 40
        assert sum(e["created_at"][11:13] == "00" for e in events) >= 40
        assert_exactly_once(counts, gl.truth())


LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="Debian's faketime is not installed")
def test_host_clock_stepped_back_during_a_read_loses_nothing(gitlab: StandIn,
                                                             service_env: ServiceRun,
                                                             tmp_path: Path) -> None:
    """The service host's clock stepped back 15 minutes (NTP, a resumed VM) while a project's
    events are read: the events created during that read must still arrive, and polling
    goes on at its interval. The project was last active 57 minutes ago, so GitLab does not
    move its ``last_activity_at`` for them: a cursor saved 15 minutes in GitLab's future
    made the project look settled (and out of the listing window) for good. (The file sink
    and the SQLite store: libfaketime stalls librdkafka.)"""
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    now = datetime.now(UTC)
    gitlab.add(*[{"project_id": 1, "author_id": 100,
                  "created_at": (now - timedelta(minutes=57, seconds=-i)).isoformat()}
                 for i in range(50)])
    gitlab.fault(r"/projects/1/events.*[?&]page=2", "slow", seconds=4)
    configure(service_env, gitlab, "", "", "unused", SYNC_USERS="false",
              SCHEDULING_POLL_INTERVAL="1")
    service_env.env.update({"LD_PRELOAD": str(LIBFAKETIME),
                            "FAKETIME_TIMESTAMP_FILE": str(clock), "FAKETIME_NO_CACHE": "1",
                            "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
    proc = service_env.start("run")
    try:
        wait_until(lambda: gitlab.ctl("stats")["faults_left"] == 0, 30,
                   "the read of project 1 at its second page")
        clock.write_text("-900\n")
        during = set(gitlab.add(*[{"project_id": 1, "author_id": 100} for _ in range(5)]))
        out = Path(service_env.env["OUTPUT_FILE"])

        def ids() -> set[int]:
            if not out.exists():
                return set()
            return {json.loads(line)["value"]["id"] for line in out.read_bytes().splitlines()}

        wait_until(lambda: len(ids()) >= 50, 30, "the first read delivered")
        rounds = service_env.all_logs().count('"round_finished"')
        wait_until(lambda: service_env.all_logs().count('"round_finished"') >= rounds + 4, 60,
                   "four more rounds")
        missing = during - ids()
    finally:
        rc = stop(proc)
    assert rc == 0
    assert not missing, f"lost {sorted(missing)} (created while the host clock stepped back)"


def test_event_list_changing_while_it_is_read(gitlab: StandIn, broker: Broker,
                                              own_redis: OwnRedis, service_env: ServiceRun
                                              ) -> None:
    """New events arrive between the pages of one read (offset pages shift: a page repeats
    the end of the one before), and some events are hidden by GitLab's visibility filter
    after paging (short pages with a next one): every visible event once."""
    own_redis.start()
    topic = f"out-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    ids = gitlab.add(*[{"project_id": 1, "author_id": 100 + i % 3,
                        "created_at": (now - timedelta(hours=2, seconds=-i)).isoformat()}
                       for i in range(130)])
    gitlab.ctl("insert_on_read", {"path": r"/projects/1/events", "page": 3,
                                  "events": [{"project_id": 1, "author_id": 101}] * 30})
    gitlab.ctl("insert_on_read", {"path": r"/users/100/events", "page": 2,
                                  "events": [{"project_id": None, "author_id": 100}] * 25})
    hidden = set(ids[5:40])
    gitlab.ctl("hidden", {"ids": sorted(hidden)})
    configure(service_env, gitlab, broker.bootstrap, own_redis.address, topic)
    for _ in range(2):
        done = run_once(service_env)
        assert done.returncode == 0, done.stderr[-3000:]
    truth = gitlab.truth() - hidden
    assert len(truth) == 130 + 30 + 25 - len(hidden)
    assert_exactly_once(delivered(broker.bootstrap, topic, len(truth)), truth)


def test_two_instances_one_killed_mid_round(gitlab: StandIn, broker: Broker,
                                            own_redis: OwnRedis, service_env: ServiceRun
                                            ) -> None:
    """Two instances on one Redis, live activity, one killed -9 mid-round and started
    again, Redis killed and restarted meanwhile: nothing missing, repeats at most what was in
    flight."""
    topic = a_long_round(gitlab, broker, own_redis, service_env, projects=30, users=8, rate=20)
    second_env = {"METRICS_PORT": str(free_port()), "LOG_PORT": str(free_port())}
    first = service_env.start("run")
    second = service_env.start("run", **second_env)
    try:
        with Feeder(gitlab, projects=30, users=8):
            wait_until(lambda: produced(service_env) > 150, 90, "a round delivering")
            first.kill()
            first.wait(10)
            first = service_env.start("run")
            health = f"http://127.0.0.1:{service_env.env['METRICS_PORT']}/healthz"
            wait_until(lambda: httpx.get(health, timeout=2).status_code == 200, 30,
                       "the restarted instance serving", ignore=(httpx.HTTPError,))
            own_redis.kill()
            time.sleep(2)  # the outage itself
            own_redis.start()
            before = produced(service_env)
            wait_until(lambda: produced(service_env) > before + 100, 90,
                       "delivery resumed after Redis came back")
        counts = settle(service_env, gitlab, broker.bootstrap, topic, timeout_s=150)
    finally:
        rcs = [stop(first), stop(second)]
    assert rcs == [0, 0], service_env.all_logs()[-3000:]
    truth = gitlab.truth()
    assert not truth - set(counts), f"missing {sorted(truth - set(counts))[:10]}"
    doubled = sum(n - 1 for n in counts.values())
    assert doubled <= 16 * 20, f"{doubled} repeats"
    print(f"repeats with two instances, one killed: {doubled}")
