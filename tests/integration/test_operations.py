"""Operations endpoints on the running service: metrics match what GitLab served, the log
level changes at run time, readiness follows the broker."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import Broker, ServiceRun
from tests.waits import wait_until as shared_wait

pytestmark = pytest.mark.integration


def wait_until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    shared_wait(check, timeout_s, "the condition", interval_s=0.2, ignore=(httpx.HTTPError,))


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return sum(v for (n, lbl), v in found.items()
               if n == name and all((k, want) in lbl for k, want in labels.items()))


@pytest.fixture
def running(service_env: ServiceRun, broker: Broker, redis_address: str,
            redis_prefix: str) -> Iterator[tuple[SimulatorThread, ServiceRun]]:
    spec = WorldSpec(projects=80, users=20, events=3000, history_days=1.0, seed=23)
    with running_simulator(spec, rate_limit=60.0) as sim:
        service_env.env.update({
            "GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
            "SYNC_SINCE": datetime.fromtimestamp(sim.sim.world.start_ms / 1000, UTC).isoformat(),
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_TOPIC": "ops-events",
            "REDIS_ADDRESS": redis_address, "REDIS_KEY_PREFIX": redis_prefix,
            "SCHEDULING_POLL_INTERVAL": "3", "OPERATIONS_PER_SECOND": "200",
        })
        proc = service_env.start("run")
        try:
            yield sim, service_env
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


def test_metrics_match_what_the_simulator_served(
        running: tuple[SimulatorThread, ServiceRun]) -> None:
    sim, env = running
    port = int(env.env["METRICS_PORT"])
    wait_until(lambda: total(samples(port), "gitlab_producer_rounds_total",
                             outcome="success") >= 1, 60)
    before = samples(port)
    served = httpx.get(f"{sim.url}/_simulator/stats").json()
    after = samples(port)
    for route, endpoint in (("project_events", "projects/:id/events"),
                            ("projects_list", "projects"), ("users_list", "users")):
        for status, count in served["by_route"].get(route, {}).items():
            seen = [total(m, "gitlab_producer_gitlab_requests_total", endpoint=endpoint,
                          status=status) for m in (before, after)]
            assert seen[0] <= count <= seen[1], (route, status, seen, count)
    throttled = sum(r.get("429", 0) for r in served["by_route"].values())
    assert throttled > 0  # the simulator's 60 requests/s budget was hit
    assert (total(before, "gitlab_producer_gitlab_throttled_total") <= throttled
            <= total(after, "gitlab_producer_gitlab_throttled_total"))
    truth = httpx.get(f"{sim.url}/_simulator/truth").json()["count"]
    produced = total(after, "gitlab_producer_events_produced_total")
    assert produced == truth
    assert total(after, "gitlab_producer_events_fetched_total") >= produced
    assert total(after, "gitlab_producer_last_successful_round_timestamp_seconds") > 0
    assert total(after, "gitlab_producer_round_duration_seconds_count") >= 1
    assert ("gitlab_producer_gitlab_request_duration_seconds_bucket" in
            {name for name, _ in after})


def test_log_level_changes_at_run_time(running: tuple[SimulatorThread, ServiceRun]) -> None:
    _, env = running
    url = f"http://127.0.0.1:{env.env['LOG_PORT']}/log_level"
    wait_until(lambda: httpx.get(url).status_code == 200)
    assert httpx.get(url).json() == {"level": "info"}
    assert '"entity_synced"' not in env.all_logs()
    assert httpx.put(url, data={"level": "verbose"}).status_code == 400
    response = httpx.put(url, data={"level": "debug"})
    assert response.status_code == 200 and httpx.get(url).json() == {"level": "debug"}
    httpx.post(f"{running[0].url}/_simulator/events", json={"count": 3, "project_id": 1})
    wait_until(lambda: '"entity_synced"' in env.all_logs(), 30)
    httpx.put(url, data={"level": "error"})
    assert httpx.get(url).json() == {"level": "error"}


def test_readiness_follows_the_broker(running: tuple[SimulatorThread, ServiceRun],
                                      broker: Broker) -> None:
    _, env = running
    base = f"http://127.0.0.1:{env.env['METRICS_PORT']}"
    wait_until(lambda: httpx.get(f"{base}/readyz", timeout=10).status_code == 200, 60)
    assert httpx.get(f"{base}/healthz").json() == {"status": "alive"}
    broker.pause()
    try:
        answer = httpx.get(f"{base}/readyz", timeout=10)
        assert answer.status_code == 503
        assert "sink" in answer.json()["problems"]
    finally:
        broker.resume()
    wait_until(lambda: httpx.get(f"{base}/readyz", timeout=10).status_code == 200, 30)
