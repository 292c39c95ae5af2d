"""The shared request budget held by real service processes (issue 15): three ``run``
instances on a Redis of their own, with more work than the budget allows, are handed no more
than ``OPERATIONS_PER_SECOND`` slots in any second, send no request before its slot, and use at
least 95% of the budget; the simulator sees no more than the limit in any one second, calendar
or sliding."""

from __future__ import annotations

import subprocess
import time

import orjson
import pytest
import redis

from tests.conftest import TEST_REDIS_DB, OwnRedis, ServiceRun, simulator_process
from tests.integration.test_delivery import stats
from tests.scaleout.budget_checks import assert_sent_within_the_budget, slots_per_second
from tests.scaleout.test_instances import start_instances, stop_all, stopper

pytestmark = pytest.mark.integration
__all__ = ["stopper"]  # the fixture, imported for this module's tests

RATE = 20
# The first round needs far more than the test's 14 s of budget: 400 projects' event lists
# besides the listings, shared by the three instances.
SIM_ARGS = ("--projects", "400", "--users", "40", "--events", "8000", "--history-days", "2",
            "--seed", "41")
RAMP_S, TAIL_S, STEADY_S = 3, 1, 10  # seconds left out at the start and the end; measured
PREFIX = "budget-test:"


def test_three_processes_hold_the_limit_and_use_it(
        service_env: ServiceRun, own_redis: OwnRedis,
        stopper: list[subprocess.Popen[bytes]]) -> None:
    own_redis.start()
    # The simulator in a process of its own: in this one, the test's own work would delay
    # its reading of the requests (their arrival times) and bunch them.
    with simulator_process(service_env.cwd / "sim.log", *SIM_ARGS) as sim:
        service_env.env.update({
            "GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
            "SYNC_SINCE": "2000-01-01T00:00:00+00:00", "REDIS_ADDRESS": own_redis.address,
            "REDIS_KEY_PREFIX": PREFIX, "OPERATIONS_PER_SECOND": str(RATE),
            "SHUTDOWN_GRACE": "1"})  # stopped mid-round, which is not under test here
        for index in range(3):  # each writes its own file: only the requests matter here
            stopper += start_instances(service_env, 1,
                                       OUTPUT_FILE=str(service_env.cwd / f"out-{index}.jsonl"))

        def arrivals() -> dict[int, int]:
            assert all(p.poll() is None for p in stopper), service_env.all_logs()[-3000:]
            found: dict[str, int] = stats(sim.url)["arrivals_per_second"]  # type: ignore[assignment]
            return {int(s): n for s, n in found.items()}

        # Until the seconds measured are over (the first one counts from the first arrival).
        deadline = time.monotonic() + 90
        while not (seen := arrivals()) or max(seen) <= min(seen) + RAMP_S + STEADY_S + TAIL_S:
            assert time.monotonic() < deadline, (seen, service_env.all_logs()[-3000:])
            time.sleep(0.2)
        assert stop_all(stopper) == [0, 0, 0], service_env.all_logs()[-3000:]
        served = stats(sim.url)
        client = redis.Redis(port=own_redis.port, db=TEST_REDIS_DB)
        reports = client.hgetall(f"{PREFIX}instances")
        slots = slots_per_second(client, PREFIX)
    # Seconds as GitLab's throttle counts them: by the request's arrival.
    arrived: dict[str, int] = served["arrivals_per_second"]  # type: ignore[assignment]
    per_second = {int(s): n for s, n in arrived.items()}
    first = min(per_second)
    window = range(first + RAMP_S, first + RAMP_S + STEADY_S)
    # GitLab's throttle (Rack::Attack) counts calendar seconds, by arrival. A request sent
    # more than 22 ms after its slot takes another (the budget's guard), so a stall of an
    # instance does not bunch its late requests into one second (measured with the guard:
    # 20 in every run at load average 4-15; without it 22-27 at load 11).
    assert int(str(served["max_arrivals_per_second"])) <= RATE, per_second
    # And any one second, sliding: the stricter reading of "never over the limit" (the
    # budget's margin leaves ~30 ms of slack per second for a request read late; 20 in each
    # of 11 runs, 5 of them beside two busy loops; in-process, the test's own work once
    # delayed the simulator's reading enough for 22).
    busiest = int(str(served["max_in_any_second"]))
    assert busiest <= RATE, (busiest, served["in_last_second_at_arrival"])
    # The limit, as the budget hands out slots; no request before its slot (late ones: see
    # tests/scaleout/budget_checks.py).
    assert_sent_within_the_budget(per_second, slots, RATE)
    # It uses the budget, and leaves the margin's slack: exactly the limit in every second
    # lets a request late by a millisecond the 21st of a second (a budget without the margin
    # hands out 200 slots in these 10 s).
    steady_slots = [slots.get(s, 0) for s in window]
    assert 0.95 * RATE * STEADY_S <= sum(steady_slots) <= 0.99 * RATE * STEADY_S, steady_slots
    # The requests follow their slots (a stall moves some across the window's edges).
    steady = [per_second.get(s, 0) for s in window]
    assert sum(steady) >= 0.9 * RATE * STEADY_S, (steady, steady_slots)
    reserved = [orjson.loads(r)["requests_reserved"] for r in reports.values()]
    assert len(reserved) == 3 and min(reserved) > 0, reserved  # all three took part
