"""The shared request budget held by real service processes (issue 15): three ``run``
instances on a Redis of their own, with more work than the budget allows, never exceed
``OPERATIONS_PER_SECOND`` in any one-second window, and use at least 95% of it."""

from __future__ import annotations

import subprocess
import time

import orjson
import pytest
import redis

from gitlab_producer.simulator.server import running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import TEST_REDIS_DB, OwnRedis, ServiceRun
from tests.integration.test_delivery import stats
from tests.scaleout.test_instances import start_instances, stop_all, stopper

pytestmark = pytest.mark.integration
__all__ = ["stopper"]  # the fixture, imported for this module's tests

RATE = 20
# Each instance's first round needs far more than the test's 14 s of budget: 400 projects'
# event lists besides the listings, read by three instances that each do the whole round.
SPEC = WorldSpec(projects=400, users=40, events=8000, history_days=2.0, seed=41)
RAMP_S, TAIL_S, STEADY_S = 3, 1, 10  # seconds left out at the start and the end; measured


def test_three_processes_hold_the_limit_and_use_it(
        service_env: ServiceRun, own_redis: OwnRedis,
        stopper: list[subprocess.Popen[bytes]]) -> None:
    own_redis.start()
    with running_simulator(SPEC) as sim:
        service_env.env.update({
            "GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
            "SYNC_SINCE": "2000-01-01T00:00:00+00:00", "REDIS_ADDRESS": own_redis.address,
            "REDIS_KEY_PREFIX": "budget-test:", "OPERATIONS_PER_SECOND": str(RATE),
            "SHUTDOWN_GRACE": "1"})  # stopped mid-round, which is not under test here
        for index in range(3):  # each writes its own file: only the requests matter here
            stopper += start_instances(service_env, 1,
                                       OUTPUT_FILE=str(service_env.cwd / f"out-{index}.jsonl"))
        deadline = time.monotonic() + 60
        while not stats(sim.url)["per_second"]:
            assert time.monotonic() < deadline, service_env.all_logs()[-3000:]
            assert all(p.poll() is None for p in stopper), service_env.all_logs()[-3000:]
            time.sleep(0.2)
        time.sleep(RAMP_S + STEADY_S + TAIL_S + 1)
        served = stats(sim.url)
        assert all(p.poll() is None for p in stopper), service_env.all_logs()[-3000:]
        assert stop_all(stopper) == [0, 0, 0], service_env.all_logs()[-3000:]
        reports = redis.Redis(port=own_redis.port, db=TEST_REDIS_DB).hgetall(
            "budget-test:instances")
    # Seconds as GitLab's throttle counts them: by the request's arrival.
    arrivals: dict[str, int] = served["arrivals_per_second"]  # type: ignore[assignment]
    per_second = {int(s): n for s, n in arrivals.items()}
    first = min(per_second)
    steady = [per_second.get(s, 0) for s in range(first + RAMP_S, first + RAMP_S + STEADY_S)]
    # GitLab's windows: calendar seconds, by arrival.
    assert int(str(served["max_arrivals_per_second"])) <= RATE, per_second
    # Any one second (an outside tester's sliding window), with two arrivals of slack: the
    # simulator's thread shares the 2 cores with the three instances, and on the loaded test
    # machine it read a request now and then 30-50 ms after it was written (its loop stalled
    # with nothing to run), next to the following ones: each such reading puts one arrival
    # over the limit by one. Measured at load average 9-11: 0-2 such arrivals in 4 runs of 5
    # (the fifth: 2, one of them by two); the budget's own guard off, 4-21 in 3 runs of 4; no
    # margin, ~145.
    crowded: dict[str, int] = served["in_last_second_at_arrival"]  # type: ignore[assignment]
    over = {int(n): count for n, count in crowded.items() if int(n) > RATE}
    assert max(over, default=RATE) <= RATE + 1 and sum(over.values()) <= 2, over
    assert sum(steady) / len(steady) >= 0.95 * RATE, steady
    # ... and leaves slack for jitter: exactly the limit in every second (no margin) lets a
    # request late by a millisecond the 21st of a second (measured without the margin: a
    # calendar second of 21 in 1 run of 3; 200 requests in these 10 s in every run).
    assert sum(steady) <= 0.99 * RATE * len(steady), steady
    reserved = [orjson.loads(r)["requests_reserved"] for r in reports.values()]
    assert len(reserved) == 3 and min(reserved) > 0, reserved  # all three took part
