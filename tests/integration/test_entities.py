"""One bad entity or record must not stop the others: the real service process against the
simulator (with its entity faults switched on), Redis and the broker."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import orjson
import pytest

from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import Broker, ServiceRun, consume
from tests.integration.test_delivery import configure, event_ids, stats, truth_ids
from tests.integration.test_operations import samples, total

pytestmark = pytest.mark.integration


def faults(sim: SimulatorThread, **switches: object) -> None:
    httpx.post(f"{sim.url}/_simulator/settings", json=switches, timeout=10).raise_for_status()


def served(sim: SimulatorThread, route: str, status: str) -> int:
    by_route: dict[str, dict[str, int]] = stats(sim.url)["by_route"]  # type: ignore[assignment]
    return by_route.get(route, {}).get(status, 0)


def parsed(text: str, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``event``."""
    lines = []
    for line in text.splitlines():
        if f'"{event}"' in line:
            try:
                lines.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return lines


def log_lines(env: ServiceRun, event: str) -> list[dict[str, Any]]:
    return parsed(env.all_logs(), event)


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:  # the metrics port is not open yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def stop(proc: Any, env: ServiceRun) -> None:
    assert proc.poll() is None, env.all_logs()[-3000:]  # still up
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, env.all_logs()[-3000:]


def quiet_project(sim: SimulatorThread, idle_s: float) -> tuple[int, set[int]]:
    """The project with the most visible events among those idle for ``idle_s``."""
    world = sim.sim.world
    now_ms = time.time() * 1000
    candidates = {pid: {i + 1 for i in world.project_events[pid - 1] if world.visible(i)}
                  for pid in range(1, world.project_count + 1)
                  if now_ms - world.project_last_activity_ms[pid - 1] > idle_s * 1000}
    pid = max(candidates, key=lambda p: len(candidates[p]))
    assert len(candidates[pid]) >= 3
    return pid, candidates[pid]


def test_a_forbidden_project_is_skipped_counted_retried_and_caught_up(
    service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str
) -> None:
    spec = WorldSpec(projects=40, users=10, events=2500, history_days=2.0, seed=21)
    with running_simulator(spec) as sim:
        topic = configure(service_env, sim.url, sim.sim.world.start_ms, broker, redis_address,
                          redis_prefix)
        # Only the project's own list can bring its events back (no users' lists), and its
        # last activity is older than the listing window after the first round
        # (round start - PROJECT_ACTIVITY_LAG - SYNC_OVERLAP = 3,900 s).
        service_env.env["SYNC_USERS"] = "false"
        pid, its_events = quiet_project(sim, idle_s=3 * 3600)
        faults(sim, forbidden_projects=[pid])
        proc = service_env.start("run")
        wait_for(lambda: served(sim, "project_events", "403") >= 3, "three rounds tried it")
        port = int(service_env.env["METRICS_PORT"])
        wait_for(lambda: total(samples(port), "gitlab_producer_entities_skipped_total",
                               kind="project", reason="forbidden") >= 3, "skips counted")
        found = samples(port)
        assert total(found, "gitlab_producer_entities_retrying", kind="project") == 1
        assert total(found, "gitlab_producer_rounds_total", outcome="success") >= 2
        assert total(found, "gitlab_producer_rounds_total", outcome="failure") == 0
        truth = httpx.get(f"{sim.url}/_simulator/truth", timeout=30).json()["events"]
        others = {row[0] for row in truth if row[1] is not None} - its_events  # no user lists
        got = event_ids(consume(broker.bootstrap, topic, len(others)))
        assert set(got) == others  # everything else flowed, every round complete
        stop(proc, service_env)
        skipped = log_lines(service_env, "entity_skipped")
        assert skipped and {(s["id"], s["reason"]) for s in skipped} == {(pid, "forbidden")}
        assert "403" in skipped[0]["error"]
        # The base advanced: the later rounds' windows no longer list the project.
        last_window = log_lines(service_env, "round_started")[-1]["projects_active_after"]
        activity = sim.sim.world.project_last_activity_ms[pid - 1] / 1000
        assert datetime.fromisoformat(last_window).timestamp() > activity

        # Access comes back; a restarted service still knows to read it, from its own cursor.
        faults(sim, forbidden_projects=[])
        done = service_env.run("run", "--once", timeout_s=120)
        assert done.returncode == 0, done.stderr[-3000:]
        recovered = parsed(done.stderr, "entity_recovered")
        assert [(r["kind"], r["id"]) for r in recovered] == [("project", pid)]
        got = event_ids(consume(broker.bootstrap, topic, len(others) + len(its_events)))
        assert set(got) == others | its_events
        assert max(got.values()) == 1
        # Read, then forgotten: a further round does not read it again (its activity is old).
        again = service_env.run("run", "--once", timeout_s=120, LOG_LEVEL="debug")
        assert again.returncode == 0, again.stderr[-3000:]
        synced = {(r["kind"], r["id"]) for r in parsed(again.stderr, "entity_synced")}
        assert synced and ("project", pid) not in synced


def test_malformed_records_are_skipped_and_the_good_ones_delivered(
    service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str
) -> None:
    spec = WorldSpec(projects=30, users=10, events=1500, history_days=1.0, seed=22)
    with running_simulator(spec) as sim:
        topic = configure(service_env, sim.url, sim.sim.world.start_ms, broker, redis_address,
                          redis_prefix)
        service_env.env["GITLAB_PER_PAGE_PAGINATION"] = "20"  # bad events on several pages
        busiest = max(range(1, 31), key=lambda p: len(sim.sim.world.project_events[p - 1]))
        faults(sim, malformed_listings=True, malformed_events=[busiest])
        proc = service_env.start("run")
        port = int(service_env.env["METRICS_PORT"])
        wait_for(lambda: total(samples(port), "gitlab_producer_rounds_total",
                               outcome="success") >= 2, "two complete rounds")
        found = samples(port)
        expected = truth_ids(sim.url)
        got = event_ids(consume(broker.bootstrap, topic, len(expected)))
        assert set(got) == expected  # the good events of the bad pages too
        assert max(got.values()) == 1
        for name in ("projects", "users", "projects/:id/events"):
            assert total(found, "gitlab_producer_malformed_records_total", list=name) > 0, name
        # 5 bad projects and 3 bad users per first listing page, 2 bad events per page.
        assert total(found, "gitlab_producer_malformed_records_total", list="projects") % 5 == 0
        stop(proc, service_env)
        # The bad records' would-be ids were never read as entities.
        assert served(sim, "project_events", "404") == served(sim, "user_events", "404") == 0
        warned = {line["list"] for line in log_lines(service_env, "malformed_record_skipped")}
        assert warned == {"projects", "users", "projects/:id/events"}


def test_endless_pagination_fails_the_round_naming_the_list_and_the_process_stays_up(
    service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str
) -> None:
    spec = WorldSpec(projects=30, users=10, events=800, history_days=1.0, seed=24)
    with running_simulator(spec) as sim:
        configure(service_env, sim.url, sim.sim.world.start_ms, broker, redis_address,
                  redis_prefix)
        service_env.env["GITLAB_MAX_PAGES"] = "40"
        # Endless event lists fail their projects, not the users read beside them.
        faults(sim, endless=["project_events"])
        proc = service_env.start("run")
        wait_for(lambda: bool(log_lines(service_env, "round_finished")), "a round")
        first = log_lines(service_env, "round_finished")[0]
        assert first["ok"] is False
        assert first["failed"]["project"] == first["queued"]["project"] > 0
        assert first["synced"]["user"] == 10
        failed = log_lines(service_env, "entity_failed")
        assert failed and all(f["kind"] == "project" and "after 40 pages" in f["error"]
                              and f"projects/{f['id']}/events" in f["error"] for f in failed)
        # An endless listing fails the round, every round, naming the list.
        faults(sim, endless=["projects_list"])
        seen = len(log_lines(service_env, "round_finished"))
        listed_before = served(sim, "projects_list", "200")
        wait_for(lambda: len(log_lines(service_env, "round_finished")) >= seen + 3,
                 "three more rounds")
        rounds = log_lines(service_env, "round_finished")[seen + 1:]
        listed = served(sim, "projects_list", "200") - listed_before
        for result in rounds:
            assert result["ok"] is False
            assert "projects" in result["error"] and "after 40 pages" in result["error"]
        # Each round stopped at the cap, not before and not much after.
        assert 40 * len(rounds) <= listed <= 40 * (len(rounds) + 2)
        stop(proc, service_env)


def test_a_rejected_token_stops_the_service_before_any_round(service_env: ServiceRun) -> None:
    with running_simulator(WorldSpec(projects=5, users=3, events=50), token="right") as sim:
        done = service_env.run("run", GITLAB_BASE_URL=f"{sim.url}/api/v4",
                               GITLAB_PRIVATE_TOKEN="wrong-token-456", timeout_s=60)
        assert done.returncode == 1
        assert '"gitlab_token_rejected"' in done.stderr and "401" in done.stderr
        assert "wrong-token-456" not in done.stderr + done.stdout
        by_route = stats(sim.url)["by_route"]
        assert by_route == {"current_user": {"401": 1}}  # GET /user, nothing else
