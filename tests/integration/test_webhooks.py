"""The real-time path on the running service: webhooks into Kafka, captures into the store."""

from __future__ import annotations

import hashlib
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from gitlab_producer.simulator.repository import FILE_PATHS, file_content, members
from gitlab_producer.simulator.server import SimulatorThread, free_port, running_simulator
from gitlab_producer.simulator.webhooks import HOOK_KINDS
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import Broker, ServiceRun, consume, wait_for_port
from tests.waits import wait_until

pytestmark = pytest.mark.integration
SECRET = "hook-secret-123"
SPEC = WorldSpec(projects=30, users=40, events=200, seed=29)
PROJECT = 3


@pytest.fixture
def hooks(service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str
          ) -> Iterator[tuple[SimulatorThread, ServiceRun, str, str]]:
    topic = f"hooks-{uuid.uuid4().hex[:8]}"
    port = free_port()
    with running_simulator(SPEC) as sim:
        rules = [{"project": str(PROJECT), "branch": "main", "files": list(FILE_PATHS),
                  "artifacts": [{"job": "build"}]}]
        service_env.env.update({
            "GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_TOPIC": topic,
            "REDIS_ADDRESS": redis_address, "REDIS_KEY_PREFIX": redis_prefix,
            "WEBHOOK_PORT": str(port), "WEBHOOK_SECRET": SECRET,
            "WEBHOOK_MAX_BODY": "65536", "KAFKA_DELIVERY_TIMEOUT": "3",
            "ARTIFACT_STORE_URL": f"file://{service_env.cwd / 'artifacts'}",
            "CAPTURE_RULES": orjson.dumps(rules).decode(),
            "SCHEDULING_POLL_INTERVAL": "30",
        })
        proc = service_env.start("run")
        try:
            wait_for_port(port)
            yield sim, service_env, f"http://127.0.0.1:{port}", topic
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


def post(url: str, body: bytes, **headers: str) -> httpx.Response:
    base = {"X-Gitlab-Token": SECRET, "X-Gitlab-Event": "Issue Hook",
            "Content-Type": "application/json"}
    return httpx.post(f"{url}/webhooks/gitlab", content=body, headers={**base, **headers},
                      timeout=15)


def test_every_hook_kind_arrives_once(hooks: tuple[SimulatorThread, ServiceRun, str, str],
                                      broker: Broker) -> None:
    sim, _, url, topic = hooks
    sent = httpx.post(f"{sim.url}/_simulator/webhooks", timeout=120, json={
        "url": f"{url}/webhooks/gitlab", "token": SECRET, "retry_delay_s": 0.1}).json()
    deliveries = sent["deliveries"]
    assert len(deliveries) == len(HOOK_KINDS)
    assert all(d["delivered"] and d["attempts"] == [200] for d in deliveries)
    got = consume(broker.bootstrap, f"{topic}.hooks", len(HOOK_KINDS))
    keys = sorted(dict(m.headers())["idempotency_key"].decode() for m in got)
    assert keys == sorted(d["idempotency_key"] for d in deliveries)
    events = {dict(m.headers())["event"].decode() for m in got}
    assert events == {header for header, _ in HOOK_KINDS.values()}
    assert all(b"unknown" not in dict(m.headers()) for m in got)


def test_refused_deliveries_produce_nothing(
        hooks: tuple[SimulatorThread, ServiceRun, str, str], broker: Broker) -> None:
    _, _, url, topic = hooks
    body = orjson.dumps({"object_kind": "issue", "project": {"id": 1}})
    assert post(url, body, **{"X-Gitlab-Token": "wrong"}).status_code == 401
    assert post(url, body, **{"X-Gitlab-Token": ""}).status_code == 401
    assert post(url, b'{"object_kind": "issue", "x": "' + b"a" * 70_000 + b'"}'
                ).status_code == 413
    assert post(url, b'{"object_kind": ').status_code == 400
    assert post(url, body, **{"Idempotency-Key": "k-ok"}).status_code == 200
    got = consume(broker.bootstrap, f"{topic}.hooks", 1)
    assert [dict(m.headers())["idempotency_key"] for m in got] == [b"k-ok"]


def test_retried_delivery_is_produced_once_and_unknown_kinds_flagged(
        hooks: tuple[SimulatorThread, ServiceRun, str, str], broker: Broker) -> None:
    _, _, url, topic = hooks
    body = orjson.dumps({"object_kind": "issue", "project": {"id": 7}})
    first = post(url, body, **{"Idempotency-Key": "same", "X-Gitlab-Webhook-UUID": "a"})
    again = post(url, body, **{"Idempotency-Key": "same", "X-Gitlab-Webhook-UUID": "b"})
    assert (first.json(), again.json()) == ({"status": "delivered"}, {"status": "duplicate"})
    odd = post(url, orjson.dumps({"object_kind": "future_thing"}),
               **{"X-Gitlab-Event": "Future Hook", "Idempotency-Key": "odd"})
    assert odd.status_code == 200
    got = consume(broker.bootstrap, f"{topic}.hooks", 2)
    assert len(got) == 2
    issue = next(m for m in got if dict(m.headers())["idempotency_key"] == b"same")
    assert issue.key() == b"7" and issue.value() == body
    assert dict(issue.headers())["hook_uuid"] == b"a"
    flagged = next(m for m in got if dict(m.headers())["idempotency_key"] == b"odd")
    assert dict(flagged.headers())["unknown"] == b"1"


def test_broker_down_gives_503_then_the_retry_lands(
        hooks: tuple[SimulatorThread, ServiceRun, str, str], broker: Broker) -> None:
    _, _, url, topic = hooks
    body = orjson.dumps({"object_kind": "note", "project_id": 4})
    broker.pause()
    try:
        started = time.monotonic()
        refused = post(url, body, **{"Idempotency-Key": "outage"})
        assert refused.status_code == 503
        assert time.monotonic() - started < 10  # inside GitLab's webhook timeout
    finally:
        broker.resume()
    # GitLab's retries, a second apart, bounded.
    wait_until(lambda: post(url, body, **{"Idempotency-Key": "outage"}).status_code == 200,
               60, "a retried hook to be accepted", interval_s=1.0)
    got = consume(broker.bootstrap, f"{topic}.hooks", 1)
    outage = [m for m in got if dict(m.headers())["idempotency_key"] == b"outage"]
    assert len(outage) >= 1
    assert {m.value() for m in outage} == {body}


def _stored(env: ServiceRun, commit: str) -> dict[str, bytes]:
    root = env.cwd / "artifacts" / str(PROJECT) / commit
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_push_hook_captures_awkward_paths_byte_exact(
        hooks: tuple[SimulatorThread, ServiceRun, str, str], broker: Broker) -> None:
    _, env, url, topic = hooks
    commit = hashlib.sha1(b"push-1", usedforsecurity=False).hexdigest()
    push = {"object_kind": "push", "ref": "refs/heads/main", "checkout_sha": commit,
            "project_id": PROJECT, "project": {"id": PROJECT, "default_branch": "main"}}
    assert post(url, orjson.dumps(push), **{"X-Gitlab-Event": "Push Hook",
                                            "Idempotency-Key": "push-1"}).status_code == 200
    job = {"object_kind": "build", "build_status": "success", "build_name": "build",
           "build_id": 42, "sha": commit, "project_id": PROJECT}
    assert post(url, orjson.dumps(job), **{"X-Gitlab-Event": "Job Hook",
                                           "Idempotency-Key": "job-1"}).status_code == 200
    # By name: a write still in progress shows as a temporary file beside the final ones.
    wanted = {*FILE_PATHS, "artifacts/build.zip"}
    wait_until(lambda: wanted <= set(_stored(env, commit)), 30,
               "the captured files and artifacts to be stored", interval_s=0.2)
    stored = _stored(env, commit)
    for path in FILE_PATHS:
        assert stored[path] == file_content(PROJECT, path, commit), path
    assert stored["artifacts/build.zip"].startswith(b"PK")
    announced = consume(broker.bootstrap, f"{topic}.artifacts", len(FILE_PATHS) + 1)
    records = [orjson.loads(m.value()) for m in announced]
    assert {r["path"] for r in records} == {*FILE_PATHS, "artifacts/build.zip"}
    for record in records:
        data = stored[record["path"]]
        assert (record["size"], record["sha256"], record["commit"]) == (
            len(data), hashlib.sha256(data).hexdigest(), commit)
        assert record["url"].endswith(f"/{PROJECT}/{commit}/{record['path']}")
    leftovers = [p for p in (env.cwd / "artifacts").rglob("*.partial")]
    assert not leftovers


def test_capture_on_behalf_of_users(hooks: tuple[SimulatorThread, ServiceRun, str, str]
                                    ) -> None:
    sim, env, url, _ = hooks
    commit = hashlib.sha1(b"capture-2", usedforsecurity=False).hexdigest()
    levels = dict(members(PROJECT, SPEC.users))
    reporter = next(u for u, level in levels.items() if level >= 20 and u != 1)
    stranger = next(u for u in range(2, SPEC.users + 1) if u not in levels)
    guest = next(u for u, level in levels.items() if level < 20)
    for user, allowed in ((reporter, True), (stranger, False), (guest, False)):
        done = env.run("capture", "--project", str(PROJECT), "--ref", commit,
                       "--as-user", f"user{user}")
        assert (done.returncode == 0) is allowed, done.stderr[-2000:]
        if not allowed:
            assert "Reporter" in done.stderr
    assert _stored(env, commit)["lib/class.rb"] == file_content(PROJECT, "lib/class.rb", commit)
    refused = httpx.post(f"{url}/capture", headers={"X-Gitlab-Token": SECRET}, json={
        "project": str(PROJECT), "ref": commit, "as_user": f"user{stranger}"})
    assert refused.status_code == 403
    allowed = httpx.post(f"{url}/capture", headers={"X-Gitlab-Token": SECRET}, json={
        "project": str(PROJECT), "ref": commit, "as_user": f"user{reporter}"}, timeout=30)
    assert allowed.status_code == 200
    assert all(item["skipped"] for item in allowed.json()["stored"])  # stored already
    assert httpx.post(f"{url}/capture", json={"project": "3", "ref": commit}).status_code == 401
    assert sim.sim.control.stats.token_in_query == 0


def test_unreadable_projects_are_named_at_start(service_env: ServiceRun, tmp_path: Path
                                                ) -> None:
    with running_simulator(SPEC) as sim:
        rules = [{"project": "10", "files": ["README.md"]},
                 {"project": "4", "files": ["README.md"]}]
        port = free_port()
        proc = service_env.start("run", GITLAB_BASE_URL=f"{sim.url}/api/v4",
                                 GITLAB_PRIVATE_TOKEN="sim-token", WEBHOOK_PORT=str(port),
                                 WEBHOOK_SECRET=SECRET, CAPTURE_RULES=orjson.dumps(rules).decode(),
                                 SCHEDULING_POLL_INTERVAL="30")
        try:
            wait_for_port(port)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
    unreadable = [orjson.loads(line) for line in service_env.all_logs().splitlines()
                  if "capture_project_unreadable" in line]
    assert [u["project"] for u in unreadable] == ["10"]  # project 10: no service account
