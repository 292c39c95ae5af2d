"""The service process through outages: Redis down at start-up and between rounds, Redis
restarted with and without persistence, a broker restarted on the same address, a long first
catch-up on /readyz, and stop signals during start-up and during a --once round."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gitlab_producer.simulator.server import SimulatorThread, free_port, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import Broker, OwnBroker, OwnRedis, ServiceRun, consume

pytestmark = pytest.mark.integration
SPEC = WorldSpec(projects=40, users=10, events=1500, history_days=1.0, seed=31)


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def metric(env: ServiceRun, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{env.env['METRICS_PORT']}/metrics", timeout=5).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def readyz(env: ServiceRun) -> tuple[int, dict[str, Any]]:
    answer = httpx.get(f"http://127.0.0.1:{env.env['METRICS_PORT']}/readyz", timeout=10)
    body: dict[str, Any] = answer.json()
    return answer.status_code, body


def truth_ids(sim: SimulatorThread) -> set[int]:
    return {row[0] for row in httpx.get(f"{sim.url}/_simulator/truth", timeout=30).json()["events"]}


def delivered(bootstrap: str, topic: str, expected: int, timeout_s: float = 60) -> Counter[int]:
    return Counter(int(orjson.loads(m.value())["id"])
                   for m in consume(bootstrap, topic, expected, timeout_s=timeout_s))


def configure(env: ServiceRun, sim: SimulatorThread, bootstrap: str, redis_address: str,
              prefix: str = "gp-resilience:") -> str:
    topic = f"res-{uuid.uuid4().hex[:8]}"
    env.env.update({
        "GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
        "SYNC_SINCE": datetime.fromtimestamp(sim.sim.world.start_ms / 1000, UTC).isoformat(),
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_TOPIC": topic,
        "REDIS_ADDRESS": redis_address, "REDIS_KEY_PREFIX": prefix, "REDIS_DB": "0",
        "USER_RESYNC_INTERVAL": "0",
    })
    return topic


def round_retries(env: ServiceRun) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in env.all_logs().splitlines() if '"round_retry"' in line]


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 15) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout_s)


def test_redis_down_at_start_up_and_between_rounds_then_back(
        service_env: ServiceRun, broker: Broker, own_redis: OwnRedis) -> None:
    with running_simulator(SPEC) as sim:
        topic = configure(service_env, sim, broker.bootstrap, own_redis.address)
        proc = service_env.start("run")  # Redis is not there yet
        try:
            wait_until(lambda: service_env.all_logs().count('"store_unreachable"') >= 2, 30,
                       "start-up retries the store")
            status, body = readyz(service_env)
            assert status == 503 and "store" in body["problems"]
            assert proc.poll() is None
            own_redis.start()
            wait_until(lambda: metric(service_env, "gitlab_producer_rounds_total",
                                      outcome="success") >= 1, 60, "a round once Redis is up")
            expected = truth_ids(sim)
            got = delivered(broker.bootstrap, topic, len(expected))
            assert set(got) == expected and max(got.values()) == 1
            wait_until(lambda: readyz(service_env)[0] == 200, 30, "ready")

            own_redis.kill()  # down at the start of the next rounds
            # Retried with backoff: after the second failure in a row, 2 s (poll: 1 s).
            wait_until(lambda: any(r["failures"] >= 2 and r["retry_in_s"] >= 2
                                   for r in round_retries(service_env)), 30, "backoff")
            assert '"StoreError' in service_env.all_logs()
            status, body = readyz(service_env)
            assert status == 503 and "store" in body["problems"]
            assert proc.poll() is None  # still up
            own_redis.start()  # without persistence: every mark and cursor is gone
            wait_until(lambda: metric(service_env, "gitlab_producer_store_state_lost_total")
                       == 1, 60, "the lost state is reported")
            assert '"store_state_lost"' in service_env.all_logs()
            succeeded = metric(service_env, "gitlab_producer_rounds_total", outcome="success")
            wait_until(lambda: metric(service_env, "gitlab_producer_rounds_total",
                                      outcome="success") > succeeded, 60, "rounds again")
            wait_until(lambda: readyz(service_env)[0] == 200, 30, "ready again")
        finally:
            code = stop(proc)
        assert code == 0, service_env.all_logs()[-3000:]


def test_redis_restarted_with_persistence_loses_nothing(
        service_env: ServiceRun, broker: Broker, own_redis: OwnRedis) -> None:
    own_redis.persistent = True
    own_redis.start()
    with running_simulator(SPEC) as sim:
        topic = configure(service_env, sim, broker.bootstrap, own_redis.address)
        proc = service_env.start("run")
        try:
            wait_until(lambda: metric(service_env, "gitlab_producer_rounds_total",
                                      outcome="success") >= 1, 60, "the first round")
            own_redis.kill()
            wait_until(lambda: '"StoreError' in service_env.all_logs(), 30, "a failed round")
            own_redis.start()
            httpx.post(f"{sim.url}/_simulator/events", json={"count": 20, "project_id": 2},
                       timeout=10)
            expected = truth_ids(sim)
            wait_until(lambda: len(delivered(broker.bootstrap, topic, 0, 5)) == len(expected),
                       60, "the new events")
            got = delivered(broker.bootstrap, topic, len(expected))
            assert set(got) == expected and max(got.values()) == 1  # no repeats
            assert metric(service_env, "gitlab_producer_store_state_lost_total") == 0
        finally:
            code = stop(proc)
        assert code == 0, service_env.all_logs()[-3000:]


def test_a_restarted_broker_is_written_to_again(
        service_env: ServiceRun, own_broker: OwnBroker, redis_address: str,
        redis_prefix: str) -> None:
    with running_simulator(SPEC) as sim:
        topic = configure(service_env, sim, own_broker.bootstrap, redis_address, redis_prefix)
        service_env.env["REDIS_DB"] = "13"
        proc = service_env.start("run")
        try:
            wait_until(lambda: metric(service_env, "gitlab_producer_rounds_total",
                                      outcome="success") >= 1, 60, "the first round")
            first = truth_ids(sim)
            assert set(delivered(own_broker.bootstrap, topic, len(first))) == first
            own_broker.kill()
            own_broker.start()  # same address, knows no producer (and, memory only, no data)
            httpx.post(f"{sim.url}/_simulator/events", json={"count": 30, "project_id": 3},
                       timeout=10)
            new = truth_ids(sim) - first
            assert len(new) == 30
            wait_until(lambda: set(delivered(own_broker.bootstrap, topic, 0, 5)) >= new, 60,
                       "delivery to the new broker")
            got = delivered(own_broker.bootstrap, topic, len(new))
            assert set(got) == new and max(got.values()) == 1
            assert '"kafka_producer_renewed"' in service_env.all_logs()
        finally:
            code = stop(proc)
        assert code == 0, service_env.all_logs()[-3000:]


def test_ready_through_a_long_first_catch_up_not_when_it_stalls(
        service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str) -> None:
    # Two processes side by side, each with a GitLab of its own, so that the two waits of
    # LIMIT_S overlap: one's first catch-up moves on (ready past the old rule, a success
    # within 30 s), the other's GitLab fails once its catch-up is under way (not ready when
    # nothing has moved for 30 s).
    spec = WorldSpec(projects=150, users=30, events=12000, history_days=2.0, seed=37)
    with running_simulator(spec) as sim, running_simulator(spec) as failing:
        configure(service_env, sim, broker.bootstrap, redis_address, redis_prefix)
        # Neither stop is under test: in-flight pages need not wait out the default 8 s.
        service_env.env.update({"REDIS_DB": "13", "OPERATIONS_PER_SECOND": "6",
                                "SHUTDOWN_GRACE": "1"})
        stalled_env = ServiceRun(dict(service_env.env), service_env.cwd, service_env.logs)
        configure(stalled_env, failing, broker.bootstrap, redis_address,
                  f"{redis_prefix}stalled:")
        stalled_env.env.update({"REDIS_DB": "13", "OPERATIONS_PER_SECOND": "6",
                                "METRICS_PORT": str(free_port()), "LOG_PORT": str(free_port()),
                                "STATE_PATH": str(service_env.cwd / "stalled.sqlite3")})
        proc = service_env.start("run")
        log = service_env.logs[-1]
        stalled = stalled_env.start("run")
        try:
            wait_until(lambda: readyz(service_env)[0] == 200, 30, "ready at start")
            ready_at = time.monotonic()  # its round watch began no later
            wait_until(lambda: readyz(stalled_env)[0] == 200, 30, "the other ready at start")
            wait_until(lambda: httpx.get(f"{failing.url}/_simulator/stats").json()["total"]
                       >= 5, 30, "the other's catch-up under way")
            httpx.post(f"{failing.url}/_simulator/settings", timeout=10,
                       json={"fault_rate": 1.0, "fault_kinds": ["error500"]})
            # Rounds are due every 1 s: the old rule wanted a success within 30 s.
            while time.monotonic() - ready_at < 34:
                status, body = readyz(service_env)
                assert status == 200, body
                time.sleep(1)
            assert '"round_finished"' not in log.read_text()  # still the first round
            wait_until(lambda: "gitlab" in readyz(stalled_env)[1]["problems"], 30,
                       "GitLab failing is seen")
            wait_until(lambda: "rounds" in readyz(stalled_env)[1]["problems"], 60,
                       "the stalled round is seen")
            assert readyz(stalled_env)[0] == 503
        finally:
            stalled.send_signal(signal.SIGTERM)
            codes = stop(proc), stalled.wait(15)
        assert codes == (0, 0), service_env.all_logs()[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_start_up_is_honoured_at_once(
        service_env: ServiceRun, own_redis: OwnRedis, sig: signal.Signals) -> None:
    with running_simulator(SPEC) as sim:
        configure(service_env, sim, "", own_redis.address)  # Redis never comes
        service_env.env["KAFKA_BOOTSTRAP_SERVERS"] = ""
        proc = service_env.start("run", "--once")
        wait_until(lambda: '"store_unreachable"' in service_env.all_logs(), 30,
                   "retrying the store")
        asked = time.monotonic()
        code = stop(proc, sig)
        assert time.monotonic() - asked < 3
        assert code == 128 + sig  # the round never ran: not a success
        assert "Traceback" not in service_env.all_logs()


def test_run_once_cut_short_by_sigterm_exits_non_zero(
        service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str) -> None:
    spec = WorldSpec(projects=150, users=30, events=12000, history_days=2.0, seed=41)
    with running_simulator(spec) as sim:
        configure(service_env, sim, broker.bootstrap, redis_address, redis_prefix)
        service_env.env.update({"REDIS_DB": "13", "OPERATIONS_PER_SECOND": "30"})
        proc = service_env.start("run", "--once")
        wait_until(lambda: httpx.get(f"{sim.url}/_simulator/stats").json()["total"] >= 30, 60,
                   "the round is under way")
        assert stop(proc) == 128 + signal.SIGTERM
        assert '"cancelled at shutdown"' in service_env.all_logs() or (
            '"interrupted"' in service_env.all_logs())
