"""Start-up on the real process: a bad configuration exits 2 at once, with one stderr line
naming the variable (no traceback, no secret), from every command, while GitLab does not
answer (its token check would take ~20 s of retries: the errors must not wait for it). A
stop signal during start-up is still honoured at once, and a broker that does not answer is
an outage, waited out, not a configuration error."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
import redis

from gitlab_producer.simulator.server import free_port, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.conftest import OwnBroker, OwnRedis, ServiceRun, consume
from tests.waits import wait_until

pytestmark = pytest.mark.integration
TOKEN = "tok-secret-start-5"
REDIS_PASS = "right-redis-pass-5"
WRONG_PASS = "wrong-redis-pass-5"
BOUND_S = 10  # every start-up error must end the process within this
SPEC = WorldSpec(projects=12, users=6, events=200, history_days=1.0, seed=43)


def unreachable_gitlab() -> dict[str, str]:
    """A GitLab that refuses connections: its token check retries for ~20 s."""
    return {"GITLAB_BASE_URL": f"http://127.0.0.1:{free_port()}/api/v4",
            "GITLAB_PRIVATE_TOKEN": TOKEN}


def run_bounded(env: ServiceRun, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    try:
        return env.run(*args, timeout_s=BOUND_S, **extra)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(args)} still running after {BOUND_S} s: the error "
                             f"waited for something else ({exc.stderr!r:.1500})") from None


def assert_one_line(done: subprocess.CompletedProcess[str], variable: str) -> None:
    """Exit 2 and exactly one stderr line, ``config error: VARIABLE: ...``, with no secret."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"config error: {variable}: "), lines[0]
    shown = done.stderr + done.stdout
    assert "Traceback" not in shown
    for secret in (TOKEN, REDIS_PASS, WRONG_PASS):
        assert secret not in shown


@contextlib.contextmanager
def taken_port() -> Iterator[str]:
    """A port another process listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield str(taken.getsockname()[1])


@pytest.fixture
def locked_redis(own_redis: OwnRedis) -> OwnRedis:
    """A Redis of the test's own that requires ``REDIS_PASS``."""
    own_redis.password = REDIS_PASS
    own_redis.start()
    return own_redis


PORT_CASES = [  # each port once, each command that serves one once
    (("run", "--once"), "METRICS_PORT"),
    (("run",), "WEBHOOK_PORT"),
    (("backfill",), "LOG_PORT"),
    (("worker",), "METRICS_PORT"),
]


@pytest.mark.parametrize("args,variable", PORT_CASES)
def test_a_port_in_use_exits_2_at_once(service_env: ServiceRun, redis_address: str,
                                       args: tuple[str, ...], variable: str) -> None:
    extra = {"WEBHOOK_SECRET": "hook-secret-s", "WEBHOOK_PORT": str(free_port())}
    if args[0] == "worker":
        extra["REDIS_ADDRESS"] = redis_address
    with taken_port() as port:
        done = run_bounded(service_env, *args, **{**unreachable_gitlab(), **extra,
                                                  variable: port})
    assert_one_line(done, variable)
    assert f"port {port} is already in use" in done.stderr


def test_the_webhook_port_is_checked_before_the_object_backfill(service_env: ServiceRun
                                                                ) -> None:
    with taken_port() as port:
        done = run_bounded(service_env, "run", **unreachable_gitlab(), SYNC_OBJECTS="true",
                           WEBHOOK_SECRET="hook-secret-s", WEBHOOK_PORT=port)
    assert_one_line(done, "WEBHOOK_PORT")


COMMANDS = [("run", "--once"), ("run",), ("backfill",), ("worker",), ("status",),
            ("instances",)]


PASSWORD_CASES = [  # every command refuses a wrong password; a missing one is the same path
    *((args, WRONG_PASS, "refuses it (WRONGPASS)") for args in COMMANDS),
    (("run", "--once"), "", "requires a password and none is set"),
]


@pytest.mark.parametrize("args,password,says", PASSWORD_CASES)
def test_a_password_redis_refuses_exits_2_at_once(service_env: ServiceRun,
                                                  locked_redis: OwnRedis, args: tuple[str, ...],
                                                  password: str, says: str) -> None:
    done = run_bounded(service_env, *args, **unreachable_gitlab(),
                       REDIS_ADDRESS=locked_redis.address, REDIS_PASSWORD=password)
    assert_one_line(done, "REDIS_PASSWORD")
    assert says in done.stderr


@pytest.mark.parametrize("args", [("run", "--once"), ("worker",)])
def test_a_database_redis_refuses_exits_2_at_once(service_env: ServiceRun, redis_address: str,
                                                  args: tuple[str, ...]) -> None:
    databases = int(redis.Redis.from_url(f"redis://{redis_address}").config_get(
        "databases")["databases"])
    done = run_bounded(service_env, *args, **unreachable_gitlab(),
                       REDIS_ADDRESS=redis_address, REDIS_DB=str(databases))  # one past the last
    assert_one_line(done, "REDIS_DB")
    assert f"refuses database {databases}" in done.stderr


@pytest.mark.parametrize("args", [("run", "--once"), ("backfill",), ("status",)])
def test_a_state_file_that_cannot_be_opened_exits_2(service_env: ServiceRun,
                                                    args: tuple[str, ...]) -> None:
    blocker = service_env.cwd / "a-file"
    blocker.write_text("")  # a file where the store's folder should be
    done = run_bounded(service_env, *args, **unreachable_gitlab(),
                       STATE_PATH=str(blocker / "state.sqlite3"))
    assert_one_line(done, "STATE_PATH")


@pytest.mark.parametrize("args", [("run", "--once"), ("backfill",)])
def test_an_output_file_that_cannot_be_opened_exits_2(service_env: ServiceRun,
                                                      args: tuple[str, ...]) -> None:
    blocker = service_env.cwd / "a-file"
    blocker.write_text("")
    done = run_bounded(service_env, *args, **unreachable_gitlab(),
                       OUTPUT_FILE=str(blocker / "events.jsonl"))
    assert_one_line(done, "OUTPUT_FILE")


BAD_SETTINGS = [  # (the variable named, the settings)
    ("REDIS_ADDRESS", {"REDIS_ADDRESS": "redis host:6379"}),
    ("REDIS_ADDRESS", {"REDIS_ADDRESS": "127.0.0.1"}),
    ("REDIS_ADDRESS", {"REDIS_ADDRESS": "redis://127.0.0.1:6379/3"}),
    ("REDIS_ADDRESS", {"REDIS_ADDRESS": "[::1:6379"}),
    ("LOG_LEVEL", {"LOG_LEVEL": "verbose"}),
    ("KAFKA_COMPRESSION", {"KAFKA_COMPRESSION": "brotli"}),
    ("KAFKA_SASL_MECHANISM", {"KAFKA_SASL_MECHANISM": "GSSAPI"}),
    ("KAFKA_SECURITY_PROTOCOL", {"KAFKA_SECURITY_PROTOCOL": "TLS"}),
    ("SYNC_USERS", {"SYNC_USERS": "maybe"}),
    ("SCHEDULING_POLL_INTERVAL", {"SCHEDULING_POLL_INTERVAL": "-5"}),
    ("BACKFILL_WAITER_INTERVAL", {"BACKFILL_WAITER_INTERVAL": "-1"}),
    ("OBJECT_SWEEP_INTERVAL", {"OBJECT_SWEEP_INTERVAL": "-1"}),
    ("OBJECT_VERSION_TTL", {"OBJECT_SWEEP_INTERVAL": str(91 * 86_400)}),  # past the TTL
    ("WEBHOOK_PORT", {"WEBHOOK_PORT": "9000", "METRICS_PORT": "9000",
                      "WEBHOOK_SECRET": "hook-secret-s"}),
]


@pytest.mark.parametrize("named,values", BAD_SETTINGS)
def test_a_bad_setting_is_one_line_naming_it(service_env: ServiceRun, named: str,
                                             values: dict[str, str]) -> None:
    done = run_bounded(service_env, "run", "--once", **{**unreachable_gitlab(), **values})
    assert_one_line(done, named)


@pytest.mark.parametrize("args", [("check-config",), ("backfill",), ("worker",), ("status",)])
def test_every_command_names_a_bad_setting(service_env: ServiceRun,
                                           args: tuple[str, ...]) -> None:
    """Every command loads its settings through the same checks (one bad value each suffices:
    the messages themselves are pinned by tests/unit/test_config.py)."""
    done = run_bounded(service_env, *args, **unreachable_gitlab(),
                       OBJECT_SWEEP_INTERVAL=str(91 * 86_400))
    assert_one_line(done, "OBJECT_VERSION_TTL")


def test_enum_settings_take_any_case(service_env: ServiceRun) -> None:
    done = run_bounded(service_env, "check-config", **unreachable_gitlab(), LOG_LEVEL="DEBUG",
                       KAFKA_SASL_MECHANISM="scram-sha-256", KAFKA_COMPRESSION="ZSTD")
    assert done.returncode == 0, done.stderr
    assert '"LOG_LEVEL": "debug"' in done.stdout
    assert '"KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"' in done.stdout


def test_without_a_config_file_a_required_setting_is_named(service_env: ServiceRun) -> None:
    assert not (service_env.cwd / "configs" / "conf.yaml").exists()
    done = run_bounded(service_env, "run", "--once", GITLAB_PRIVATE_TOKEN=TOKEN)
    assert_one_line(done, "GITLAB_BASE_URL")
    assert "is required" in done.stderr


@pytest.mark.parametrize("where", ["missing.yaml", "a-folder"])
def test_a_config_file_that_cannot_be_read_is_one_line(service_env: ServiceRun,
                                                       where: str) -> None:
    (service_env.cwd / "a-folder").mkdir()
    done = run_bounded(service_env, "run", "--once", "--config", str(service_env.cwd / where),
                       **unreachable_gitlab())
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("config error: ") and where in done.stderr
    assert "Traceback" not in done.stderr and TOKEN not in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_gitlab_does_not_answer_is_honoured(service_env: ServiceRun,
                                                                sig: signal.Signals) -> None:
    proc = service_env.start("run", "--once", **unreachable_gitlab())
    try:
        metrics = f"http://127.0.0.1:{service_env.env['METRICS_PORT']}/healthz"
        wait_until(lambda: httpx.get(metrics, timeout=2).status_code == 200, BOUND_S,
                   "the metrics port serving (the start-up checks passed)",
                   ignore=(httpx.HTTPError,))
        proc.send_signal(sig)
        code = proc.wait(BOUND_S)  # the token check alone would go on for ~20 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(BOUND_S)
    assert code == 128 + sig
    assert "Traceback" not in service_env.all_logs()


def test_a_broker_that_does_not_answer_is_waited_out_not_a_config_error(
        service_env: ServiceRun, own_broker: OwnBroker) -> None:
    """The README's rule: sends wait up to KAFKA_DELIVERY_TIMEOUT, then the round fails and is
    repeated; nothing is marked sent, so a later round delivers every event."""
    topic = f"start-{uuid.uuid4().hex[:8]}"
    own_broker.kill()
    with running_simulator(SPEC) as sim:
        since = datetime.fromtimestamp(sim.sim.world.start_ms / 1000, UTC).isoformat()
        values = {"GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
                  "SYNC_SINCE": since, "KAFKA_BOOTSTRAP_SERVERS": own_broker.bootstrap,
                  "KAFKA_TOPIC": topic, "KAFKA_DELIVERY_TIMEOUT": "2"}
        proc = service_env.start("run", **values)  # rounds forever: stays up, says why
        try:
            ready = f"http://127.0.0.1:{service_env.env['METRICS_PORT']}/readyz"
            wait_until(lambda: "sink" in httpx.get(ready, timeout=10).json()["problems"], 30,
                       "/readyz naming the sink", ignore=(httpx.HTTPError,))
            wait_until(lambda: service_env.all_logs().count('"entity_failed"') >= 1, 30,
                       "sends failing after KAFKA_DELIVERY_TIMEOUT")
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        assert "config error" not in service_env.all_logs()
        once = service_env.run("run", "--once", timeout_s=60, **values)
        assert once.returncode == 1 and "config error" not in once.stderr, once.stderr[-2000:]
        own_broker.start()
        done = service_env.run("run", "--once", timeout_s=90, **values)
        assert done.returncode == 0, done.stderr[-3000:]
        truth = httpx.get(f"{sim.url}/_simulator/truth", timeout=30).json()["count"]
    assert truth > 0
    assert len(consume(own_broker.bootstrap, topic, truth)) == truth


def test_the_default_config_file_is_optional(service_env: ServiceRun) -> None:
    """No ``configs/conf.yaml`` in the working folder: the environment alone is the config."""
    assert not (service_env.cwd / "configs").exists()
    done = run_bounded(service_env, "check-config", **unreachable_gitlab())
    assert done.returncode == 0, done.stderr
