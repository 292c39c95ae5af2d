"""The service process end to end: simulator -> gitlab-producer -> Redis + real broker."""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from datetime import UTC, datetime

import httpx
import orjson
import pytest

from gitlab_producer.simulator.server import running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import Broker, ServiceRun, consume
from tests.waits import Stalled, wait_until

pytestmark = pytest.mark.integration

SPEC = WorldSpec(projects=120, users=30, events=4000, history_days=2.0, seed=7)


def truth_ids(url: str) -> set[int]:
    return {row[0] for row in httpx.get(f"{url}/_simulator/truth", timeout=30).json()["events"]}


def stats(url: str) -> dict[str, object]:
    result: dict[str, object] = httpx.get(f"{url}/_simulator/stats", timeout=10).json()
    return result


def requests_served(url: str) -> int:
    return int(str(stats(url)["total"]))


def wait_for_requests(url: str, count: int, timeout_s: float = 60.0) -> None:
    """Until the simulator has answered ``count`` requests; fails after ``timeout_s``."""
    wait_until(lambda: requests_served(url) >= count, timeout_s,
               f"{count} requests served by the simulator")


def finished_rounds(run: ServiceRun) -> int:
    return run.all_logs().count('"round_finished"')


def configure(service_env: ServiceRun, sim_url: str, world_start_ms: int, broker: Broker,
              redis_address: str, prefix: str) -> str:
    topic = f"events-{uuid.uuid4().hex[:8]}"
    service_env.env.update({
        "GITLAB_BASE_URL": f"{sim_url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
        "SYNC_SINCE": datetime.fromtimestamp(world_start_ms / 1000, UTC).isoformat(),
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_TOPIC": topic,
        "REDIS_ADDRESS": redis_address, "REDIS_KEY_PREFIX": prefix,
    })
    return topic


def event_ids(messages: list[object]) -> Counter[int]:
    return Counter(int(orjson.loads(m.value())["id"]) for m in messages)  # type: ignore[attr-defined]


def test_every_event_once_despite_faults_and_429s(
    service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str
) -> None:
    with running_simulator(SPEC, fault_rate=0.08, rate_limit=40.0, slow_s=6.0) as sim:
        topic = configure(service_env, sim.url, sim.sim.world.start_ms, broker, redis_address,
                          redis_prefix)
        first = service_env.run("run", "--once", timeout_s=240)
        assert first.returncode == 0, first.stderr[-3000:]
        expected = truth_ids(sim.url)
        got = event_ids(consume(broker.bootstrap, topic, len(expected)))
        assert set(got) == expected
        assert max(got.values()) == 1
        served = stats(sim.url)
        by_route = served["by_route"]
        assert isinstance(by_route, dict)
        codes = {code for route in by_route.values() for code in route}
        assert {"429", "500", "502"} <= codes  # faults and throttling really happened
        assert served["token_in_query"] == 0

        second = service_env.run("run", "--once", timeout_s=120)
        assert second.returncode == 0, second.stderr[-3000:]
        again = event_ids(consume(broker.bootstrap, topic, len(expected)))
        assert again == got  # the second round added nothing
        logs = first.stderr + second.stderr
        assert "sim-token" not in logs


def test_kill_9_mid_round_then_restart_loses_nothing(
    service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str
) -> None:
    spec = WorldSpec(projects=150, users=30, events=12000, history_days=2.0, seed=11)
    with running_simulator(spec) as sim:
        topic = configure(service_env, sim.url, sim.sim.world.start_ms, broker, redis_address,
                          redis_prefix)
        service_env.env["OPERATIONS_PER_SECOND"] = "60"  # slow enough to be caught mid-round
        proc = service_env.start("run", "--once")
        wait_for_requests(sim.url, 40)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        expected = truth_ids(sim.url)
        partial = event_ids(consume(broker.bootstrap, topic, 0, timeout_s=5))
        assert 0 < len(partial) < len(expected)  # killed in the middle of the round

        service_env.env["OPERATIONS_PER_SECOND"] = "500"
        done = service_env.run("run", "--once", timeout_s=240)
        assert done.returncode == 0, done.stderr[-3000:]
        got = event_ids(consume(broker.bootstrap, topic, len(expected)))
        assert set(got) == expected
        # Only events in flight at the kill may repeat: at most a page or so per reader.
        repeated = sum(n - 1 for n in got.values())
        assert repeated <= 8 * 2 * 100


def test_broker_outage_mid_round_loses_nothing(
    service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str
) -> None:
    spec = WorldSpec(projects=100, users=20, events=8000, history_days=2.0, seed=13)
    with running_simulator(spec) as sim:
        topic = configure(service_env, sim.url, sim.sim.world.start_ms, broker, redis_address,
                          redis_prefix)
        service_env.env["OPERATIONS_PER_SECOND"] = "80"
        proc = service_env.start("run", "--once")
        try:
            wait_for_requests(sim.url, 30)
            broker.pause()
            # The outage lasts until it has stopped the round: every reader waits for an
            # acknowledgement and the simulator hears nothing for two seconds.
            wait_until(Stalled(lambda: requests_served(sim.url), 2.0), 60,
                       "the round to stall on the paused broker")
        finally:
            broker.resume()
        assert proc.wait(240) == 0, service_env.all_logs()[-3000:]
        expected = truth_ids(sim.url)
        got = event_ids(consume(broker.bootstrap, topic, len(expected)))
        assert set(got) == expected
        assert max(got.values()) == 1


def test_live_events_all_arrive_and_sigterm_exits_cleanly(
    service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str
) -> None:
    spec = WorldSpec(projects=60, users=15, events=1500, history_days=1.0, seed=17)
    with running_simulator(spec, live_rate=30.0) as sim:
        topic = configure(service_env, sim.url, sim.sim.world.start_ms, broker, redis_address,
                          redis_prefix)
        proc = service_env.start("run")
        wait_until(lambda: finished_rounds(service_env) >= 3 and int(str(stats(sim.url)[
            "events"])) >= spec.events + 240, 60, "three rounds and 240 live events")
        httpx.post(f"{sim.url}/_simulator/settings", json={"live_rate": 0}, timeout=10)
        live_stopped = finished_rounds(service_env)
        # Two more rounds (poll interval 1 s) start after the last live event.
        wait_until(lambda: finished_rounds(service_env) >= live_stopped + 2, 60,
                   "two rounds after the live activity stopped")
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = proc.wait(15)
        assert code == 0, service_env.all_logs()[-3000:]
        assert time.monotonic() - started < 10
        expected = truth_ids(sim.url)
        assert len(expected) > spec.events * 0.97 + 100  # live events really arrived
        got = event_ids(consume(broker.bootstrap, topic, len(expected)))
        assert set(got) == expected
        assert max(got.values()) == 1
        # Most live events landed in warm projects that the users' lists covered (15 users
        # cost less than reading ~60 warm projects): that path lost nothing either.
        rounds = [orjson.loads(line) for line in service_env.all_logs().splitlines()
                  if '"round_finished"' in line]
        assert max(r["covered_by_users"] for r in rounds) > 30


def test_embedded_store_and_file_sink_work_the_same(service_env: ServiceRun) -> None:
    with running_simulator(SPEC, fault_rate=0.05) as sim:
        service_env.env.update({
            "GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
            "SYNC_SINCE": datetime.fromtimestamp(sim.sim.world.start_ms / 1000, UTC).isoformat(),
        })
        for _ in range(2):
            done = service_env.run("run", "--once", timeout_s=240)
            assert done.returncode == 0, done.stderr[-3000:]
        assert "KAFKA_BOOTSTRAP_SERVERS is empty" in done.stderr
        # The second round came within USER_RESYNC_INTERVAL, yet lists the users again: its
        # warm projects (read only because their activity is under an hour old) cost more
        # than one listing page and the 30 users' lists, which cover them instead.
        second = next(orjson.loads(line) for line in done.stderr.splitlines()
                      if '"round_finished"' in line)
        assert second["covered_by_users"] > 31
        assert second["queued"]["user"] == 30
        listings = stats(sim.url)["by_route"]["users_list"]  # type: ignore[index]
        assert listings["200"] == 2  # one page of 30 users per round (faults aside)
        lines = (service_env.cwd / "events.jsonl").read_bytes().splitlines()
        ids = Counter(int(orjson.loads(line)["value"]["id"]) for line in lines)
        assert set(ids) == truth_ids(sim.url)
        assert max(ids.values()) == 1


def test_rate_cap_holds(service_env: ServiceRun) -> None:
    with running_simulator(SPEC) as sim:
        service_env.env.update({
            "GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
            "SYNC_SINCE": datetime.fromtimestamp(sim.sim.world.start_ms / 1000, UTC).isoformat(),
            "OPERATIONS_PER_SECOND": "20", "GITLAB_PER_PAGE_PAGINATION": "50",
        })
        proc = service_env.start("run", "--once")
        wait_for_requests(sim.url, 100)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 128 + signal.SIGTERM  # the round was cut short: not a success
        served = stats(sim.url)
        assert int(str(served["total"])) >= 100  # it was busy: the cap, not idleness, bounded it
        assert int(str(served["max_per_second"])) <= 20


def test_bad_token_fails_the_round_without_leaking_it(service_env: ServiceRun) -> None:
    with running_simulator(SPEC, token="right-token") as sim:
        done = service_env.run("run", "--once", GITLAB_BASE_URL=f"{sim.url}/api/v4",
                               GITLAB_PRIVATE_TOKEN="wrong-token-123")
        assert done.returncode == 1
        assert "401" in done.stderr
        assert "wrong-token-123" not in done.stderr + done.stdout


def test_bad_config_exits_2_naming_the_variable(service_env: ServiceRun) -> None:
    done = service_env.run("run", "--once", GITLAB_BASE_URL="http://127.0.0.1:1/api/v4",
                           GITLAB_PRIVATE_TOKEN="secret-value-x",
                           GITLAB_PER_PAGE_PAGINATION="500")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "GITLAB_PER_PAGE_PAGINATION" in lines[0]
    assert "secret-value-x" not in done.stderr


def test_check_config_redacts_secrets(service_env: ServiceRun) -> None:
    done = service_env.run("check-config", GITLAB_BASE_URL="http://127.0.0.1:1/api/v4",
                           GITLAB_PRIVATE_TOKEN="secret-value-y", KAFKA_PASSWORD="kafka-pw-z")
    assert done.returncode == 0, done.stderr
    shown = orjson.loads(done.stdout)
    assert shown["GITLAB_PRIVATE_TOKEN"] == "***"
    assert "secret-value-y" not in done.stdout and "kafka-pw-z" not in done.stdout


def test_missing_config_file_and_no_token(service_env: ServiceRun) -> None:
    done = service_env.run("check-config", "--config", "nowhere.yaml")
    assert done.returncode == 2  # a file named on the command line must exist
    assert done.stderr == "config error: --config: nowhere.yaml does not exist\n"
    done = service_env.run("check-config")  # the default file is optional
    assert done.returncode == 2
    assert "GITLAB_BASE_URL" in done.stderr


@pytest.mark.parametrize("name,value", [("SCHEDULING_POLL_INTERVAL", "soon"),
                                         ("REDIS_ADDRESS", "no-port"),
                                         ("LOG_LEVEL", "chatty"),
                                         ("SYNC_SINCE", "yesterday")])
def test_each_bad_value_names_its_variable(service_env: ServiceRun, name: str,
                                           value: str) -> None:
    done = service_env.run("check-config", GITLAB_BASE_URL="http://127.0.0.1:1/api/v4",
                           GITLAB_PRIVATE_TOKEN="t0ken-value", **{name: value})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and name in done.stderr
