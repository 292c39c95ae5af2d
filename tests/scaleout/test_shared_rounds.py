"""The polling rounds shared by three real service processes on one Redis, as SAQ jobs
(issue 15): each round is discovered once, its entity jobs are spread over the instances, and
a round is complete only when all its jobs are done, even when an instance is killed."""

from __future__ import annotations

import math
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from gitlab_producer.objects.engine import RETRY_BASE_S, SWEEP_ABORT_WAIT_S
from gitlab_producer.simulator.server import free_port, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from gitlab_producer.sync.shared_rounds import JOB_HEARTBEAT_S
from tests.conftest import TEST_REDIS_DB, Broker, ServiceRun, consume
from tests.integration.test_delivery import configure, event_ids, truth_ids
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


def open_jobs(redis_address: str, prefix: str) -> dict[str, dict[str, Any]]:
    """The open jobs of the latest round with SAQ's record of each (for a failure's message):
    status, attempts, worker, seconds since its last heartbeat."""
    host, _, port = redis_address.rpartition(":")
    client = redis.Redis(host=host, port=int(port), db=TEST_REDIS_DB)
    try:
        latest = int(client.hget(f"{prefix}rounds", "number") or 0)
        keys = sorted(k.decode() for k in client.smembers(f"{prefix}round:{latest}:open"))
        raws = client.mget([f"saq:job:{prefix}rounds:{prefix}{k}" for k in keys]) if keys else []
        now_ms = time.time() * 1000
    finally:
        client.close()
    found = {}
    for key, raw in zip(keys, raws, strict=True):
        job = orjson.loads(raw) if raw else {}
        found[key] = {name: job.get(name) for name in ("status", "attempts", "worker_id",
                                                        "error")}
        if job.get("touched"):
            found[key]["touched_s_ago"] = round((now_ms - job["touched"]) / 1000, 1)
    return found


def wait_for_rounds(redis_address: str, prefix: str,
                    check: Callable[[dict[int, dict[str, str]]], bool], alive: Callable[[], None],
                    timeout_s: float = 60.0) -> dict[int, dict[str, str]]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = rounds_of(redis_address, prefix)
        if check(found):
            return found
        alive()
        assert time.monotonic() < deadline, (found, open_jobs(redis_address, prefix))
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


def running_jobs(redis_address: str, prefix: str) -> list[dict[str, Any]]:
    """The round jobs SAQ records as running, from its own keys: each with its ``key`` (the
    store's prefix and the round's job key) and the ``worker_id`` running it. A killed
    worker's jobs stay recorded so until a sweep finds their heartbeat stale."""
    host, _, port = redis_address.rpartition(":")
    client = redis.Redis(host=host, port=int(port), db=TEST_REDIS_DB)
    try:
        ids = client.lrange(f"saq:{prefix}rounds:active", 0, -1)
        found = [orjson.loads(raw) for raw in client.mget(ids) if raw] if ids else []
    finally:
        client.close()
    return [job for job in found if job.get("status") == "active"]


def done_jobs(redis_address: str, prefix: str, number: int) -> set[str]:
    """The keys of the jobs of round ``number`` recorded as done."""
    host, _, port = redis_address.rpartition(":")
    client = redis.Redis(host=host, port=int(port), db=TEST_REDIS_DB, decode_responses=True)
    try:
        return set(client.smembers(f"{prefix}round:{number}:done"))
    finally:
        client.close()


def log_events(log: Path, event: str) -> list[dict[str, Any]]:
    """The lines of a service's log with ``event`` (a line being written is left out)."""
    found = []
    for line in log.read_bytes().splitlines():
        if event.encode() in line:
            try:
                found.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return found


def serving_workers(logs: list[Path]) -> dict[str, int]:
    """SAQ's worker id -> the index of the instance (its log) serving round jobs with it."""
    return {str(line["worker"]): index for index, log in enumerate(logs)
            for line in log_events(log, "shared_rounds_serving")}


def test_kill_9_mid_round_its_jobs_are_taken_over_and_the_round_completes(
        service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str,
        stopper: list[subprocess.Popen[bytes]]) -> None:  # noqa: F811
    spec = WorldSpec(projects=60, users=15, events=5000, history_days=2.0, seed=43)
    with running_simulator(spec, live_rate=5.0) as sim:
        topic = configure(service_env, sim.url, sim.sim.world.start_ms, broker, redis_address,
                          redis_prefix)
        # A first round of some seconds, so that its jobs run a while.
        service_env.env.update({"OPERATIONS_PER_SECOND": "20", "SCHEDULING_POLL_INTERVAL": "2"})
        stopper += start_instances(service_env, 3)
        logs = list(service_env.logs)

        def all_alive(procs: list[subprocess.Popen[bytes]]) -> None:
            assert all(p.poll() is None for p in procs), service_env.all_logs()[-3000:]

        # The victim is whichever instance runs the most jobs once all three serve: an
        # instance started late may hold none (then its death costs the round nothing).
        deadline = time.monotonic() + 60
        while True:
            workers = serving_workers(logs)
            running = running_jobs(redis_address, redis_prefix) if len(workers) == 3 else []
            held = Counter(workers[j["worker_id"]] for j in running if j["worker_id"] in workers)
            if held:
                break
            all_alive(stopper)
            assert time.monotonic() < deadline, (workers, running)
            time.sleep(0.05)
        index = held.most_common(1)[0][0]
        victim = stopper[index]
        victim.send_signal(signal.SIGKILL)
        killed_at = time.time()
        victim.wait(10)
        survivors = [p for i, p in enumerate(stopper) if i != index]
        survivor_logs = [log for i, log in enumerate(logs) if i != index]
        # What it held at the kill, less what it had recorded done just before: nothing but a
        # takeover finishes those jobs. One round is open at a time: they are all of it.
        worker = next(w for w, i in workers.items() if i == index)
        held_keys = {str(j["key"]).removeprefix(redis_prefix)
                     for j in running_jobs(redis_address, redis_prefix)
                     if j["worker_id"] == worker}
        assert held_keys, "the victim finished its jobs in the moment before the kill"
        number = int(next(iter(held_keys)).split(":")[1])
        orphaned = held_keys - done_jobs(redis_address, redis_prefix, number)
        assert orphaned, held_keys

        # The round open at the kill completes without the victim, and succeeds.
        wait_for_rounds(redis_address, redis_prefix,
                        lambda found: found[number].get("phase") == "complete",
                        lambda: all_alive(survivors))
        httpx.post(f"{sim.url}/_simulator/settings", json={"live_rate": 0}, timeout=10)
        quiet = max(rounds_of(redis_address, redis_prefix))
        wait_for_rounds(redis_address, redis_prefix, complete_ok_after(quiet),
                        lambda: all_alive(survivors))
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
        # Their last reports, written at the stop, count everything they did.
        final = instances_status(service_env)["instances"]
    assert rounds_of(redis_address, redis_prefix)[number]["ok"] == "1"
    assert set(got) == expected
    # Only pages in flight at the kill may repeat (claims hold the rest): a page per reader.
    repeated = sum(n - 1 for n in got.values())
    assert repeated <= 17 * 100, repeated
    assert len([r for r in reports if r["alive"]]) == 2, reports
    # Every job the victim left unfinished was taken over by a survivor, within a heartbeat
    # plus a sweep, which hands the stuck jobs back one after the other, each after waiting
    # SWEEP_ABORT_WAIT_S for an abort, then the retry's delay (and some slack for a loaded
    # machine: at a load average of 15 the 17th job of a sweep came back after 27.1 s).
    taken = takeovers(survivor_logs)
    assert orphaned <= set(taken), (sorted(orphaned), sorted(taken))
    bound = (JOB_HEARTBEAT_S + JOB_HEARTBEAT_S // 2 + len(held_keys) * SWEEP_ABORT_WAIT_S
             + 2 * RETRY_BASE_S + 10)
    late = {k: round(taken[k] - killed_at, 1) for k in orphaned if taken[k] - killed_at > bound}
    assert not late, (late, bound)
    survived = [r for r in final if r.get("stopped")]  # the victim never said it stopped
    assert len(survived) == 2, final
    assert sum(r["round_jobs_taken_over"] for r in survived) >= len(orphaned), survived


def takeovers(logs: list[Path]) -> dict[str, float]:
    """The round jobs the instances writing ``logs`` took over: key -> when first (Unix
    time)."""
    found: dict[str, float] = {}
    for log in logs:
        for line in log_events(log, "round_job_taken_over"):
            stamp = datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00"))
            key = str(line["key"])
            found[key] = min(found.get(key, math.inf), stamp.timestamp())
    return found
