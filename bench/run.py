"""Run the benchmarks and write bench/RESULTS.md: ``python bench/run.py [figure ...]``.

Figures: catch_up, quiet_costs, rate_cap, memory, tail_latency, simulator_throughput,
simulator_size, webhook_latency (default: all). Everything runs on loopback: the simulator
and the service as separate processes, a tansu broker, and the machine's Redis
(``BENCH_REDIS``, default 127.0.0.1:6379).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import figures
from bench.harness import OUT, clean_redis, save_json

ALL = ("catch_up", "quiet_costs", "rate_cap", "memory", "tail_latency", "tail_latency_uncapped",
       "simulator_throughput",
       "simulator_size", "webhook_latency")


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
    results = []
    for name in chosen:
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            found = getattr(figures, name)()
        finally:
            print(f"   (removed {clean_redis()} benchmark keys from Redis)", flush=True)
        for row in found:
            print(f"   {row['figure']}: {row['value']} {row['unit']} (limit {row['limit']})",
                  flush=True)
        results += [dict(row, took_s=round(time.perf_counter() - started)) for row in found]
        save_json(name, found)
    write_results(results, chosen)


def write_results(rows: list[dict[str, object]], names: list[str]) -> None:
    path = Path(__file__).parent / "RESULTS.md"
    lines = [
        "# Benchmark results", "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- command: `python bench/run.py {' '.join(names)}`",
        "- setup: simulator and service in separate processes on loopback, tansu broker "
        "(Kafka protocol), Redis store, one machine shared by all of them", "",
        "| figure | value | limit | ratio to limit | detail |", "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ratio = "" if row["ratio"] is None else row["ratio"]
        lines.append(f"| {row['figure']} | {row['value']} {row['unit']} | {row['limit']} | "
                     f"{ratio} | {row['detail']} |")
    previous = path.read_text() if path.exists() else ""
    notes = previous.split("<!-- notes -->", 1)[1] if "<!-- notes -->" in previous else "\n"
    path.write_text("\n".join(lines) + "\n\n<!-- notes -->" + notes)
    OUT.mkdir(exist_ok=True)


if __name__ == "__main__":
    main(sys.argv[1:])
