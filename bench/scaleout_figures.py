"""Scale-out figures (issue 15): what the parts that let many instances share one Redis cost
one instance, and what the job engine costs per job."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.harness import (
    REDIS_ADDRESS,
    REDIS_DB,
    REDIS_PREFIX,
    broker,
    clean_redis,
    consume_ids,
    run_service,
    service_env,
    simulator,
)

Figure = dict[str, Any]
ROOT = Path(__file__).resolve().parents[1]
# main just before the scale-out was merged (d9824d4): the in-process limiter and claims.
BASELINE_REF = "d9824d4^1"
IN_PROCESS = "in-process today"


def _since(days: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(time.time() - days * 86400 - 60, UTC).isoformat()


def _sources(folder: Path, refs: dict[str, str]) -> dict[str, str]:
    """Each code's ``src`` folder: a git ref's exported into ``folder``, or this tree's."""
    found = {}
    for code, ref in refs.items():
        if not ref:
            found[code] = str(ROOT / "src")
            continue
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"],
                                 capture_output=True, check=True).stdout
        target = folder / code
        target.mkdir()
        tar = target / "src.tar"
        tar.write_bytes(archive)
        with tarfile.open(tar) as bundle:
            bundle.extractall(target, filter="data")
        found[code] = str(target / "src")
    return found


def scaleout_overhead(projects: int = 1000, users: int = 250, events: int = 100_000,
                      runs: int = 5) -> list[Figure]:
    """CPU per event of one instance on Redis with the scale-out parts (the shared request
    budget, claims across instances, the instance heartbeat) against the same first round on
    the code before them (:data:`BASELINE_REF`: the in-process limiter and claims).
    ``BENCH_SCALEOUT_BEFORE=<ref>`` also measures an earlier state of the scale-out code in
    the same runs (before/after a change); ``BENCH_SCALEOUT_RUNS`` sets ``runs``. Runs
    alternate between the codes on fresh simulators and brokers; medians of ``runs`` each.
    The budget at the harness's 10,000/s (above what the round reaches), so that it is pure
    overhead: its worst case. Then the engine's cost per job (:func:`engine_job_overhead`)."""
    runs = int(os.environ.get("BENCH_SCALEOUT_RUNS", runs))
    refs = {"baseline": BASELINE_REF, IN_PROCESS: ""}
    before = os.environ.get("BENCH_SCALEOUT_BEFORE", "")
    if before:
        refs["scale-out before"] = before
    refs["scale-out"] = ""
    cpus: dict[str, list[float]] = {code: [] for code in refs}
    walls: dict[str, list[float]] = {code: [] for code in refs}
    with tempfile.TemporaryDirectory() as folder:
        sources = _sources(Path(folder), refs)
        for _ in range(runs):
            for code, src in sources.items():
                with simulator(projects, users, events, history_days=3) as sim, \
                        broker() as kafka:
                    topic = f"bench-{uuid.uuid4().hex[:6]}"
                    if code == IN_PROCESS:  # this tree, its scale-out parts swapped out
                        env = service_env(sim, kafka, topic, _since(3.1),
                                          PYTHONPATH=f"{src}:{ROOT}")
                        done = run_service(env, "--once", module="bench.inprocess_run")
                    else:
                        env = service_env(sim, kafka, topic, _since(3.1), PYTHONPATH=src)
                        done = run_service(env, "--once")
                    assert done.code == 0, done.log[-2000:]
                    truth = sim.get("/_simulator/truth")["count"]
                    ids, _ = consume_ids(kafka.bootstrap, topic, truth)
                    assert len(ids) == truth and sum(ids.values()) == truth, (code, len(ids))
                    cpus[code].append(done.cpu_s / truth * 10_000)
                    walls[code].append(truth / done.wall_s)
                clean_redis()
    medians = {code: statistics.median(values) for code, values in cpus.items()}
    detail = "; ".join(f"{c}: CPU s per 10,000 events {', '.join(f'{v:.3f}' for v in cpus[c])}"
                       f", events/s {', '.join(str(round(v)) for v in walls[c])}"
                       for c in cpus)
    where = (f"{projects}/{users}/{events}, one instance, Redis store, 10,000 ops/s; baseline "
             f"= {BASELINE_REF} ({sys.version.split()[0]})")
    figures = []
    for code in refs:
        if code in ("baseline", IN_PROCESS):
            continue
        ratio = medians[code] / medians["baseline"]
        name = "scale-out parts: CPU per event vs in-process"
        figures.append({"figure": name + (" (before)" if code != "scale-out" else ""),
                        "value": round(ratio, 3), "unit": "x", "limit": "<= 1.10",
                        "ratio": round(ratio / 1.10, 3),
                        "detail": f"{where}; {code} = {refs[code] or 'this tree'}; {detail}"})
    pairs = [new / old for new, old in zip(cpus["scale-out"], cpus[IN_PROCESS], strict=True)]
    ratio = statistics.median(cpus["scale-out"]) / statistics.median(cpus[IN_PROCESS])
    figures.append({
        "figure": "scale-out parts: CPU per event vs this tree's in-process round",
        "value": round(ratio, 3), "unit": "x", "limit": "<= 1.10", "ratio": round(ratio / 1.10, 3),
        "detail": f"{where}; {IN_PROCESS} = this tree run by bench/inprocess_run.py (the "
                  f"in-process round, this process's own limiter and claims, same Redis store); "
                  f"per run, scale-out / {IN_PROCESS}: "
                  f"{', '.join(f'{v:.2f}' for v in pairs)} "
                  f"(median {statistics.median(pairs):.3f})"})
    return figures + engine_job_overhead()


def engine_job_overhead(jobs: int = 3000, concurrency: int = 8, runs: int = 3
                        ) -> list[Figure]:
    """What the job engine (SAQ on Redis, as ``SaqDispatcher`` configures it) costs per job:
    enqueue, dequeue, the run of a handler that does nothing, completion. One process
    enqueues ``jobs`` keyed jobs and serves them with a worker of ``concurrency``; its CPU
    and the wall time until the last one completed, per job (median of ``runs``)."""
    cpu_us, wall_us = [], []
    for _ in range(runs):
        cpu, wall = asyncio.run(_engine_run(jobs, concurrency))
        cpu_us.append(cpu / jobs * 1e6)
        wall_us.append(wall / jobs * 1e6)
    cpu, wall = statistics.median(cpu_us), statistics.median(wall_us)
    return [{"figure": "engine: CPU per job (enqueue+dequeue+complete)", "value": round(cpu),
             "unit": "us", "limit": "reported", "ratio": None,
             "detail": f"{jobs} no-op jobs, SAQ on Redis {REDIS_ADDRESS}, worker concurrency "
                       f"{concurrency}, enqueuer and worker in one process (its CPU; Redis's "
                       f"own not counted); CPU us per job {', '.join(f'{v:.0f}' for v in cpu_us)}"
                       f"; wall us per job {', '.join(f'{v:.0f}' for v in wall_us)} (median "
                       f"{wall:.0f}: {1e6 / wall:.0f} jobs/s)"}]


async def _engine_run(jobs: int, concurrency: int) -> tuple[float, float]:
    import redis.asyncio as aioredis

    from gitlab_producer.objects.engine import Call, SaqDispatcher

    prefix = f"{REDIS_PREFIX}{uuid.uuid4().hex[:8]}:"
    host, _, port = REDIS_ADDRESS.rpartition(":")
    dispatcher = SaqDispatcher(f"redis://{host}:{port}/{REDIS_DB}", f"{prefix}engine", prefix,
                               timeout_s=60, max_attempts=3, heartbeat_s=30)
    await dispatcher.connect()
    ran = 0

    async def nothing(call: Call, kwargs: dict[str, Any]) -> None:
        nonlocal ran
        ran += 1

    worker = dispatcher.worker({"nothing": nothing}, concurrency)
    serving = asyncio.create_task(worker.start())
    try:
        await asyncio.sleep(0.5)  # the worker's start-up is not a job's cost
        cpu_before, started = time.process_time(), time.perf_counter()
        for i in range(jobs):
            await dispatcher.enqueue("nothing", f"job-{i}", {"n": i})
        deadline = time.monotonic() + 300
        while await dispatcher.queue.count("incomplete") > 0 or ran < jobs:
            assert time.monotonic() < deadline, f"{ran} of {jobs} jobs after 300 s"
            await asyncio.sleep(0.005)
        cpu, wall = time.process_time() - cpu_before, time.perf_counter() - started
    finally:
        await worker.stop()
        serving.cancel()
        await dispatcher.close()
        client = aioredis.from_url(f"redis://{host}:{port}/{REDIS_DB}")
        keys = [k async for k in client.scan_iter(f"saq:*{prefix}*", count=10_000)]
        for start in range(0, len(keys), 5_000):
            await client.delete(*keys[start:start + 5_000])
        await client.aclose()
    return cpu, wall
