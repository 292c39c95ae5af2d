"""``gitlab-producer backfill`` as a real process against the simulator: the embedded mode
(in-process dispatcher, SQLite, file sink) and the engine (SAQ on Redis, Kafka)."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Callable

import httpx
import orjson
import pytest

from gitlab_producer.simulator.server import free_port, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import Broker, ServiceRun
from tests.integration.backfill_truth import (
    CHECKED,
    assert_matches,
    envelope_validator,
    envelopes,
    expected_keys,
    from_file,
    from_kafka,
    ground_truth,
)

pytestmark = pytest.mark.integration

SPEC = WorldSpec(projects=8, users=20, events=300, history_days=2.0, seed=11,
                 objects_per_project=40, feature_off_share=0.2)


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def embedded(service_env: ServiceRun, url: str, **extra: str) -> None:
    service_env.env.update({"GITLAB_BASE_URL": f"{url}/api/v4",
                            "GITLAB_PRIVATE_TOKEN": "sim-token",
                            "BACKFILL_WAITER_INTERVAL": "0.1", **extra})


def status_lines(service_env: ServiceRun) -> list[dict[str, object]]:
    done = service_env.run("status", timeout_s=60)
    assert done.returncode == 0, done.stderr
    return [orjson.loads(line) for line in done.stdout.splitlines()]


def test_embedded_backfill_equals_the_ground_truth_and_a_rerun_produces_nothing(
        service_env: ServiceRun) -> None:
    with running_simulator(SPEC, fault_rate=0.05) as sim:
        embedded(service_env, sim.url)
        done = service_env.run("backfill", timeout_s=240)
        assert done.returncode == 0, done.stderr[-3000:]
        out = service_env.cwd / "events.jsonl"
        found = from_file(out)
        truth = ground_truth(sim.url)
        assert_matches(found, truth)
        assert found.repeats() == []
        # every kind of the contract arrived, with its headers
        assert {"projects", "groups", "users", "members", "labels", "milestones", "branches",
                "tags", "commits", "discussions", "resource_label_events",
                "protected_branches"} <= set(found.keys)
        validator = envelope_validator()  # the documented contract holds for every record
        for envelope in envelopes(out):
            validator.validate(envelope)
        issue = next(h for h in found.headers if h["kind"] == "issues")
        assert issue["op"] == "snapshot" and issue["ce_specversion"] == "1.0"
        assert issue["ce_type"] == "com.gitlab.issues.snapshot" and issue["updated_at"]
        # the seed's final line, per project
        finished = [orjson.loads(line) for line in done.stderr.splitlines()
                    if "GitLab project import finished" in line]
        assert len(finished) == SPEC.projects
        assert all(f["objects_imported"]["fetched"] == f["objects_imported"]["imported"]
                   for f in finished)
        # features switched off were skipped and shown, not failed
        off = {int(p): d["features_off"] for p, d in truth["projects"].items()}
        lines = status_lines(service_env)
        by_project = {int(str(line["project_id"])): line for line in lines[:-1]}
        for pid, features in off.items():
            if "issues" in features:
                assert "issues" in by_project[pid]["skipped_kinds"], by_project[pid]
            assert by_project[pid]["status"] == "complete"
        assert lines[-1]["failed_jobs"] == 0
        before = out.read_bytes()
        again = service_env.run("backfill", timeout_s=120)
        assert again.returncode == 0, again.stderr[-2000:]
        assert out.read_bytes() == before  # resumed: nothing produced again


def test_embedded_backfill_survives_kill_9_and_finishes_without_losses(
        service_env: ServiceRun) -> None:
    spec = WorldSpec(projects=10, users=20, events=300, history_days=2.0, seed=12,
                     objects_per_project=60, feature_off_share=0.0)
    with running_simulator(spec) as sim:
        embedded(service_env, sim.url, OPERATIONS_PER_SECOND="150")
        out = service_env.cwd / "events.jsonl"
        for _ in range(2):  # killed twice at different points
            seen = from_file(out).total
            proc = service_env.start("backfill")
            wait_for(lambda seen=seen: from_file(out).total > seen + 300, 120,
                     "a few pages produced")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        done = service_env.run("backfill", timeout_s=240)
        assert done.returncode == 0, done.stderr[-3000:]
        found = from_file(out)
        assert_matches(found, ground_truth(sim.url))
        # only pages in flight at a kill may be produced again (a page each, per running job)
        assert len(found.repeats()) <= 2 * 8 * 100, len(found.repeats())


def test_project_deleted_mid_import_ends_as_gone(service_env: ServiceRun) -> None:
    spec = WorldSpec(projects=4, users=10, events=100, seed=13, objects_per_project=200,
                     feature_off_share=0.0)
    with running_simulator(spec) as sim:
        embedded(service_env, sim.url, OPERATIONS_PER_SECOND="40", BACKFILL_PROJECTS="3,4")
        proc = service_env.start("backfill")
        log = service_env.logs[-1]
        wait_for(lambda: '"project_id": 3, "stage": "merge_requests"' in log.read_text(), 120,
                 "project 3 in its merge request stage")
        httpx.post(f"{sim.url}/_simulator/changes",
                   json={"kind": "delete_project", "project_id": 3}, timeout=10
                   ).raise_for_status()
        assert proc.wait(240) == 0, service_env.all_logs()[-3000:]
        lines = {int(str(line["project_id"])): line for line in status_lines(service_env)[:-1]}
        assert lines[3]["status"] == "gone"
        assert lines[4]["status"] == "complete"
        assert_matches(from_file(service_env.cwd / "events.jsonl"), ground_truth(sim.url, [4]),
                       only_truth_projects=True)


def test_a_wrong_token_stops_the_import_with_a_clear_message(service_env: ServiceRun) -> None:
    with running_simulator(WorldSpec(projects=2, users=5, events=20, seed=14)) as sim:
        embedded(service_env, sim.url, GITLAB_PRIVATE_TOKEN="wrong", BACKFILL_PROJECTS="1")
        done = service_env.run("backfill", timeout_s=60)
        assert done.returncode == 1
        assert "401" in done.stderr and "GITLAB_PRIVATE_TOKEN" in done.stderr


# -- the engine: SAQ on Redis, Kafka -----------------------------------------------------------
def engine_env(service_env: ServiceRun, url: str, broker: Broker, redis_address: str,
               prefix: str) -> str:
    topics = f"objects-{uuid.uuid4().hex[:8]}"
    service_env.env.update({
        "GITLAB_BASE_URL": f"{url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_OBJECT_TOPIC_PREFIX": topics,
        "REDIS_ADDRESS": redis_address, "REDIS_KEY_PREFIX": prefix,
        "BACKFILL_WAITER_INTERVAL": "0.2", "BACKFILL_JOB_HEARTBEAT": "3",
    })
    return topics


@pytest.fixture
def saq_keys(redis_address: str, redis_prefix: str) -> object:
    """SAQ's keys of this test's queue (``saq:<prefix>backfill:...``) go too."""
    import redis

    yield None
    host, _, port = redis_address.rpartition(":")
    client = redis.Redis(host=host, port=int(port), db=13)
    keys = [*client.scan_iter(f"saq:{redis_prefix}*", count=1000),
            *client.scan_iter(f"saq:abort:{redis_prefix}*", count=1000)]
    if keys:
        client.delete(*keys)


def kafka_counts(truth: dict[str, object]) -> dict[str, int]:
    return {kind: len(keys) for kind, keys in expected_keys(truth).items()}  # type: ignore[arg-type]


def test_engine_backfill_with_faults_and_429s_equals_the_ground_truth(
        service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str,
        saq_keys: object) -> None:
    with running_simulator(SPEC, fault_rate=0.05, rate_limit=60.0) as sim:
        topics = engine_env(service_env, sim.url, broker, redis_address, redis_prefix)
        done = service_env.run("backfill", timeout_s=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "job_rescheduled" in done.stderr  # 429s rescheduled the job, none failed it
        truth = ground_truth(sim.url)
        found = from_kafka(broker.bootstrap, topics, kafka_counts(truth))
        assert_matches(found, truth)
        assert found.repeats() == []
        again = service_env.run("backfill", timeout_s=120)
        assert again.returncode == 0, again.stderr[-2000:]
        assert from_kafka(broker.bootstrap, topics, kafka_counts(truth)).total == found.total


def test_two_workers_share_a_backfill_and_one_is_killed(
        service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str,
        saq_keys: object) -> None:
    spec = WorldSpec(projects=10, users=20, events=300, seed=15, objects_per_project=60,
                     feature_off_share=0.0)
    with running_simulator(spec) as sim:
        topics = engine_env(service_env, sim.url, broker, redis_address, redis_prefix)
        service_env.env["OPERATIONS_PER_SECOND"] = "100"
        def ports() -> dict[str, str]:  # each process serves its own metrics
            return {"METRICS_PORT": str(free_port()), "LOG_PORT": str(free_port())}

        survivor = ports()
        workers = [service_env.start("worker", **ports()), service_env.start("worker", **survivor)]
        backfill = service_env.start("backfill", BACKFILL_CONCURRENCY="2", **ports())
        wait_for(lambda: "Processing" in service_env.logs[0].read_text()
                 or "stage_started" in service_env.logs[0].read_text(), 60,
                 "the first worker at work")
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(10)
        try:
            assert backfill.wait(300) == 0, service_env.all_logs()[-3000:]
            metrics = httpx.get(f"http://127.0.0.1:{survivor['METRICS_PORT']}/metrics",
                                timeout=10).text
            imported = [line for line in metrics.splitlines()
                        if line.startswith("gitlab_producer_objects_imported_total{")]
            assert imported and sum(float(line.rsplit(" ", 1)[1]) for line in imported) > 0
            assert 'gitlab_producer_backfill_jobs_total{outcome="done"}' in metrics
        finally:
            workers[1].send_signal(signal.SIGTERM)
            try:
                workers[1].wait(20)
            except subprocess.TimeoutExpired:
                workers[1].kill()
        truth = ground_truth(sim.url)
        found = from_kafka(broker.bootstrap, topics, kafka_counts(truth))
        assert_matches(found, truth)
        assert all(kind in found.keys for kind in CHECKED if expected_keys(truth)[kind])


def test_attachments_linked_in_markdown_are_stored_and_announced(
        service_env: ServiceRun) -> None:
    import json
    import re
    from urllib.parse import unquote

    spec = WorldSpec(projects=3, users=10, events=100, seed=16, objects_per_project=80,
                     feature_off_share=0.0)
    store = service_env.cwd / "artifacts"
    with running_simulator(spec) as sim:
        embedded(service_env, sim.url, BACKFILL_ATTACHMENTS="true",
                 ARTIFACT_STORE_URL=f"file://{store}")
        done = service_env.run("backfill", timeout_s=240)
        assert done.returncode == 0, done.stderr[-3000:]
    out = service_env.cwd / "events.jsonl"
    linked: set[tuple[str, str, str]] = set()
    announced: set[str] = set()
    for line in out.read_text().splitlines():
        message = json.loads(line)
        kind = message["topic"].rsplit(".", 1)[1]
        if message["topic"].endswith(".artifacts"):
            announced.add(message["value"]["path"])
        elif kind in ("issues", "merge_requests", "notes", "releases"):
            pid = message["headers"]["project_id"]
            for secret, name in re.findall(r"/uploads/([0-9a-f]{32})/([^\s\"'()\[\]<>\\]+)",
                                           json.dumps(message["value"])):
                linked.add((pid, secret, unquote(name)))
    assert linked, "the simulated markdown links uploads"
    for pid, secret, name in linked:
        assert (store / pid / "uploads" / secret / name).is_file(), (pid, secret, name)
    assert announced == {f"uploads/{secret}/{name}" for _pid, secret, name in linked}


def test_failed_jobs_are_counted_shown_and_retried_by_the_next_run(
        service_env: ServiceRun) -> None:
    spec = WorldSpec(projects=4, users=10, events=100, seed=17, objects_per_project=60,
                     feature_off_share=0.0)
    with running_simulator(spec, fault_rate=0.3, fault_kinds=("error500",)) as sim:
        embedded(service_env, sim.url, GITLAB_MAX_RETRIES="0", BACKFILL_JOB_ATTEMPTS="1")
        first = service_env.run("backfill", timeout_s=240)
        assert first.returncode == 1, first.stderr[-2000:]  # some jobs failed: not complete
        summary = status_lines(service_env)[-1]
        assert int(str(summary["failed_jobs"])) > 0
        assert '"job_failed"' in first.stderr
        httpx.post(f"{sim.url}/_simulator/settings", json={"fault_rate": 0.0}, timeout=10
                   ).raise_for_status()
        second = service_env.run("backfill", timeout_s=240)
        assert second.returncode == 0, second.stderr[-3000:]
        assert status_lines(service_env)[-1]["failed_jobs"] == 0
        found = from_file(service_env.cwd / "events.jsonl")
        assert_matches(found, ground_truth(sim.url))
        assert found.repeats() == []  # the retry produced only what was missing


def test_engine_backfill_killed_then_run_again_loses_nothing(
        service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str,
        saq_keys: object) -> None:
    spec = WorldSpec(projects=8, users=20, events=300, seed=18, objects_per_project=60,
                     feature_off_share=0.0)
    with running_simulator(spec) as sim:
        topics = engine_env(service_env, sim.url, broker, redis_address, redis_prefix)
        service_env.env["OPERATIONS_PER_SECOND"] = "100"
        proc = service_env.start("backfill")
        wait_for(lambda: service_env.logs[0].read_text().count('"stage_started"') > 20, 120,
                 "the import under way")
        proc.send_signal(signal.SIGKILL)  # jobs die mid-page; the queue keeps them "active"
        proc.wait(10)
        done = service_env.run("backfill", timeout_s=300)
        assert done.returncode == 0, done.stderr[-3000:]
        truth = ground_truth(sim.url)
        found = from_kafka(broker.bootstrap, topics, kafka_counts(truth))
        assert_matches(found, truth)
        assert len(found.repeats()) <= 8 * 100  # at most the pages in flight at the kill
