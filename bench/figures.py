"""Each benchmark figure: how it is measured, against the simulator, Redis and a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.harness import (
    broker,
    clean_redis,
    consume_ids,
    cpu_seconds,
    pages_lower_bound,
    per_entity_requests,
    run_service,
    service_env,
    simulator,
)
from gitlab_producer.config import Settings

Figure = dict[str, Any]


def _since(days: float) -> str:
    return datetime.fromtimestamp(time.time() - days * 86400 - 60, UTC).isoformat()


def catch_up(projects: int = 2000, users: int = 500, events: int = 300_000,
             runs: int = 3) -> list[Figure]:
    """First round over a fresh instance, no rate cap: throughput (median of ``runs``, each on
    a fresh simulator and broker and without the previous run's Redis keys, since this shared
    machine varies by +-20 % run to run), API cost, CPU; then, after the last run, an idle
    round and the raw producer ceiling on the same broker with the same messages."""
    rates: list[float] = []
    cpus: list[float] = []
    figures: list[Figure] = []
    for run in range(runs):
        with simulator(projects, users, events, history_days=3) as sim, broker() as kafka:
            topic = f"bench-{uuid.uuid4().hex[:6]}"
            env = service_env(sim, kafka, topic, _since(3.1))
            first = run_service(env, "--once")
            assert first.code == 0, first.log[-2000:]
            served = sim.stats()
            truth = sim.get("/_simulator/truth")["count"]
            ids, _ = consume_ids(kafka.bootstrap, topic, truth)
            repeats = sum(ids.values()) - len(ids)
            assert len(ids) == truth and repeats == 0, (len(ids), truth, repeats)
            rates.append(truth / first.wall_s)
            cpus.append(first.cpu_s / truth * 10_000)
            if run < runs - 1:
                clean_redis()  # each run starts from the same Redis, as from a fresh broker
                continue
            rate = statistics.median(rates)
            bound = pages_lower_bound(sim)
            lower = sum(bound.values())
            figures += [
                {"figure": "catch-up throughput", "value": round(rate), "unit": "events/s",
                 "limit": ">= 20000", "ratio": round(rate / 20000, 2),
                 "detail": f"median of {runs} runs: "
                           f"{', '.join(str(round(r)) for r in rates)} events/s; {truth} events "
                           f"each (process start to exit); in Kafka: {len(ids)} distinct, "
                           f"{repeats} repeats"},
                {"figure": "API cost, first round", "value": served["total"],
                 "unit": "requests", "limit": f"<= 1.05 x {lower}",
                 "ratio": round(served["total"] / lower, 3),
                 "detail": f"lower bound {bound}; made {per_entity_requests(served)}"},
                {"figure": "CPU per 10,000 events", "value": round(statistics.median(cpus), 2),
                 "unit": "CPU s", "limit": "reported", "ratio": None,
                 "detail": f"median of {', '.join(f'{c:.2f}' for c in cpus)}; peak RSS "
                           f"{first.peak_rss_mb:.0f} MB (last run)"},
            ]
            sim.reset_stats()
            idle = run_service(env, "--once")
            made = per_entity_requests(sim.stats())
            figures.append({
                "figure": "API cost, idle round (busy instance)",
                "value": made["project_events"] + made["user_events"],
                "unit": "per-entity requests", "limit": "0", "ratio": None,
                "detail": f"{made}; history runs up to start-up, so projects whose "
                          "last_activity_at is under an hour old need a read (GitLab would not "
                          "show a second event in that hour): of each, or of the users active "
                          f"since yesterday when there are fewer; exit {idle.code}"})
            ceiling = raw_producer_ceiling(kafka.bootstrap, sim, truth)
            figures.append({"figure": "raw producer ceiling", "value": round(ceiling),
                            "unit": "events/s", "limit": "reported", "ratio": None,
                            "detail": "bare confluent-kafka loop, same broker, same messages"})
            figures.append({"figure": "catch-up / raw ceiling", "value": round(rate / ceiling, 3),
                            "unit": "", "limit": ">= 0.30", "ratio": round(rate / ceiling / 0.3, 2),
                            "detail": "median throughput above / this ceiling"})
    return figures


def raw_producer_ceiling(bootstrap: str, sim: Any, count: int) -> float:
    """Messages per second a bare producer loop reaches with the same event bodies."""
    from confluent_kafka import Producer

    rows = sim.get("/_simulator/truth")["events"][:count]
    bodies = []
    with httpx.Client(base_url=f"{sim.url}/api/v4",
                      headers={"PRIVATE-TOKEN": "sim-token"}) as client:
        page = client.get("/users/1/events", params={"per_page": 100}).json()
    template = [orjson.dumps(e) for e in page] or [b"{}"]
    bodies = [template[i % len(template)] for i in range(len(rows))]
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "acks": "all", "linger.ms": 5, "batch.num.messages": 10000,
                         "queue.buffering.max.messages": 200000})
    topic = f"raw-{uuid.uuid4().hex[:6]}"
    producer.produce(topic, b"{}")
    producer.flush(30)
    started = time.perf_counter()
    for (event_id, project, author), body in zip(rows, bodies, strict=True):
        while True:
            try:
                producer.produce(topic, body, str(project or author).encode(),
                                 headers=[("event_id", str(event_id).encode())])
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(120)
    return len(rows) / (time.perf_counter() - started)


def quiet_costs(projects: int = 10_000, users: int = 2_000, events: int = 100_000) -> list[Figure]:
    """On an instance whose last activity is two hours old: the idle round, and the round
    after one new event in one project."""
    with simulator(projects, users, events, history_days=3, quiet_minutes=120) as sim:
        env = service_env(sim, None, "quiet", _since(3.1), OUTPUT_FILE="/dev/null")
        assert run_service(env, "--once").code == 0
        sim.reset_stats()
        assert run_service(env, "--once").code == 0
        idle = per_entity_requests(sim.stats())
        listing = idle["projects_list"] + idle["users_list"]
        quiet_project = projects  # the skew leaves the highest ids quietest
        sim.post("/_simulator/events", {"count": 1, "project_id": quiet_project})
        sim.reset_stats()
        assert run_service(env, "--once").code == 0
        one = per_entity_requests(sim.stats())
        one_total = sum(one.values())
        one_listing = one["projects_list"] + one["users_list"]
    return [
        {"figure": "API cost, idle round (quiet instance)",
         "value": idle["project_events"] + idle["user_events"],
         "unit": "per-entity requests", "limit": "0",
         "ratio": 1.0 if idle["project_events"] + idle["user_events"] == 0 else None,
         "detail": f"{idle}; {listing} listing pages"},
        {"figure": "API cost, one new event", "value": one_total, "unit": "requests",
         "limit": f"<= {one_listing} + 2", "ratio": round(one_total / (one_listing + 2), 3),
         "detail": f"{one} (one of {projects} projects, {users} users)"},
    ]


def rate_cap(ops: int = 50, seconds: float = 20.0) -> list[Figure]:
    with simulator(3000, 500, 200_000, history_days=2) as sim:
        env = service_env(sim, None, "cap", _since(2.1), OUTPUT_FILE="/dev/null",
                          OPERATIONS_PER_SECOND=str(ops))
        run_service(env, "--once", stop_after_s=seconds)
        per_second = {int(k): v for k, v in sim.stats()["per_second"].items()}
    full = sorted(per_second)[1:-1]  # the first and last seconds are partial
    used = sum(per_second[s] for s in full) / (ops * len(full))
    peak = max(per_second.values())
    return [
        {"figure": "rate cap: busiest second", "value": peak, "unit": "requests",
         "limit": f"<= {ops}", "ratio": round(peak / ops, 3),
         "detail": f"{ops} ops/s for {seconds:.0f} s; per second: {list(per_second.values())}"},
        {"figure": "rate cap: budget used", "value": round(used, 3), "unit": "",
         "limit": ">= 0.95", "ratio": round(used / 0.95, 3),
         "detail": f"over {len(full)} full seconds"},
    ]


def memory(scales: tuple[tuple[int, int, int], ...] = (
        (10_000, 2_000, 100_000), (100_000, 20_000, 1_000_000))) -> list[Figure]:
    figures = []
    for projects, users, events in scales:
        with simulator(projects, users, events, history_days=3) as sim, broker() as kafka:
            sim_rss = _rss_of(sim.proc.pid)
            env = service_env(sim, kafka, f"mem-{uuid.uuid4().hex[:6]}", _since(3.1))
            result = run_service(env, "--once", timeout_s=3600)
            figures.append({
                "figure": f"memory, {projects:,}/{users:,}/{events:,}",
                "value": round(result.peak_rss_mb), "unit": "MB peak RSS",
                "limit": "<= 250", "ratio": round(result.peak_rss_mb / 250, 3),
                "detail": f"first round {result.wall_s:.0f} s, exit {result.code}; simulator "
                          f"started in {sim.ready_s:.1f} s using {sim_rss:.0f} MB"})
    return figures


def _rss_of(pid: int) -> float:
    from bench.harness import peak_rss_mb

    return peak_rss_mb(pid)


def tail_latency(rate: float = 100.0, poll_s: float = 5.0, seconds: float = 60.0,
                 ops: float = 200.0) -> list[Figure]:
    with simulator(2000, 500, 20_000, history_days=1) as sim, broker() as kafka:
        topic = f"lat-{uuid.uuid4().hex[:6]}"
        env = service_env(sim, kafka, topic, _since(1.1),
                          SCHEDULING_POLL_INTERVAL=str(poll_s), OPERATIONS_PER_SECOND=str(ops),
                          LOG_LEVEL="info")
        assert run_service(env, "--once").code == 0
        first_live = sim.stats()["events"] + 1
        sim.post("/_simulator/settings", {"live_rate": rate})
        run_service(env, stop_after_s=seconds + 2 * poll_s, timeout_s=seconds * 4)
        sim.post("/_simulator/settings", {"live_rate": 0})
        times = {row[0]: row[3] for row in sim.get("/_simulator/truth", times="1",
                                                    since_id=first_live - 1)["events"]}
        _, stamps = consume_ids(kafka.bootstrap, topic, 0, timeout_s=60)
    delays = sorted((ts - times[i]) / 1000 for ts, i in stamps if i in times)
    p99 = _p99(delays) if delays else math.inf
    return [{"figure": f"tail latency (live, p99, {ops:g} ops/s)", "value": round(p99, 2),
             "unit": "s",
             "limit": f"<= {poll_s + 1:.0f}", "ratio": round(p99 / (poll_s + 1), 3),
             "detail": f"{len(delays)} live events at {rate:.0f}/s, poll {poll_s:.0f} s; "
                       f"p50 {statistics.median(delays):.2f} s, max {delays[-1]:.2f} s"}]


def tail_latency_uncapped() -> list[Figure]:
    return tail_latency(ops=10_000)


def simulator_throughput(seconds: float = 10.0, concurrency: int = 32) -> list[Figure]:
    with simulator(2000, 500, 300_000, history_days=3) as sim:
        busy = sorted(range(1, 51))
        count = asyncio.run(_hammer(sim.url, busy, seconds, concurrency))
        size = len(httpx.get(f"{sim.url}/api/v4/projects/1/events?per_page=100",
                             headers={"PRIVATE-TOKEN": "sim-token"}).json())
    rate = count / seconds
    return [{"figure": "simulator: 100-event pages served", "value": round(rate),
             "unit": "requests/s", "limit": ">= 1500", "ratio": round(rate / 1500, 2),
             "detail": f"{concurrency} concurrent aiohttp requests from the benchmark process, "
                       f"{seconds:.0f} s, {size} events per page"}]


async def _hammer(url: str, projects: list[int], seconds: float, concurrency: int) -> int:
    import aiohttp

    done = 0
    deadline = time.monotonic() + seconds
    headers = {"PRIVATE-TOKEN": "sim-token"}

    async def worker(n: int, session: aiohttp.ClientSession) -> None:
        nonlocal done
        i = n
        while time.monotonic() < deadline:
            pid = projects[i % len(projects)]
            async with session.get(f"{url}/api/v4/projects/{pid}/events",
                                   params={"per_page": "100", "page": str(1 + i % 5)}) as r:
                await r.read()
            done += 1
            i += concurrency

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        await asyncio.gather(*(worker(n, session) for n in range(concurrency)))
    return done


def simulator_size() -> list[Figure]:
    with simulator(100_000, 20_000, 1_000_000, history_days=3) as sim:
        rss = _rss_of(sim.proc.pid)
    return [
        {"figure": "simulator start, 100k/20k/1M", "value": round(sim.ready_s, 1), "unit": "s",
         "limit": "< 15", "ratio": round(sim.ready_s / 15, 2), "detail": ""},
        {"figure": "simulator memory after start", "value": round(rss), "unit": "MB",
         "limit": "< 1500", "ratio": round(rss / 1500, 2), "detail": ""},
    ]


def webhook_latency(rate: float = 500.0, seconds: float = 10.0, live_rate: float = 100.0,
                    poll_s: float = 5.0) -> list[Figure]:
    """Hooks posted at ``rate`` per second; time to the service's 200 (sent only after Kafka
    acknowledged). Three phases on one service process:

    - start-up: from the moment the port opens, during the first round's catch-up (reported);
    - steady: once that round finished, with the simulator producing ``live_rate`` events/s
      and rounds every ``poll_s`` under the shipped request cap (the figure held to the limit);
    - steady, polling uncapped: the same with rounds as fast as GitLab answers, which on this
      machine keeps both cores busy with the simulator and the service (reported).
    """
    from bench.harness import free_port, run_service_background, wait_for_port

    default_ops = Settings.model_fields["operations_per_second"].default
    figures: list[Figure] = []
    # Under the shipped cap the first round starts 15 minutes back, so it ends in seconds.
    for ops, since_days in ((default_ops, 0.01), (10_000.0, 1.1)):
        port, metrics_port = free_port(), free_port()
        with simulator(2000, 500, 20_000, history_days=1) as sim, broker() as kafka:
            env = service_env(sim, kafka, f"hooks-{uuid.uuid4().hex[:6]}", _since(since_days),
                              WEBHOOK_PORT=str(port), WEBHOOK_SECRET="bench-secret",
                              SCHEDULING_POLL_INTERVAL=str(poll_s), METRICS_PORT=str(metrics_port),
                              OPERATIONS_PER_SECOND=str(ops))
            with run_service_background(env):
                wait_for_port(port)
                start_up, _ = asyncio.run(_post_hooks(port, rate, 1.0, "start"))
                _wait_first_round(metrics_port, timeout_s=300)
                sim.post("/_simulator/settings", {"live_rate": live_rate})
                steady, statuses = asyncio.run(_post_hooks(port, rate, seconds, "steady"))
                sim.post("/_simulator/settings", {"live_rate": 0})
                rounds = _counter(metrics_port, "gitlab_producer_rounds_total")
        p99 = _p99(steady)
        detail = (f"{len(steady)} push-sized hooks at {rate:.0f}/s for {seconds:.0f} s, "
                  f"{statuses.count(200)} answered 200; p50 "
                  f"{statistics.median(steady) * 1000:.1f} ms; meanwhile {live_rate:.0f} live "
                  f"events/s polled every {poll_s:.0f} s ({rounds:.0f} rounds in all)")
        if ops == default_ops:
            figures.append({"figure": "webhook hook-to-ack p99 (steady)",
                            "value": round(p99 * 1000, 1), "unit": "ms", "limit": "< 20",
                            "ratio": round(p99 * 1000 / 20, 2),
                            "detail": f"{detail}; request cap {ops:g}/s as shipped"})
        else:
            start_p99 = _p99(start_up)
            figures.append({
                "figure": "webhook hook-to-ack p99 (start-up)",
                "value": round(start_p99 * 1000, 1), "unit": "ms", "limit": "reported",
                "ratio": "",
                "detail": f"{len(start_up)} hooks in the first second after the port opened, "
                          f"during the first round's catch-up of 2,000 projects / 20,000 "
                          f"events; p50 {statistics.median(start_up) * 1000:.1f} ms"})
            figures.append({"figure": "webhook hook-to-ack p99 (steady, polling uncapped)",
                            "value": round(p99 * 1000, 1), "unit": "ms", "limit": "reported",
                            "ratio": "", "detail": f"{detail}; no request cap"})
    return figures


def webhook_memory(hooks: int = 20, size_mib: int = 24) -> list[Figure]:
    """Peak RSS (VmHWM) of the service while ``hooks`` bodies of ``size_mib`` MiB arrive at
    once and are produced to Kafka: with the shipped WEBHOOK_MAX_INFLIGHT_BYTES, and with the
    budget out of the way (1 GiB) for comparison."""
    from bench.harness import free_port, peak_rss_mb, run_service_background, wait_for_port

    default = Settings.model_fields["webhook_max_inflight_bytes"].default
    body = orjson.dumps({"object_kind": "push", "project_id": 1,
                         "blob": "x" * (size_mib * 1024 * 1024 - 100)})
    figures: list[Figure] = []
    for budget in (default, 1024**3):
        port = free_port()
        with simulator(20, 20, 100) as sim, broker() as kafka:
            env = service_env(sim, kafka, f"mem-{uuid.uuid4().hex[:6]}", _since(0.01),
                              WEBHOOK_PORT=str(port), WEBHOOK_SECRET="bench-secret",
                              WEBHOOK_MAX_INFLIGHT_BYTES=str(budget),
                              WEBHOOK_BODY_TIMEOUT="60", WEBHOOK_DELIVERY_TIMEOUT="60",
                              SCHEDULING_POLL_INTERVAL="600")
            with run_service_background(env) as proc:
                wait_for_port(port)
                before = peak_rss_mb(proc.pid)
                started = time.perf_counter()
                statuses = asyncio.run(_post_big(port, body, hooks))
                took = time.perf_counter() - started
                peak = peak_rss_mb(proc.pid)
        shipped = budget == default
        figures.append({
            "figure": f"webhook peak RSS, {hooks} x {size_mib} MiB hooks at once"
                      + ("" if shipped else " (no budget)"),
            "value": round(peak), "unit": "MB", "limit": "< 400" if shipped else "reported",
            "ratio": round(peak / 400, 2) if shipped else "",
            "detail": f"WEBHOOK_MAX_INFLIGHT_BYTES {budget / 1024**2:.0f} MiB; {before:.0f} MB "
                      f"before; {statuses.count(200)} of {hooks} answered 200 in {took:.1f} s"})
    return figures


async def _post_big(port: int, body: bytes, hooks: int) -> list[int]:
    async with httpx.AsyncClient(timeout=120) as client:
        answers = await asyncio.gather(*(client.post(
            f"http://127.0.0.1:{port}/webhooks/gitlab", content=body,
            headers={"X-Gitlab-Token": "bench-secret", "X-Gitlab-Event": "Push Hook",
                     "Idempotency-Key": uuid.uuid4().hex}) for _ in range(hooks)))
    return [a.status_code for a in answers]


def _p99(values: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * 0.99) - 1)]


def _wait_first_round(port: int, timeout_s: float) -> None:
    """Until the service reports its first finished round on ``/metrics``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if _counter(port, "gitlab_producer_rounds_total") >= 1:
                return
        time.sleep(0.2)
    raise TimeoutError(f"no round finished within {timeout_s} s")


def _counter(port: int, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == name)


async def _post_hooks(port: int, rate: float, seconds: float, label: str
                      ) -> tuple[list[float], list[int]]:
    import aiohttp

    body = orjson.dumps({"object_kind": "push", "project_id": 1, "ref": "refs/heads/dev",
                         "commits": [{"id": "a" * 40, "message": "m" * 200}] * 3})
    latencies: list[float] = []
    statuses: list[int] = []

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        headers = {"X-Gitlab-Token": "bench-secret", "X-Gitlab-Event": "Push Hook",
                   "Idempotency-Key": f"bench-{label}-{n}", "Content-Type": "application/json"}
        started = time.perf_counter()
        async with session.post(f"http://127.0.0.1:{port}/webhooks/gitlab", data=body,
                                headers=headers) as response:
            await response.read()
            statuses.append(response.status)
        latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:
        tasks = []
        start = time.perf_counter()
        for n in range(int(rate * seconds)):
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, n)))
        await asyncio.gather(*tasks)
    return latencies, statuses


def sqlite_marks(batches: int = 2_000, batch: int = 100, runs: int = 3) -> list[Figure]:
    """The embedded store's write path as a round uses it: ``mark_sent`` of 100 fresh ids
    at a time into a fresh file (WAL, synchronous=NORMAL), median of ``runs``."""
    import tempfile
    from pathlib import Path

    from gitlab_producer.store import SQLiteStore

    async def one(path: Path) -> float:
        store = SQLiteStore(path)
        started = time.perf_counter()
        for n in range(batches):
            await store.mark_sent(range(n * batch, (n + 1) * batch), ttl_s=3600)
        took = time.perf_counter() - started
        await store.close()
        return batches * batch / took

    rates = []
    for run in range(runs):
        with tempfile.TemporaryDirectory() as folder:
            rates.append(asyncio.run(one(Path(folder) / f"bench-{run}.sqlite3")))
    rate = statistics.median(rates)
    return [{"figure": "SQLite store: marks written", "value": round(rate), "unit": "marks/s",
             "limit": "reported", "ratio": None,
             "detail": f"median of {', '.join(str(round(r)) for r in rates)} marks/s; "
                       f"{batches} calls of {batch} fresh ids, one transaction each"}]


def redis_restart(projects: int = 300, users: int = 60, events: int = 50_000,
                  live_rate: float = 20.0) -> list[Figure]:
    """Repeats in Kafka after Redis is killed and restarted between rounds, without
    persistence and with AOF (``appendfsync everysec``, Redis's default for AOF): the service
    runs rounds every 2 s with live activity; Redis is killed after the first round and
    started again on the same port; three more successful rounds follow."""
    import tempfile

    from bench.harness import free_port, run_service_background

    rows: list[Figure] = []
    for persistence in ("none", "AOF"):
        options = (["--appendonly", "yes", "--save", ""] if persistence == "AOF"
                   else ["--appendonly", "no", "--save", ""])
        with tempfile.TemporaryDirectory() as folder, \
                simulator(projects, users, events, history_days=3, live_rate=live_rate) as sim, \
                broker() as kafka:
            port, metrics_port = free_port(), free_port()
            redis_proc = _redis_server(port, folder, options)
            topic = f"bench-{uuid.uuid4().hex[:6]}"
            env = service_env(sim, kafka, topic, _since(3.1), REDIS_ADDRESS=f"127.0.0.1:{port}",
                              REDIS_DB="0", METRICS_PORT=str(metrics_port),
                              SCHEDULING_POLL_INTERVAL="2")
            try:
                with run_service_background(env):
                    _wait_successes(metrics_port, 1, 600)
                    redis_proc.kill()
                    redis_proc.wait(10)
                    redis_proc = _redis_server(port, folder, options)
                    after = _counter(metrics_port, "gitlab_producer_rounds_total")
                    _wait_successes(metrics_port, 2, 300, after)
                    sim.post("/_simulator/settings", {"live_rate": 0})
                    _wait_successes(metrics_port, 4, 300, after)
                    lost = _counter(metrics_port, "gitlab_producer_store_state_lost_total")
            finally:
                redis_proc.kill()
                redis_proc.wait(10)
            truth = sim.get("/_simulator/truth")["count"]
            ids, _ = consume_ids(kafka.bootstrap, topic, truth)
        repeats = sum(ids.values()) - len(ids)
        rows.append({
            "figure": f"Redis restarted, persistence {persistence}: repeats", "value": repeats,
            "unit": "events", "limit": "0 with persistence" if persistence == "AOF" else
            "reported", "ratio": None,
            "detail": f"{len(ids)} of {truth} events in Kafka, {sum(ids.values())} messages; "
                      f"store_state_lost_total {lost:.0f}; {projects}/{users}/{events}, "
                      f"{live_rate:.0f} live events/s"})
    return rows


def _redis_server(port: int, folder: str, options: list[str]) -> Any:
    """A redis-server of the benchmark's own on ``port`` (files in ``folder``)."""
    import shutil
    import subprocess

    from bench.harness import wait_for_port

    proc = subprocess.Popen([str(shutil.which("redis-server")), "--port", str(port), "--bind",
                             "127.0.0.1", "--dir", folder, *options], stdout=subprocess.DEVNULL)
    wait_for_port(port)
    return proc


def _wait_successes(port: int, count: int, timeout_s: float, after_rounds: float = 0) -> None:
    """Until ``count`` successful rounds finished after the first ``after_rounds`` rounds."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    base: float | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            samples = [s for family in text_string_to_metric_families(text)
                       for s in family.samples if s.name == "gitlab_producer_rounds_total"]
            total = sum(s.value for s in samples)
            ok = sum(s.value for s in samples if s.labels.get("outcome") == "success")
            if base is None and total >= after_rounds:
                base = ok
            if base is not None and ok - base >= count:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{count} successful rounds not within {timeout_s} s")


def simulator_objects(projects: int = 10_000, events: int = 400_000, per_project: int = 64,
                      seconds: float = 10.0, windows: int = 3,
                      concurrency: int = 32) -> list[Figure]:
    """The object world at full size: start-up, memory, and object pages served to a
    full-history importer (each worker reads one project's lists, then the next project's),
    in ``windows`` consecutive windows of ``seconds`` (the median is the figure)."""
    from gitlab_producer.simulator.targets import shape

    objects = sum(
        s.issues + s.merge_requests + s.notes + s.pipelines
        for s in (shape(1, p, per_project) for p in range(1, projects + 1)))
    rates, server_cpu, client_cpu, pages_all = [], 0.0, 0.0, 0
    statuses: dict[int, int] = {}
    with simulator(projects, 2_000, events, history_days=3,
                   objects_per_project=per_project) as sim:
        started_rss = _rss_of(sim.proc.pid)
        queue = iter(range(1, projects + 1))
        for _ in range(windows):
            cpu_before, own_before = cpu_seconds(sim.proc.pid), time.process_time()
            pages, elapsed = asyncio.run(_import_pages(sim.url, queue, seconds, concurrency,
                                                       statuses))
            server_cpu += cpu_seconds(sim.proc.pid) - cpu_before
            client_cpu += time.process_time() - own_before
            pages_all += pages
            rates.append(pages / elapsed)
        served_rss = _rss_of(sim.proc.pid)
    rate = statistics.median(rates)
    total = objects + events
    size = (f"{projects} projects, {total:,} objects ({objects:,} generated lazily + "
            f"{events:,} events)")
    per_page_ms = server_cpu / max(1, pages_all) * 1000
    return [
        {"figure": "simulator objects: start", "value": round(sim.ready_s, 1), "unit": "s",
         "limit": "< 15", "ratio": round(sim.ready_s / 15, 2), "detail": size},
        {"figure": "simulator objects: memory", "value": round(max(started_rss, served_rss)),
         "unit": "MB", "limit": "< 2048", "ratio": round(max(started_rss, served_rss) / 2048, 2),
         "detail": f"peak RSS: {started_rss:.0f} MB after start, {served_rss:.0f} MB after "
                   f"serving {pages_all} pages"},
        {"figure": "simulator objects: pages served", "value": round(rate),
         "unit": "pages/s", "limit": ">= 1500", "ratio": round(rate / 1500, 2),
         "detail": f"median of {windows} windows of {seconds:.0f} s "
                   f"({', '.join(f'{r:.0f}' for r in rates)}); {concurrency} concurrent aiohttp "
                   f"clients in the benchmark process; per_page=100 lists (issues, merge "
                   f"requests, notes, discussions, resource events, pipelines, jobs, "
                   f"deployments) project after project; statuses "
                   f"{dict(sorted(statuses.items()))}; simulator CPU {per_page_ms:.2f} ms per "
                   f"page ({1000 / per_page_ms:.0f} pages per CPU second), client CPU "
                   f"{client_cpu / max(1, pages_all) * 1000:.2f} ms per page; load average "
                   f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"},
    ]


async def _import_pages(url: str, queue: Iterator[int], seconds: float, concurrency: int,
                        statuses: dict[int, int]) -> tuple[int, float]:
    import aiohttp

    started = time.monotonic()
    deadline = started + seconds
    pages = 0
    api = f"{url}/api/v4"

    async def get(session: aiohttp.ClientSession, path: str) -> Any:
        nonlocal pages
        async with session.get(f"{api}{path}", params={"per_page": "100"}) as r:
            body = await r.read()
        pages += 1
        statuses[r.status] = statuses.get(r.status, 0) + 1
        return orjson.loads(body) if r.status == 200 else []

    async def worker(session: aiohttp.ClientSession) -> None:
        for pid in queue:
            base = f"/projects/{pid}"
            for kind in ("issues", "merge_requests"):
                for thing in await get(session, f"{base}/{kind}"):
                    if time.monotonic() > deadline:
                        return
                    for tail in ("notes", "discussions", "resource_state_events"):
                        await get(session, f"{base}/{kind}/{thing['iid']}/{tail}")
            for tail in ("pipelines", "jobs", "deployments"):
                await get(session, f"{base}/{tail}")
            if time.monotonic() > deadline:
                return

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(headers={"PRIVATE-TOKEN": "sim-token"},
                                     connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return pages, time.monotonic() - started


def artifact_upload(size_mib: int = 1024, block_mib: int = 1) -> list[Figure]:
    """One ``size_mib`` upload through the hand-back API: generated on the fly by the benchmark
    process, streamed over loopback with a declared length and its SHA-256, written to a
    ``file://`` store. Throughput from the request's start to the 201; the service's memory
    growth is its peak RSS during the upload (VmHWM, reset just before it) over its RSS just
    before, after a small warm-up upload."""
    import hashlib
    import shutil

    from bench.harness import OUT, cpu_seconds, free_port, run_service_background, wait_for_port
    from gitlab_producer.simulator.repository import BRANCHES, branch_commits

    size = size_mib * 1024 * 1024
    block = hashlib.sha256(b"bench").digest() * (block_mib * 1024 * 1024 // 32)
    digest = hashlib.sha256()
    for _ in range(size // len(block)):
        digest.update(block)
    token = "bench-upload-token-0123"
    store = OUT / f"artifacts-{uuid.uuid4().hex[:6]}"
    port = free_port()
    commits = branch_commits(3, BRANCHES[0])
    try:
        with simulator(20, 10, 100) as sim, broker() as kafka:
            env = service_env(sim, kafka, f"art-{uuid.uuid4().hex[:6]}", _since(0.01),
                              WEBHOOK_PORT=str(port), WEBHOOK_SECRET="bench-secret",
                              ARTIFACT_UPLOAD_TOKEN=token, ARTIFACT_STORE_URL=f"file://{store}",
                              ARTIFACT_MAX_BYTES=str(size + 1), SCHEDULING_POLL_INTERVAL="30",
                              OPERATIONS_PER_SECOND="10000")
            url = f"http://127.0.0.1:{port}/artifacts/3"
            headers = {"Authorization": f"Bearer {token}"}
            with run_service_background(env) as proc, httpx.Client(timeout=600) as client:
                wait_for_port(port)
                warm = client.put(f"{url}/{commits[0]}/warm.jar", content=block, headers=headers)
                assert warm.status_code == 201, warm.text
                before = _status_mb(proc.pid, "VmRSS")
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
                sampled = [before]
                done = threading.Event()

                def sample() -> None:
                    while not done.wait(0.05):
                        sampled.append(_status_mb(proc.pid, "VmRSS"))

                sampler = threading.Thread(target=sample)
                sampler.start()

                def body() -> Iterator[bytes]:
                    for _ in range(size // len(block)):
                        yield block

                cpu_before = cpu_seconds(proc.pid)
                started = time.perf_counter()
                answer = client.put(f"{url}/{commits[1]}/dist/app.jar", content=body(),
                                    headers={**headers, "Content-Length": str(size),
                                             "X-Checksum-Sha256": digest.hexdigest()})
                took = time.perf_counter() - started
                cpu = cpu_seconds(proc.pid) - cpu_before
                done.set()
                sampler.join(10)
                peak = max(_status_mb(proc.pid, "VmHWM"), max(sampled))
                assert answer.status_code == 201, answer.text
                assert answer.json()["size"] == size
                stored = store / "3" / commits[1] / "dist" / "app.jar"
                assert stored.stat().st_size == size
    finally:
        shutil.rmtree(store, ignore_errors=True)
    rate = size / took / 1e6
    growth = peak - before
    return [
        {"figure": f"artifact upload, {size_mib} MiB: throughput", "value": round(rate),
         "unit": "MB/s", "limit": "reported", "ratio": None,
         "detail": f"{took:.1f} s for {size:,} bytes (loopback, declared length and sha-256, "
                   f"file:// store on the same disk; {size / took / 2**20:.0f} MiB/s); service "
                   f"CPU {cpu:.1f} s, the rest the client and the disk"},
        {"figure": f"artifact upload, {size_mib} MiB: service memory growth",
         "value": round(growth, 1), "unit": "MB", "limit": "< 64",
         "ratio": round(growth / 64, 3),
         "detail": f"RSS {before:.0f} MB before, peak {peak:.0f} MB during (VmHWM reset "
                   f"before the upload, and RSS sampled every 50 ms)"},
    ]


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0
