"""The webhook receiver against hostile or broken clients, on the running service process:
undecodable header bytes, replays of signed hooks, stalled and oversized bodies, a slow
broker."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from gitlab_producer.simulator.server import SimulatorThread, free_port, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import ServiceRun, running_broker, wait_for_port

pytestmark = pytest.mark.integration
SECRET = "fuzz-secret-9f3"
SIGNING = "signing-key-77"
SPEC = WorldSpec(projects=5, users=5, events=20, seed=3)
BODY = b'{"object_kind":"issue","project":{"id":1}}'
FUZZED = [b"X-Gitlab-Token", b"X-Gitlab-Event", b"Idempotency-Key", b"webhook-id",
          b"webhook-timestamp", b"webhook-signature", b"X-Gitlab-Webhook-UUID",
          b"X-Gitlab-Event-UUID", b"X-Gitlab-Instance", b"Content-Type", b"X-Other"]


def raw_exchange(port: int, request: bytes, timeout_s: float = 10.0) -> tuple[int, bytes]:
    """Send ``request`` as it is on a fresh connection; the status and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout_s) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def raw_request(headers: list[tuple[bytes, bytes]], body: bytes = BODY) -> bytes:
    lines = [b"POST /webhooks/gitlab HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close",
             b"Content-Length: %d" % len(body), *(k + b": " + v for k, v in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def junk(rng: random.Random) -> bytes:
    """A few random bytes, high ones (not UTF-8) more often than not, never CR or LF."""
    alphabet = [b for b in range(256) if b not in (10, 13)]
    data = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
    return data + bytes([rng.randint(0x80, 0xFF)]) if rng.random() < 0.5 else data


def fuzzed(rng: random.Random, secret: bytes) -> tuple[bytes, str]:
    """A hook with random bytes in one header's value or name; what was fuzzed."""
    headers = {b"X-Gitlab-Token": secret, b"X-Gitlab-Event": b"Issue Hook",
               b"Content-Type": b"application/json",
               b"Idempotency-Key": b"fz-%d" % rng.randrange(10**9)}
    if rng.random() < 0.8:
        name = rng.choice(FUZZED)
        value = headers.get(name, b"")
        cut = rng.randint(0, len(value))
        headers[name] = value[:cut] + junk(rng) + value[cut:]
        what = name.decode()
    else:
        headers[junk(rng)] = b"v"
        what = "name"
    return raw_request(list(headers.items())), what


@pytest.fixture
def receiver(service_env: ServiceRun) -> Iterator[tuple[ServiceRun, int]]:
    """The service with webhooks on the file sink and the SQLite store."""
    port = free_port()
    with running_simulator(SPEC) as sim:
        proc = service_env.start(
            "run", GITLAB_BASE_URL=f"{sim.url}/api/v4", GITLAB_PRIVATE_TOKEN="sim-token",
            WEBHOOK_PORT=str(port), WEBHOOK_SECRET=SECRET, SCHEDULING_POLL_INTERVAL="30",
            WEBHOOK_BODY_TIMEOUT="2", WEBHOOK_MAX_BODY="1048576")
        try:
            wait_for_port(port)
            yield service_env, port
            assert proc.poll() is None, "the service died"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


def test_fuzzed_header_bytes_get_400_or_401_never_5xx(receiver: tuple[ServiceRun, int]
                                                       ) -> None:
    env, port = receiver
    rng = random.Random(20261201)
    statuses: Counter[tuple[int, str]] = Counter()
    for _ in range(300):
        request, what = fuzzed(rng, SECRET.encode())
        status, body = raw_exchange(port, request)
        assert status < 500, (request, body)
        assert body.startswith(b"{"), (request, status, body)
        assert isinstance(orjson.loads(body)["status"], str), body  # JSON, with a reason
        assert SECRET.encode() not in body
        statuses[status, what] += 1
    token_fuzzed = sum(n for (status, what), n in statuses.items() if what == "X-Gitlab-Token")
    assert statuses[401, "X-Gitlab-Token"] + statuses[400, "X-Gitlab-Token"] == token_fuzzed > 0
    assert statuses[401, "X-Gitlab-Token"] > 0
    for header in ("Idempotency-Key", "webhook-id", "X-Gitlab-Webhook-UUID"):
        assert statuses[400, header] > 0
    # Pinned cases: the undecodable bytes the parser lets through.
    for name in (b"X-Gitlab-Event", b"Idempotency-Key", b"X-Gitlab-Event-UUID", b"X-Other"):
        request = raw_request([(b"X-Gitlab-Token", SECRET.encode()), (name, b"a\xff\xed")])
        assert raw_exchange(port, request) == (400, b'{"status": "headers must be UTF-8"}')
    request = raw_request([(b"X-Gitlab-Token", SECRET.encode() + b"\xe9")])
    assert raw_exchange(port, request)[0] == 401
    request = raw_request([(b"X-Gitlab-Token", SECRET.encode() + b"\x01")])
    assert raw_exchange(port, request) == (400, b'{"status": "malformed request"}')
    logs = env.all_logs()
    assert "Traceback" not in logs and SECRET not in logs
    health = httpx.get(f"http://127.0.0.1:{env.env['METRICS_PORT']}/healthz", timeout=5)
    assert health.status_code == 200


def test_stalled_and_oversized_bodies_are_answered_at_once(receiver: tuple[ServiceRun, int]
                                                           ) -> None:
    _, port = receiver
    headers = [(b"X-Gitlab-Token", SECRET.encode()), (b"X-Gitlab-Event", b"Issue Hook")]
    started = time.monotonic()
    request = raw_request(headers, b"x" * 2_000_000)  # Content-Length over WEBHOOK_MAX_BODY
    with socket.create_connection(("127.0.0.1", port), 10) as conn:
        conn.sendall(request.split(b"\r\n\r\n")[0] + b"\r\n\r\n{}")
        status = conn.recv(65536).split(b" ", 2)[1]
    assert status == b"413" and time.monotonic() - started < 1.5
    # A body that stops coming: 408 at WEBHOOK_BODY_TIMEOUT (2 s), not held open.
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), 10) as conn:
        conn.sendall(raw_request(headers, b"y" * 500_000).split(b"\r\n\r\n")[0]
                     + b"\r\n\r\n{\"a")
        answer = b""
        while chunk := conn.recv(65536):  # the server closes after answering
            answer += chunk
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert answer.endswith(b'{"status": "body not received in time"}')
    assert 1.5 < elapsed < 5


def sign(webhook_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(SIGNING.encode(), f"{webhook_id}.{timestamp}.".encode() + body,
                      hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def test_signed_hook_replayed_with_a_fresh_key_is_not_produced_again(
        service_env: ServiceRun) -> None:
    port = free_port()
    events = service_env.cwd / "events.jsonl"
    with running_simulator(SPEC) as sim:
        env = {"GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
               "WEBHOOK_PORT": str(port), "WEBHOOK_SECRET": SECRET,
               "WEBHOOK_SIGNING_TOKEN": SIGNING, "SCHEDULING_POLL_INTERVAL": "30",
               "OUTPUT_FILE": str(events), "SYNC_USERS": "false"}
        now = int(time.time())
        headers = {"X-Gitlab-Token": SECRET, "X-Gitlab-Event": "Issue Hook",
                   "webhook-id": "wh-1", "webhook-timestamp": str(now),
                   "webhook-signature": sign("wh-1", now, BODY)}
        url = f"http://127.0.0.1:{port}/webhooks/gitlab"
        answers = []
        for restart in range(2):  # the webhook-id is remembered across a restart too
            proc = service_env.start("run", **env)
            try:
                wait_for_port(port)
                for attempt in range(2):
                    key = f"fresh-{restart}-{attempt}"
                    answers.append(httpx.post(url, content=BODY, timeout=10, headers={
                        **headers, "Idempotency-Key": key}).json()["status"])
                other = {**headers, "webhook-id": "wh-2",
                         "webhook-signature": sign("wh-2", now, BODY)}
                answers.append(httpx.post(url, content=BODY, timeout=10, headers={
                    **other, "Idempotency-Key": f"other-{restart}"}).json()["status"])
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(15)
    assert answers == ["delivered", "duplicate", "delivered",
                       "duplicate", "duplicate", "duplicate"]
    hooks = [orjson.loads(line) for line in events.read_bytes().splitlines()
             if b"idempotency_key" in line]
    assert [h["headers"]["idempotency_key"] for h in hooks] == ["fresh-0-0", "other-0"]


def metric(metrics_port: str, sample: str) -> float:
    """One sample of the service's metrics (0 when not exported yet)."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    line = next((x for x in text.splitlines() if x.startswith(sample + " ")), None)
    return 0.0 if line is None else float(line.split()[1])


def inflight_bytes(metrics_port: str) -> float:
    return metric(metrics_port, "gitlab_producer_webhook_inflight_bytes")


def test_slow_broker_gets_503_within_gitlab_timeout_and_bodies_wait_their_turn(
        service_env: ServiceRun, tmp_path: Path) -> None:
    """A broker that stops answering (SIGSTOP, a broker of this test's own): the hook gets
    503 after WEBHOOK_DELIVERY_TIMEOUT, not after KAFKA_DELIVERY_TIMEOUT (300 s); a body that
    does not fit in WEBHOOK_MAX_INFLIGHT_BYTES meanwhile waits, then gets 503 with
    Retry-After; once the broker is back, the retry lands."""
    port = free_port()
    big = orjson.dumps({"object_kind": "note", "project_id": 2, "x": "a" * 900_000})
    small = orjson.dumps({"object_kind": "note", "project_id": 2, "x": "b" * 200_000})
    headers = {"X-Gitlab-Token": SECRET, "X-Gitlab-Event": "Note Hook"}
    url = f"http://127.0.0.1:{port}/webhooks/gitlab"
    with running_simulator(SPEC) as sim, running_broker(tmp_path) as broker:
        proc = service_env.start(
            "run", GITLAB_BASE_URL=f"{sim.url}/api/v4", GITLAB_PRIVATE_TOKEN="sim-token",
            KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap, KAFKA_TOPIC="slow",
            WEBHOOK_PORT=str(port), WEBHOOK_SECRET=SECRET, SCHEDULING_POLL_INTERVAL="30",
            WEBHOOK_MAX_BODY="1048576", WEBHOOK_MAX_INFLIGHT_BYTES="1048576",
            WEBHOOK_BODY_TIMEOUT="2", SYNC_USERS="false")
        try:
            wait_for_port(port)
            broker.pause()
            with ThreadPoolExecutor(1) as pool:
                started = time.monotonic()
                first = pool.submit(httpx.post, url, content=big, timeout=30,
                                    headers={**headers, "Idempotency-Key": "slow-1"})
                deadline = time.monotonic() + 10
                while inflight_bytes(service_env.env["METRICS_PORT"]) < len(big):
                    assert time.monotonic() < deadline, "the first body was never held"
                busy_started = time.monotonic()
                busy = httpx.post(url, content=small, timeout=30,
                                  headers={**headers, "Idempotency-Key": "slow-2"})
                busy_took = time.monotonic() - busy_started
                refused = first.result()
                took = time.monotonic() - started
            broker.resume()
            assert (busy.status_code, busy.headers.get("Retry-After")) == (503, "5")
            assert busy.json() == {"status": "busy, retry"}
            assert 1.5 < busy_took < 5
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
            assert took < 9.5  # GitLab gives up at 10 s
            landed = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                landed = httpx.post(url, content=big, timeout=30,
                                    headers={**headers, "Idempotency-Key": "slow-1"})
                if landed.status_code == 200:
                    break
            assert landed is not None and landed.status_code == 200
        finally:
            broker.resume()
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


RULES = [{"project": "3", "branch": "main", "files": ["README.md", "no/such-file.txt"],
          "artifacts": [{"job": "build"}]}]
COMMIT = hashlib.sha1(b"capture-outcomes", usedforsecurity=False).hexdigest()
Capturing = tuple[ServiceRun, str, SimulatorThread, "subprocess.Popen[bytes]"]


def push(project: int) -> bytes:
    return orjson.dumps({"object_kind": "push", "ref": "refs/heads/main", "checkout_sha": COMMIT,
                         "project_id": project, "project": {"id": project}})


@pytest.fixture
def capturing(service_env: ServiceRun, request: pytest.FixtureRequest) -> Iterator[Capturing]:
    """The service with a capture rule for project 3 that names a file GitLab lacks;
    SHUTDOWN_GRACE 2 s unless the test passes another (indirect parametrization)."""
    port = free_port()
    grace = str(getattr(request, "param", 2))
    with running_simulator(SPEC) as sim:
        proc = service_env.start(
            "run", GITLAB_BASE_URL=f"{sim.url}/api/v4", GITLAB_PRIVATE_TOKEN="sim-token",
            WEBHOOK_PORT=str(port), WEBHOOK_SECRET=SECRET, SCHEDULING_POLL_INTERVAL="30",
            CAPTURE_RULES=orjson.dumps(RULES).decode(), SHUTDOWN_GRACE=grace,
            GITLAB_MAX_RETRIES="0", SYNC_USERS="false", GITLAB_TIMEOUT="20",
            WEBHOOK_BODY_TIMEOUT="1",
            ARTIFACT_STORE_URL=f"file://{service_env.cwd / 'artifacts'}")
        try:
            wait_for_port(port)
            yield service_env, f"http://127.0.0.1:{port}", sim, proc
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


def hook(url: str, body: bytes, event: str, key: str) -> int:
    return httpx.post(f"{url}/webhooks/gitlab", content=body, timeout=10, headers={
        "X-Gitlab-Token": SECRET, "X-Gitlab-Event": event, "Idempotency-Key": key}).status_code


def test_hook_captures_are_counted_by_outcome_and_failures_logged(
        capturing: Capturing) -> None:
    env, url, _, _ = capturing
    job = orjson.dumps({"object_kind": "build", "build_status": "success", "build_name": "build",
                        "build_id": 7, "sha": COMMIT, "project_id": 3})
    assert hook(url, push(3), "Push Hook", "p3") == 200  # a file is missing: failed
    assert hook(url, push(4), "Push Hook", "p4") == 200  # no rule for project 4: ignored
    assert hook(url, job, "Job Hook", "j3") == 200  # the rule's job: captured
    assert hook(url, orjson.dumps({"object_kind": "issue"}), "Issue Hook", "i1") == 200
    port = env.env["METRICS_PORT"]
    expected = {"failed": 1, "ignored": 2, "captured": 1}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        counts = {o: metric(port, f'gitlab_producer_captures_total{{outcome="{o}"}}')
                  for o in expected}
        if counts == expected:
            break
    assert counts == expected
    assert metric(port, "gitlab_producer_captures_pending") == 0
    failures = [orjson.loads(line) for line in env.all_logs().splitlines()
                if '"capture_failed"' in line]
    assert len(failures) == 1
    assert (failures[0]["project"], failures[0]["commit"]) == (3, COMMIT)
    assert failures[0]["level"] == "warning" and "not found" in failures[0]["error"]


def test_capture_endpoint_refuses_projects_without_a_rule_and_bad_fields(
        capturing: Capturing) -> None:
    _, url, _, _ = capturing
    auth = {"X-Gitlab-Token": SECRET}
    no_rule = httpx.post(f"{url}/capture", headers=auth, timeout=10,
                         json={"project": "4", "ref": COMMIT})
    assert (no_rule.status_code, no_rule.json()) == (
        403, {"error": "no capture rule for project 4"})
    for fields in ({"project": "3", "ref": COMMIT, "as_user": ""},
                   {"project": "3", "ref": COMMIT, "as_user": 12},
                   {"project": "3"}, {"project": ["3"], "ref": COMMIT}):
        answer = httpx.post(f"{url}/capture", headers=auth, timeout=10, json=fields)
        assert answer.status_code == 400 and answer.json()["error"], fields
    port = int(url.rsplit(":", 1)[1])
    body = orjson.dumps({"project": "3", "ref": COMMIT})
    request = (b"POST /capture HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
               b"Content-Length: %d\r\nX-Gitlab-Token: %s\xe9\r\n\r\n" % (
                   len(body), SECRET.encode())) + body
    assert raw_exchange(port, request) == (401, b'{"error": "bad token"}')
    stalled = (b"POST /capture HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
               b"Content-Length: 100\r\nX-Gitlab-Token: %s\r\n\r\n{}" % SECRET.encode())
    started = time.monotonic()
    assert raw_exchange(port, stalled) == (408, b'{"error": "body not received in time"}')
    assert time.monotonic() - started < 4


def test_captures_still_running_at_shutdown_are_reported(
        capturing: Capturing) -> None:
    env, url, sim, proc = capturing
    control = sim.sim.control
    control.fault_kinds, control.slow_s, control.fault_rate = ("slow",), 30.0, 1.0
    assert hook(url, push(3), "Push Hook", "slow-push") == 200
    port = env.env["METRICS_PORT"]
    deadline = time.monotonic() + 10
    while metric(port, "gitlab_producer_captures_pending") < 1:
        assert time.monotonic() < deadline, "the capture never started"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)
    assert time.monotonic() - started < 8  # SHUTDOWN_GRACE 2 s, then the report
    control.fault_rate = 0.0
    report = [orjson.loads(line) for line in env.all_logs().splitlines()
              if '"webhook_work_abandoned"' in line]
    assert len(report) == 1
    assert report[0]["captures"] == 1 and report[0]["abandoned"] == [f"3@{COMMIT}"]


@pytest.mark.parametrize("capturing", [8], indirect=True)
def test_captures_running_at_shutdown_finish_within_the_grace(capturing: Capturing) -> None:
    env, url, sim, proc = capturing
    control = sim.sim.control
    control.fault_kinds, control.slow_s, control.fault_rate = ("slow",), 1.0, 1.0
    assert hook(url, push(3), "Push Hook", "slowish-push") == 200
    port = env.env["METRICS_PORT"]
    deadline = time.monotonic() + 10
    while metric(port, "gitlab_producer_captures_pending") < 1:
        assert time.monotonic() < deadline, "the capture never started"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)
    assert time.monotonic() - started < 12  # SHUTDOWN_GRACE 8 s at most, then the flush
    control.fault_rate = 0.0
    logs = env.all_logs()
    assert '"webhook_work_abandoned"' not in logs and '"webhook_work_finished"' in logs
    stored = env.cwd / "artifacts" / "3" / COMMIT / "README.md"
    assert stored.is_file()  # fetched during the grace (the rule's other file is missing)
