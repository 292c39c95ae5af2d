"""A Redis that does not answer when the import's processes start (restarting, or started
after them): the worker waits for it with backoff and carries on once it answers, or stops at
once on a signal; a one-off backfill fails with one reason. Never a traceback."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator

import pytest

from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import OwnRedis, ServiceRun
from tests.waits import wait_until

pytestmark = pytest.mark.integration
SPEC = WorldSpec(projects=4, users=2, events=40, history_days=1.0, seed=47)


@pytest.fixture
def gitlab() -> Iterator[SimulatorThread]:
    with running_simulator(SPEC) as sim:
        yield sim


def values(sim: SimulatorThread, redis: OwnRedis) -> dict[str, str]:
    return {"GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
            "REDIS_ADDRESS": redis.address, "REDIS_KEY_PREFIX": "store-at-start:"}


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_worker_waits_for_redis_then_serves(service_env: ServiceRun, own_redis: OwnRedis,
                                              gitlab: SimulatorThread) -> None:
    proc = service_env.start("worker", **values(gitlab, own_redis))  # Redis not started yet
    try:
        wait_until(lambda: '"store_unreachable"' in service_env.all_logs(), 20,
                   "the worker saying the store does not answer")
        assert proc.poll() is None, service_env.all_logs()[-2000:]
        own_redis.start()
        wait_until(lambda: '"worker_started"' in service_env.all_logs(), 30,
                   "the worker serving once Redis answers")
    finally:
        code = stop(proc)
    assert code == 0, service_env.all_logs()[-2000:]
    assert "Traceback" not in service_env.all_logs()


def test_a_worker_waiting_for_redis_stops_at_once(service_env: ServiceRun, own_redis: OwnRedis,
                                                  gitlab: SimulatorThread) -> None:
    proc = service_env.start("worker", **values(gitlab, own_redis))
    try:
        wait_until(lambda: '"store_unreachable"' in service_env.all_logs(), 20,
                   "the worker saying the store does not answer")
    finally:
        code = stop(proc)
    assert code == 0, service_env.all_logs()[-2000:]
    logs = service_env.all_logs()
    assert '"worker_stopped"' in logs and "Traceback" not in logs


def test_a_backfill_without_redis_fails_with_one_reason(service_env: ServiceRun,
                                                        own_redis: OwnRedis,
                                                        gitlab: SimulatorThread) -> None:
    done = service_env.run("backfill", timeout_s=60, **values(gitlab, own_redis))
    shown = done.stdout + done.stderr
    assert done.returncode == 1, shown[-2000:]
    assert '"backfill_failed"' in shown and "the store: redis" in shown, shown[-2000:]
    assert "Traceback" not in shown
