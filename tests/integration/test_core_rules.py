"""The core rules in the real service process, one path at a time.

tests/unit/test_round_rules.py pins each rule on a round of its own; here the same rules are
seen through the running process: live events reach the output through the project path
alone (SYNC_USERS=false), and through the covering of warm projects by their authors with the
shipped USER_RESYNC_INTERVAL (not 0, which re-reads every active user every round and so
would deliver what a broken project path misses); and a failed Kafka delivery fails the run.
"""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import Broker, ServiceRun, consume
from tests.waits import wait_until

pytestmark = pytest.mark.integration

LIVE = WorldSpec(projects=60, users=15, events=1500, history_days=1.0, seed=31)


def visible(url: str) -> list[tuple[int, int | None, int]]:
    rows = httpx.get(f"{url}/_simulator/truth", timeout=30).json()["events"]
    return [tuple(row) for row in rows]  # type: ignore[misc]


def created(url: str) -> int:
    return int(httpx.get(f"{url}/_simulator/stats", timeout=10).json()["events"])


def routes(url: str) -> dict[str, dict[str, int]]:
    by_route: dict[str, dict[str, int]] = httpx.get(f"{url}/_simulator/stats",
                                                    timeout=10).json()["by_route"]
    return by_route


def delivered(path: Path) -> Counter[int]:
    """Event ids in the JSON-lines output (a line still being written is left out)."""
    found: Counter[int] = Counter()
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                found[int(orjson.loads(line)["value"]["id"])] += 1
            except orjson.JSONDecodeError:
                continue
    return found


def rounds(run: ServiceRun) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in run.all_logs().splitlines()
            if '"round_finished"' in line]


def point_at(run: ServiceRun, sim: SimulatorThread) -> None:
    run.env.update({
        "GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
        "SYNC_SINCE": datetime.fromtimestamp(sim.sim.world.start_ms / 1000, UTC).isoformat(),
    })


@pytest.mark.parametrize("sync_users", ["false", "true"])
def test_live_project_events_arrive_on_one_path(service_env: ServiceRun,
                                                sync_users: str) -> None:
    """Live events mostly land in projects whose last_activity_at does not move (it moved
    under an hour ago). With SYNC_USERS=false only the activity lag rule reads them; with
    users on and the default USER_RESYNC_INTERVAL, the users' lists cover those projects
    (15 users cost less than reading the warm ones) and nothing else re-reads them."""
    with running_simulator(LIVE, live_rate=30.0) as sim:
        point_at(service_env, sim)
        service_env.env["SYNC_USERS"] = sync_users
        proc = service_env.start("run")
        try:
            wait_until(lambda: len(rounds(service_env)) >= 4 and created(sim.url) >=
                       LIVE.events + 150, 60, "four rounds and 150 live events")
            httpx.post(f"{sim.url}/_simulator/settings", json={"live_rate": 0}, timeout=10)
            truth = visible(sim.url)
            wanted = {row[0] for row in truth if row[1] is not None}
            out = service_env.cwd / "events.jsonl"
            wait_until(lambda: wanted <= set(delivered(out)), 60,
                       "every project event in the output")
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(15)
        assert code == 0, service_env.all_logs()[-3000:]
        got = delivered(out)
        assert max(got.values()) == 1
        live = {row[0] for row in truth if row[0] > LIVE.events and row[1] is not None}
        assert len(live) > 100  # live events really arrived, in projects
        seen = rounds(service_env)
        if sync_users == "false":
            assert "users_list" not in routes(sim.url)  # the project path alone
            assert set(got) == wanted
        else:
            assert max(r["covered_by_users"] for r in seen) > 15  # the covering path ran


def test_failed_kafka_delivery_fails_the_run_and_is_sent_by_the_next(
        service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str) -> None:
    spec = WorldSpec(projects=8, users=4, events=300, history_days=1.0, seed=33)
    with running_simulator(spec) as sim:
        point_at(service_env, sim)
        topic = f"rules-{uuid.uuid4().hex[:8]}"
        service_env.env.update({
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_TOPIC": topic,
            "KAFKA_DELIVERY_TIMEOUT": "2", "REDIS_ADDRESS": redis_address,
            "REDIS_KEY_PREFIX": redis_prefix,
        })
        broker.pause()
        try:
            failed = service_env.run("run", "--once", timeout_s=60)
        finally:
            broker.resume()
        assert failed.returncode == 1, failed.stderr[-3000:]
        assert "entity_failed" in failed.stderr
        finished = [orjson.loads(line) for line in failed.stderr.splitlines()
                    if '"round_finished"' in line]
        assert len(finished) == 1 and finished[0]["ok"] is False
        assert finished[0]["synced"] == {"project": 0, "user": 0}

        done = service_env.run("run", "--once", timeout_s=60)
        assert done.returncode == 0, done.stderr[-3000:]
        expected = {row[0] for row in visible(sim.url)}
        got = {int(orjson.loads(m.value())["id"])
               for m in consume(broker.bootstrap, topic, len(expected), timeout_s=30)}
        assert got == expected
