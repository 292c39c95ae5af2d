"""Hardening II on the running service: what an attacker (or a careless operator) tried."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from gitlab_producer.simulator.repository import FILE_PATHS
from gitlab_producer.simulator.server import SimulatorThread, free_port, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import Broker, OwnRedis, ServiceRun, consume, wait_for_port

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


# -- GitLab answers: links, redirects, sizes ----------------------------------------------------
@contextlib.contextmanager
def trap() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A loopback HTTP server that records every request it gets (nothing should)."""
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(dict(self.headers))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def one_round(env: ServiceRun, sim: SimulatorThread, **extra: str
              ) -> subprocess.CompletedProcess[str]:
    since = datetime.fromtimestamp(sim.sim.world.start_ms / 1000, UTC).isoformat()
    values = {"GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
              "SYNC_SINCE": since, "GITLAB_MAX_RETRIES": "1",
              "GITLAB_PER_PAGE_PAGINATION": "2", **extra}
    return env.run("run", "--once", timeout_s=90, **values)


def log_events(output: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("link", ["{trap}/api/v4", "https://127.0.0.1:{sim_port}/api/v4"])
def test_pagination_links_to_another_origin_are_not_followed(service_env: ServiceRun,
                                                             link: str) -> None:
    with trap() as (trap_url, seen), running_simulator(SPEC) as sim:
        httpx.post(f"{sim.url}/_simulator/settings", json={"link_base": link.format(
            trap=trap_url, sim_port=sim.url.rsplit(":", 1)[1])})
        done = one_round(service_env, sim)
    assert done.returncode == 1  # the round could not complete, and says why
    assert "Traceback" not in done.stderr
    refused = [e for e in log_events(done.stderr + done.stdout)
               if "another origin" in str(e.get("error", ""))]
    assert refused, done.stderr[-3000:]
    assert seen == []  # the token went nowhere else
    assert "sim-token" not in done.stderr + done.stdout


@pytest.mark.parametrize("where", ["{trap}/steal", "http://169.254.169.254/latest/meta-data/"])
def test_redirects_are_never_followed(service_env: ServiceRun, where: str) -> None:
    with trap() as (trap_url, seen), running_simulator(SPEC) as sim:
        target = where.format(trap=trap_url)
        httpx.post(f"{sim.url}/_simulator/settings", json={"redirect_to": target})
        done = one_round(service_env, sim)
        retried = sim.sim.control.stats.by_route_status
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert seen == []
    text = done.stderr + done.stdout
    assert f"a redirect to {target.split('/')[2]}: not followed" in text, text[-3000:]
    assert sum(retried.values()) <= 3  # a redirect is an answer, not worth retrying


def test_oversize_answers_are_refused_not_held(service_env: ServiceRun) -> None:
    with running_simulator(SPEC) as sim:
        httpx.post(f"{sim.url}/_simulator/settings", json={"pad_bytes": 200_000})
        done = one_round(service_env, sim, GITLAB_MAX_BODY="65536")
        httpx.post(f"{sim.url}/_simulator/settings", json={"pad_bytes": 30_000})
        fits = one_round(service_env, sim, GITLAB_MAX_BODY="65536")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "more than the 65536 allowed" in done.stderr + done.stdout
    assert fits.returncode == 0, fits.stderr[-3000:]  # under the cap: read as usual


# -- secrets --------------------------------------------------------------------------------------
def test_url_credentials_are_masked_and_never_reach_a_header(service_env: ServiceRun,
                                                            broker: Broker) -> None:
    topic = f"sec-src-{uuid.uuid4().hex[:8]}"
    with running_simulator(SPEC) as sim:
        host = sim.url.removeprefix("http://")
        base = f"http://robot:url-pass-1@{host}/api/v4"
        shown = service_env.run("check-config", GITLAB_BASE_URL=base,
                                GITLAB_PRIVATE_TOKEN="sim-token",
                                REDIS_ADDRESS="redis://:redis-pw-2@127.0.0.1:6379")
        assert shown.returncode == 0, shown.stderr
        config = orjson.loads(shown.stdout)
        assert config["GITLAB_BASE_URL"] == f"http://***@{host}/api/v4"
        assert config["REDIS_ADDRESS"] == "redis://***@127.0.0.1:6379"
        assert "url-pass-1" not in shown.stdout and "redis-pw-2" not in shown.stdout
        done = one_round(service_env, sim, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
                         KAFKA_TOPIC=topic, LOG_LEVEL="debug", GITLAB_BASE_URL=base,
                         GITLAB_PER_PAGE_PAGINATION="100")
        assert done.returncode == 0, done.stderr[-3000:]
        truth = httpx.get(f"{sim.url}/_simulator/truth").json()["count"]
    got = consume(broker.bootstrap, topic, truth)
    assert len(got) == truth > 0
    assert {dict(m.headers())["source"] for m in got} == {host.encode()}
    assert "url-pass-1" not in done.stderr + done.stdout


def test_secrets_are_scrubbed_however_nested() -> None:
    from gitlab_producer.logs import LogControl

    control = LogControl()
    for secret in ("hook-secret-9", "signing-token-9"):
        control.add_secret(secret)
    event = {"event": "x", "deep": {"list": ["a hook-secret-9 b", ("signing-token-9",)]},
             "error": ValueError("failed with hook-secret-9"),
             "url": "https://user:pw-in-url@host/api/v4"}
    shown = orjson.dumps(control.scrub(None, "info", event)).decode()
    assert "hook-secret-9" not in shown and "signing-token-9" not in shown
    assert "pw-in-url" not in shown and "https://***@host/api/v4" in shown


def test_every_secret_setting_is_registered_for_scrubbing() -> None:
    from pydantic import SecretStr

    from gitlab_producer.config import Settings, load_settings

    secret_fields = [n for n, f in Settings.model_fields.items() if f.annotation is SecretStr]
    assert {"webhook_secret", "webhook_signing_token", "log_level_token"} <= set(secret_fields)
    values = {name: f"value-of-{name}" for name in secret_fields}
    settings = load_settings(None, gitlab_base_url="https://u:in-url-pw@g.test/api/v4",
                             **values)
    assert set(settings.secrets()) >= {*values.values(), "in-url-pw"}


# -- PUT /log_level ------------------------------------------------------------------------------
@pytest.mark.parametrize("token", ["", "level-token-7"])
def test_log_level_token(service_env: ServiceRun, token: str) -> None:
    with running_simulator(SPEC) as sim:
        extra = {"LOG_LEVEL_TOKEN": token} if token else {}
        proc = service_env.start("run", GITLAB_BASE_URL=f"{sim.url}/api/v4",
                                 GITLAB_PRIVATE_TOKEN="sim-token", **extra)
        try:
            log_url = f"http://127.0.0.1:{service_env.env['LOG_PORT']}/log_level"
            metrics = f"http://127.0.0.1:{service_env.env['METRICS_PORT']}"
            wait_for_port(int(service_env.env["LOG_PORT"]))
            plain = httpx.put(log_url, data={"level": "error"})  # curl -X PUT ... -d level=
            if not token:  # seed 000's plain call keeps working
                assert plain.status_code == 200 and plain.json() == {"level": "error"}
                return
            assert plain.status_code == 401 and "LOG_LEVEL_TOKEN" in plain.json()["error"]
            assert token not in plain.text
            wrong = httpx.put(log_url, data={"level": "error"},
                              headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert httpx.get(log_url).json() == {"level": "info"}  # unchanged
            bearer = httpx.put(log_url, data={"level": "warning"},
                               headers={"Authorization": f"Bearer {token}"})
            assert bearer.status_code == 200 and httpx.get(log_url).json() == {"level": "warning"}
            field = httpx.put(log_url, data={"level": "debug", "token": token})
            assert field.status_code == 200 and httpx.get(log_url).json() == {"level": "debug"}
            wait_for_port(int(service_env.env["METRICS_PORT"]))
            for path in ("/metrics", "/healthz"):  # still open to Prometheus, orchestrators
                assert httpx.get(metrics + path).status_code == 200
            assert httpx.get(metrics + "/readyz").status_code in (200, 503)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
    assert token not in service_env.all_logs() or not token


# -- bad configuration: exit 2, one line naming the variable, no traceback, no secret -----------
TOKEN = "tok-secret-value-3"
GOOD = {"GITLAB_BASE_URL": "https://gitlab.test/api/v4", "GITLAB_PRIVATE_TOKEN": TOKEN}
BAD_VALUES = [
    ("CAPTURE_RULES", "[{not json", "CAPTURE_RULES"),
    ("CACHE_TTL", "1e23", "CACHE_TTL"),
    ("CACHE_TTL", "1" + "0" * 23, "CACHE_TTL"),
    ("CACHE_TTL", "99999999999", "CACHE_TTL"),
    ("GITLAB_TIMEOUT", "inf", "GITLAB_TIMEOUT"),
    ("GITLAB_TIMEOUT", "nan", "GITLAB_TIMEOUT"),
    ("REDIS_DB", "99999", "REDIS_DB"),
    ("ARTIFACT_STORE_URL", "nosuch://", "ARTIFACT_STORE_URL"),
    ("SCHEDULING_POLL_INTERVAL", "inf", "SCHEDULING_POLL_INTERVAL"),
    ("OPERATIONS_PER_SECOND", "1e-300", "OPERATIONS_PER_SECOND"),
    ("OPERATIONS_PER_SECOND", "1e300", "OPERATIONS_PER_SECOND"),
    ("GITLAB_BASE_URL", "https://gitlab.test:99999/api/v4", "GITLAB_BASE_URL"),
    ("GITLAB_BASE_URL", "https://gitlab.test/api/v4#frag", "GITLAB_BASE_URL"),
    ("GITLAB_BASE_URL", f"https://u:{TOKEN}@gitlab.test:99999/api/v4", "GITLAB_BASE_URL"),
    ("REDIS_ADDRESS", "redis:99999", "REDIS_ADDRESS"),
    ("SYNC_OVERLAP", "inf", "SYNC_OVERLAP"),
    ("KAFKA_DELIVERY_TIMEOUT", "1e30", "KAFKA_DELIVERY_TIMEOUT"),
    ("SHUTDOWN_GRACE", "-1", "SHUTDOWN_GRACE"),
    ("WEBHOOK_MAX_SKEW", "inf", "WEBHOOK_MAX_SKEW"),
    ("GITLAB_MAX_BODY", "10", "GITLAB_MAX_BODY"),
    ("GITLAB_PRIVATE_TOKEN", f"{TOKEN}\r\nX-Evil: 1", "GITLAB_PRIVATE_TOKEN"),
    ("GITLAB_BASE_URL", "http://\udcff\udcfe/api/v4", "GITLAB_BASE_URL"),  # bytes ff fe
    ("REDIS_KEY_PREFIX", "\udcff", "REDIS_KEY_PREFIX"),
    ("KAFKA_BOOTSTRAP_SERVERS", "user:pw@127.0.0.1:9092", "KAFKA_BOOTSTRAP_SERVERS"),
    ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:99999", "KAFKA_BOOTSTRAP_SERVERS"),
    ("KAFKA_TOPIC", "bad topic/../x", "KAFKA_TOPIC"),
    ("METRICS_URL", "../../etc", "METRICS_URL"),
]


def assert_clear_config_error(done: subprocess.CompletedProcess[str], named: str,
                              at_start: bool = False) -> None:
    """Exit 2 and one ``config error:`` line; found at start (``at_start``), it may follow
    the JSON log lines of the start-up so far."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.splitlines()
    if not at_start:
        assert len(lines) == 1, done.stderr
    assert lines[-1].startswith("config error: ") and named in lines[-1], done.stderr
    assert done.stderr.count("config error") == 1
    assert TOKEN not in done.stderr + done.stdout


@pytest.mark.parametrize("name,value,named", BAD_VALUES)
def test_each_bad_setting_is_one_clear_line(service_env: ServiceRun, name: str, value: str,
                                            named: str) -> None:
    done = service_env.run("check-config", **{**GOOD, name: value})
    assert_clear_config_error(done, named)


@pytest.mark.parametrize("content,named", [
    (f"GITLAB_PRIVATE_TOKEN: {TOKEN}\nGITLAB_BASE_URL: [https://x\n".encode(), "line 3"),
    (f"GITLAB_PRIVATE_TOKEN: '{TOKEN}\n".encode(), "line"),
    (b"GITLAB_BASE_URL: https://gitlab.test/api/v4\nKAFKA_TOPIC: caf\xe9\n", "UTF-8"),
])
def test_a_broken_config_file_is_one_clear_line(service_env: ServiceRun, content: bytes,
                                                named: str) -> None:
    path = service_env.cwd / "conf.yaml"
    path.write_bytes(content)
    done = service_env.run("check-config", "--config", str(path))
    assert_clear_config_error(done, named)
    assert "column" in done.stderr or named == "UTF-8"


def test_a_missing_config_file_is_an_error(service_env: ServiceRun) -> None:
    done = service_env.run("run", "--config", "nowhere.yaml", **GOOD)
    assert_clear_config_error(done, "--config")


@pytest.mark.parametrize("variable", ["METRICS_PORT", "LOG_PORT", "WEBHOOK_PORT"])
def test_a_port_in_use_is_a_clear_error(service_env: ServiceRun, variable: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        # A GitLab that answers: the error is the port's, not one found after GitLab's retries.
        with running_simulator(SPEC, token=TOKEN) as sim:
            values = {**GOOD, "GITLAB_BASE_URL": f"{sim.url}/api/v4",
                      "WEBHOOK_SECRET": "hook-secret-x", "WEBHOOK_PORT": str(free_port()),
                      variable: port}
            done = service_env.run("run", "--once", **values)
    assert_clear_config_error(done, f"{variable}: port {port} is already in use", at_start=True)


def test_a_database_the_redis_server_refuses_is_a_clear_error(service_env: ServiceRun,
                                                              redis_address: str) -> None:
    databases = int(redis.Redis.from_url(f"redis://{redis_address}").config_get(
        "databases")["databases"])
    with running_simulator(SPEC, token=TOKEN) as sim:
        done = service_env.run("run", "--once", **{**GOOD, "GITLAB_BASE_URL": f"{sim.url}/api/v4"},
                               REDIS_ADDRESS=redis_address,
                               REDIS_DB=str(databases))  # one past the last
    assert_clear_config_error(done, "REDIS_DB: the Redis server refuses database",
                              at_start=True)


def test_a_password_the_redis_server_refuses_is_a_clear_error(service_env: ServiceRun,
                                                              own_redis: OwnRedis) -> None:
    """WRONGPASS and NOAUTH exit 2 naming REDIS_PASSWORD (no secret); an unreachable Redis is
    an outage, retried."""
    own_redis.password = "right-redis-pass"
    fast = {**GOOD, "REDIS_ADDRESS": own_redis.address, "GITLAB_MAX_RETRIES": "0"}
    waiting = service_env.start("run", "--once", **fast, REDIS_PASSWORD="right-redis-pass")
    try:
        wait_for(lambda: '"store_unreachable"' in service_env.all_logs(), 30)
        assert waiting.poll() is None  # still retrying
    finally:
        waiting.kill()
        waiting.wait(10)
    own_redis.start()
    for password, named in (("wrong-redis-pass", "REDIS_PASSWORD: the Redis server refuses"),
                            ("", "REDIS_PASSWORD: the Redis server requires a password")):
        done = service_env.run("run", "--once", timeout_s=30, **fast, REDIS_PASSWORD=password)
        assert_clear_config_error(done, named, at_start=True)
        assert "wrong-redis-pass" not in done.stderr + done.stdout
