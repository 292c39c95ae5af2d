"""Hardening II on the running service: what an attacker (or a careless operator) tried."""

from __future__ import annotations

import hashlib
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from gitlab_producer.simulator.repository import FILE_PATHS
from gitlab_producer.simulator.server import SimulatorThread, free_port, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import Broker, ServiceRun, wait_for_port

pytestmark = pytest.mark.integration
SECRET = "hook-secret-456"
SPEC = WorldSpec(projects=20, users=30, events=150, seed=31)
PROJECT = 3


def wait_for(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout_s} s")


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@dataclass
class Hooked:
    sim: SimulatorThread
    env: ServiceRun
    url: str
    topic: str
    store: Path


@pytest.fixture
def hooked(service_env: ServiceRun, broker: Broker) -> Iterator[Hooked]:
    topic = f"sec-{uuid.uuid4().hex[:8]}"
    port = free_port()
    # Deep enough that a '../../..' escape still lands inside this test's own folder.
    store = service_env.cwd / "a" / "b" / "c" / "store"
    with running_simulator(SPEC) as sim:
        rules = [{"project": str(PROJECT), "branch": "main", "files": list(FILE_PATHS),
                  "artifacts": [{"job": "build"}]}]
        service_env.env.update({
            "GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_TOPIC": topic,
            "WEBHOOK_PORT": str(port), "WEBHOOK_SECRET": SECRET,
            "ARTIFACT_STORE_URL": f"file://{store}",
            "CAPTURE_RULES": orjson.dumps(rules).decode(), "SCHEDULING_POLL_INTERVAL": "30",
        })
        proc = service_env.start("run")
        try:
            wait_for_port(port)
            yield Hooked(sim, service_env, f"http://127.0.0.1:{port}", topic, store)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


def hook(url: str, payload: dict[str, object], event: str) -> httpx.Response:
    return httpx.post(f"{url}/webhooks/gitlab", content=orjson.dumps(payload), timeout=15,
                      headers={"X-Gitlab-Token": SECRET, "X-Gitlab-Event": event,
                               "Idempotency-Key": uuid.uuid4().hex})


# -- path traversal ---------------------------------------------------------------------------
@pytest.mark.parametrize("sha", ["../../../escaped", "../../../../escaped-too",
                                 "/tmp/absolute", "0" * 39 + "/", "main"])
def test_a_job_hook_with_a_traversal_sha_writes_nothing(hooked: Hooked, sha: str) -> None:
    before = files_under(hooked.env.cwd)
    job = {"object_kind": "build", "build_status": "success", "build_name": "build",
           "build_id": 42, "sha": sha, "project_id": PROJECT}
    push = {"object_kind": "push", "ref": "refs/heads/main", "checkout_sha": sha,
            "project_id": PROJECT, "project": {"id": PROJECT, "default_branch": "main"}}
    assert hook(hooked.url, job, "Job Hook").status_code == 200  # the event itself is kept
    assert hook(hooked.url, push, "Push Hook").status_code == 200

    def written() -> set[Path]:
        return {p for p in files_under(hooked.env.cwd) - before
                if not p.name.startswith("service-")}

    wait_for(lambda: hooked.env.all_logs().count('"capture_refused"') >= 2 or bool(written()))
    assert written() == set()
    assert not Path("/tmp/absolute").exists()
    # A well-formed commit still captures, and only under the store.
    good = hashlib.sha1(sha.encode(), usedforsecurity=False).hexdigest()
    assert hook(hooked.url, {**job, "sha": good}, "Job Hook").status_code == 200
    wait_for(lambda: (hooked.store / str(PROJECT) / good / "artifacts" / "build.zip").exists())
    assert all(p.is_relative_to(hooked.store) for p in written())


def test_capture_requests_with_a_bad_ref_are_a_clear_400(hooked: Hooked) -> None:
    for ref in ("../../../escaped", "main", "a" * 41):
        answer = httpx.post(f"{hooked.url}/capture", headers={"X-Gitlab-Token": SECRET},
                            json={"project": str(PROJECT), "ref": ref}, timeout=15)
        assert answer.status_code == 400, answer.text
        assert "40 or 64 hexadecimal" in answer.json()["error"]
    done = hooked.env.run("capture", "--project", str(PROJECT), "--ref", "../../x")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "40 or 64 hexadecimal" in done.stderr
    assert not (hooked.env.cwd / "a" / "b" / "x").exists()
