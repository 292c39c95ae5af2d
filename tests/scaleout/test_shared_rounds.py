"""The polling rounds shared by three real service processes on one Redis, as SAQ jobs
(issue 15): each round is discovered once, its entity jobs are spread over the instances, and
a round is complete only when all its jobs are done, even when an instance is killed."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from gitlab_producer.simulator.server import free_port, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from gitlab_producer.sync.shared_rounds import JOB_HEARTBEAT_S
from tests.conftest import TEST_REDIS_DB, Broker, ServiceRun, consume
from tests.integration.test_delivery import configure, event_ids, stats, truth_ids
from tests.scaleout.test_instances import (
    instances_status,
    start_instances,
    stop_all,
    stopper,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.integration


def rounds_of(redis_address: str, prefix: str) -> dict[int, dict[str, str]]:
    """Every shared round Redis holds: number -> its hash."""
    host, _, port = redis_address.rpartition(":")
    client = redis.Redis(host=host, port=int(port), db=TEST_REDIS_DB, decode_responses=True)
    try:
        latest = int(client.hget(f"{prefix}rounds", "number") or 0)
        found = {n: client.hgetall(f"{prefix}round:{n}") for n in range(1, latest + 1)}
        return {n: fields for n, fields in found.items() if fields}
    finally:
        client.close()


def wait_for_rounds(redis_address: str, prefix: str,
                    check: Callable[[dict[int, dict[str, str]]], bool], alive: Callable[[], None],
                    timeout_s: float = 60.0) -> dict[int, dict[str, str]]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = rounds_of(redis_address, prefix)
        if check(found):
            return found
        alive()
        assert time.monotonic() < deadline, found
        time.sleep(0.2)


def complete_ok_after(number: int) -> Callable[[dict[int, dict[str, str]]], bool]:
    """A round later than ``number`` completed and succeeded."""
    return lambda found: any(n > number and r.get("phase") == "complete" and r.get("ok") == "1"
                             for n, r in found.items())


def jobs(report: dict[str, Any], kind: str) -> int:
    return int(report["round_jobs"][kind])


def test_three_instances_with_a_worker_share_each_round_and_deliver_every_event_once(
        service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str,
        stopper: list[subprocess.Popen[bytes]]) -> None:  # noqa: F811
    spec = WorldSpec(projects=30, users=10, events=800, history_days=1.0, seed=41)
    with running_simulator(spec, live_rate=15.0) as sim:
        topic = configure(service_env, sim.url, sim.sim.world.start_ms, broker, redis_address,
                          redis_prefix)
        # Five jobs at once per instance: a round of ten or more entities needs more than one.
        service_env.env.update({"OPERATIONS_PER_SECOND": "100", "GITLAB_CONCURRENCY": "2"})
        stopper += start_instances(service_env, 2)
        # The third instance is a `worker` process: it takes round jobs, never opens a round.
        stopper.append(service_env.start("worker", METRICS_PORT=str(free_port()),
                                         LOG_PORT=str(free_port())))

        def alive() -> None:
            assert all(p.poll() is None for p in stopper), service_env.all_logs()[-3000:]

        initial = len(truth_ids(sim.url))
        wait_for_rounds(redis_address, redis_prefix, complete_ok_after(2), alive)
        deadline = time.monotonic() + 30
        while len(truth_ids(sim.url)) < initial + 60:  # live events during some rounds
            assert time.monotonic() < deadline
            time.sleep(0.5)
        httpx.post(f"{sim.url}/_simulator/settings", json={"live_rate": 0}, timeout=10)
        quiet = max(rounds_of(redis_address, redis_prefix))  # open or complete: before quiet
        wait_for_rounds(redis_address, redis_prefix, complete_ok_after(quiet), alive)
        expected = truth_ids(sim.url)
        got = event_ids(consume(broker.bootstrap, topic, len(expected), timeout_s=60,
                                settle_s=2.0))
        assert stop_all(stopper) == [0, 0, 0], service_env.all_logs()[-3000:]
    assert set(got) == expected
    assert max(got.values()) == 1, [i for i, n in got.items() if n > 1][:10]
    found = rounds_of(redis_address, redis_prefix)
    status = instances_status(service_env)
    reports = status["instances"]
    assert status["round"]["number"] == max(found)  # `instances` shows the latest round
    # Each round was discovered once, whichever instance did it (the last one's discovery may
    # have been cut by the stop); the reads were shared.
    assert len(found) - 1 <= sum(jobs(r, "discover") for r in reports) <= len(found)
    assert len(reports) == 3
    assert all(jobs(r, "project") + jobs(r, "user") > 0 for r in reports), reports
    finished = [r for r in found.values() if r["phase"] == "complete"]
    assert len(finished) >= len(found) - 1  # at most the last was cut by the stop


def test_kill_9_mid_round_its_jobs_are_taken_over_and_the_round_completes(
        service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str,
        stopper: list[subprocess.Popen[bytes]]) -> None:  # noqa: F811
    spec = WorldSpec(projects=60, users=15, events=5000, history_days=2.0, seed=43)
    with running_simulator(spec, live_rate=5.0) as sim:
        topic = configure(service_env, sim.url, sim.sim.world.start_ms, broker, redis_address,
                          redis_prefix)
        # A first round of some seconds, so that the victim holds running jobs at the kill.
        service_env.env.update({"OPERATIONS_PER_SECOND": "60", "SCHEDULING_POLL_INTERVAL": "2"})
        stopper += start_instances(service_env, 3)
        victim, *survivors = stopper
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and int(str(stats(sim.url)["total"])) < 120:
            time.sleep(0.1)
        first = rounds_of(redis_address, redis_prefix)
        assert first.get(1, {}).get("phase") == "open", first  # mid-round
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.time()

        def alive() -> None:
            assert all(p.poll() is None for p in survivors), service_env.all_logs()[-3000:]

        # The round open at the kill completes without the victim, and succeeds.
        wait_for_rounds(redis_address, redis_prefix,
                        lambda found: found[1].get("phase") == "complete", alive)
        httpx.post(f"{sim.url}/_simulator/settings", json={"live_rate": 0}, timeout=10)
        quiet = max(rounds_of(redis_address, redis_prefix))
        wait_for_rounds(redis_address, redis_prefix, complete_ok_after(quiet), alive)
        expected = truth_ids(sim.url)
        got = event_ids(consume(broker.bootstrap, topic, len(expected), timeout_s=60,
                                settle_s=2.0))
        # The victim ages out of the alive ones (its heartbeat stopped at the kill), however
        # quickly its jobs were taken over.
        reports = instances_status(service_env)["instances"]
        aged_out_by = time.monotonic() + 30
        while sum(1 for r in reports if r["alive"]) != 2 and time.monotonic() < aged_out_by:
            time.sleep(0.5)
            reports = instances_status(service_env)["instances"]
        assert stop_all(survivors) == [0, 0], service_env.all_logs()[-3000:]
    assert rounds_of(redis_address, redis_prefix)[1]["ok"] == "1"
    assert set(got) == expected
    # Only pages in flight at the kill may repeat (claims hold the rest): a page per reader.
    repeated = sum(n - 1 for n in got.values())
    assert repeated <= 17 * 100, repeated
    alive_reports = [r for r in reports if r["alive"]]
    assert len(alive_reports) == 2
    assert sum(r["round_jobs_taken_over"] for r in alive_reports) > 0, alive_reports
    # Within a heartbeat plus a sweep (and some slack for a loaded machine).
    taken = takeovers(service_env.logs[1:])
    assert taken and max(taken) - killed_at <= JOB_HEARTBEAT_S + 5 + 10, \
        [round(t - killed_at, 1) for t in taken]


def takeovers(logs: list[Path]) -> list[float]:
    """When the instances writing ``logs`` took over round jobs (Unix time)."""
    found = []
    for log in logs:
        for line in log.read_bytes().splitlines():
            if b"round_job_taken_over" in line:
                stamp = orjson.loads(line)["timestamp"].replace("Z", "+00:00")
                found.append(datetime.fromisoformat(stamp).timestamp())
    return found
