"""Run the benchmarks and write bench/RESULTS.md: ``python bench/run.py [figure ...]``.

Figures: catch_up, quiet_costs, rate_cap, memory, tail_latency, simulator_throughput,
simulator_size, webhook_latency, sqlite_marks, redis_restart, simulator_objects,
artifact_upload, webhook_memory, backfill_requests, scaleout_overhead, object_sync_idle,
backfill_peers, backfill_memory (default: all). Everything runs on loopback:
the simulator and the service as separate processes, a tansu broker, and the machine's Redis
(``BENCH_REDIS``, default 127.0.0.1:6379).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import backfill_figures, figures, peer_figures, scaleout_figures
from bench.harness import RESULTS, clean_redis, save_json

ALL = ("catch_up", "quiet_costs", "rate_cap", "memory", "tail_latency", "tail_latency_uncapped",
       "simulator_throughput",
       "simulator_size", "webhook_latency", "sqlite_marks", "redis_restart", "simulator_objects",
       "artifact_upload", "webhook_memory", "backfill_requests", "scaleout_overhead",
       "object_sync_idle", "backfill_peers", "backfill_memory")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return (f"{os.cpu_count()} cores ({cpu}), {mem_kb / 1024 / 1024:.0f} GiB RAM, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def main(names: list[str]) -> None:
    chosen = names or list(ALL)
    for name in chosen:
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            found = (getattr(figures, name, None) or getattr(scaleout_figures, name, None)
                     or getattr(backfill_figures, name, None) or getattr(peer_figures, name))
            found = found()
        finally:
            print(f"   (removed {clean_redis()} benchmark keys from Redis)", flush=True)
        measured = f"{datetime.now(UTC):%Y-%m-%d %H:%M}"
        for row in found:
            row["took_s"] = round(time.perf_counter() - started)
            row["measured"] = measured
            print(f"   {row['figure']}: {row['value']} {row['unit']} (limit {row['limit']})",
                  flush=True)
        save_json(name, found)
    write_results()


def write_results() -> None:
    """RESULTS.md from the latest measurement of every figure (bench/results/<name>.json),
    each row dated by when it was measured."""
    path = Path(__file__).parent / "RESULTS.md"
    lines = [
        "# Benchmark results", "",
        f"- written: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; each row gives when it was measured",
        f"- machine: {machine()}",
        "- command: `python bench/run.py [figure ...]` (`make bench` runs them all)",
        "- setup: simulator and service in separate processes on loopback, tansu broker "
        "(Kafka protocol), Redis store, one machine shared by all of them", "",
        "| figure | value | limit | ratio to limit | measured (UTC) | detail |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ALL:
        source = RESULTS / f"{name}.json"
        if not source.exists():
            continue
        for row in orjson.loads(source.read_bytes()):
            ratio = "" if row["ratio"] is None else row["ratio"]
            lines.append(f"| {row['figure']} | {row['value']} {row['unit']} | {row['limit']} "
                         f"| {ratio} | {row['measured']} | {row['detail']} |")
    previous = path.read_text() if path.exists() else ""
    notes = previous.split("<!-- notes -->", 1)[1] if "<!-- notes -->" in previous else "\n"
    path.write_text("\n".join(lines) + "\n\n<!-- notes -->" + notes)


if __name__ == "__main__":
    main(sys.argv[1:])
