"""Figures of ``gitlab-producer backfill`` (embedded mode, file sink) against the simulator:
requests against the lower bound of a full read, records per second, peak memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import Simulator, cpu_seconds, peak_rss_mb, simulator
from gitlab_producer.config import Settings

PER_PAGE = 100
PROJECT_LISTS = ("repository/branches", "repository/tags", "repository/commits", "labels",
                 "milestones", "releases", "merge_requests", "members/all", "issues",
                 "pipelines", "jobs", "deployments", "protected_branches")
THING_LISTS = ("discussions", "resource_state_events", "resource_label_events",
               "resource_milestone_events")


def pages(count: int) -> int:
    return max(1, math.ceil(count / PER_PAGE))


def lower_bound(out: Path, project_count: int) -> tuple[int, dict[str, int]]:
    """Requests a perfect full read needs, from what was read: every list once at per_page 100
    (an empty list costs its one request), every single object once, each user once. A
    commit list per merge request is counted as one page (the simulator's are all shorter)."""
    per_list: Counter[str] = Counter()
    namespaces: list[str] = []
    users: set[str] = set()
    things: set[str] = set()
    projects: set[str] = set()
    for line in out.read_text().splitlines():
        message = json.loads(line)
        key, kind = message["key"], message["topic"].rsplit(".", 1)[1]
        parts = key.split("/")
        if kind == "projects":
            projects.add(parts[1])
            namespace = message["value"].get("namespace") or {}
            if namespace.get("kind") == "group":
                namespaces.append(namespace["full_path"])
        elif kind == "users":
            users.add(key)
        elif kind in ("issues", "merge_requests"):
            things.add(key)
            per_list[f"projects/{parts[1]}/{kind}"] += 1
        elif kind not in ("notes", "groups"):  # counted per list: the key without its id
            per_list["/".join(parts[:-1])] += 1
    detail = {
        "project_listing": pages(project_count),
        "projects": len(projects),
        "groups": sum(len(n.split("/")) for n in namespaces),
        "project_lists": sum(pages(per_list[f"projects/{p}/{name}"])
                             for p in projects for name in PROJECT_LISTS),
        "thread_and_event_lists": sum(pages(per_list[f"{t}/{name}"])
                                      for t in things for name in THING_LISTS),
        "merge_request_commits": sum(1 for t in things if "/merge_requests/" in t),
        "users": len(users),
    }
    return sum(detail.values()), detail


def backfill_env(sim: Simulator, tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a measured ``gitlab-producer backfill`` (embedded store, file sink
    ``tmp/objects.jsonl``); the caller's own service settings are left out."""
    return {**{k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields},
            "GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
            "OUTPUT_FILE": str(tmp / "objects.jsonl"), "STATE_PATH": str(tmp / "state.sqlite3"),
            "OPERATIONS_PER_SECOND": "5000",
            "BACKFILL_WAITER_INTERVAL": os.environ.get("BENCH_WAITER_INTERVAL", "1"),
            "BACKFILL_CONCURRENCY": "16", "LOG_LEVEL": "warning",
            "METRICS_PORT": "0", "LOG_PORT": "0", **extra}


def run_measured(args: list[str], env: dict[str, str], stdout: Any = subprocess.DEVNULL,
                 ) -> tuple[int, float, float, float]:
    """Run a process to its end: (exit code, wall s, CPU s, peak RSS MB), sampled every
    0.1 s (CPU and RSS of the process itself, not of its children)."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=stdout, stderr=subprocess.DEVNULL)
    peak = cpu = 0.0
    while proc.poll() is None:
        peak = max(peak, peak_rss_mb(proc.pid))
        cpu = max(cpu, cpu_seconds(proc.pid))
        time.sleep(0.1)
    took = time.perf_counter() - started
    return proc.wait(), took, cpu, peak


def user_lookups(env: dict[str, str]) -> dict[str, Any]:
    """The user cache's hits and requests over all projects, from ``gitlab-producer status``
    (its summary line), and the users records in the sink."""
    done = subprocess.run([sys.executable, "-m", "gitlab_producer", "status"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    hits = requests = 0
    for line in done.stdout.splitlines():
        row = json.loads(line)
        lookups = row.get("user_lookups") or {}
        hits += int(lookups.get("cached", 0))
        requests += int(lookups.get("requested", 0))
    keys = [message["key"] for message in map(json.loads, Path(env["OUTPUT_FILE"]).read_text()
                                               .splitlines())
            if message["topic"].endswith(".users")]
    ratio = round(hits / (hits + requests), 3) if hits + requests else None
    return {"hits": hits, "requests": requests, "ratio": ratio, "produced": len(keys),
            "distinct": len(set(keys))}


def backfill_requests() -> list[dict[str, Any]]:
    projects = int(os.environ.get("BENCH_BACKFILL_PROJECTS", "200"))
    users = 100
    with simulator(projects, users, 2000) as sim, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "objects.jsonl"
        env = backfill_env(sim, Path(tmp))
        sim.reset_stats()
        code, took, cpu, peak = run_measured([sys.executable, "-m", "gitlab_producer",
                                              "backfill"], env)
        stats = sim.stats()
        made = int(stats["total"])
        users_seen = user_lookups(env)
        users_seen["user_route"] = sum(stats["by_route"].get("user", {}).values())
        bound, detail = lower_bound(out, projects)
        records = len(out.read_text().splitlines())
    text = ", ".join(f"{k} {v}" for k, v in detail.items())
    return [
        {"figure": "backfill: requests vs lower bound", "value": made, "unit": "requests",
         "limit": f"<= {math.floor(bound * 1.05)} (1.05 x {bound})",
         "ratio": round(made / bound, 3),
         "detail": f"{projects} projects, exit {code}; lower bound: {text}"},
        {"figure": "backfill: records per second", "value": round(records / took),
         "unit": "records/s", "limit": "reported (peers: backfill_peers)", "ratio": None,
         "detail": f"{records} records in {took:.1f} s, {cpu:.1f} s CPU, embedded store, "
                   f"file sink, OPERATIONS_PER_SECOND 5000"},
        {"figure": "backfill: user cache hit ratio", "value": users_seen["ratio"], "unit": "",
         "limit": "reported", "ratio": None,
         "detail": f"user lookups answered by the shared cache: {users_seen['hits']} of "
                   f"{users_seen['hits'] + users_seen['requests']} ({users_seen['requests']} "
                   f"asked GitLab, GET /users/:id: {users_seen['user_route']} requests); "
                   f"{users_seen['produced']} users records, {users_seen['distinct']} "
                   f"distinct"},
        {"figure": "backfill: peak memory", "value": round(peak), "unit": "MB",
         "limit": "<= 300", "ratio": round(peak / 300, 2),
         "detail": f"peak RSS of the backfill process over {records} records"},
    ]


def _object_rounds(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(errors="replace").splitlines()
            if '"object_round_finished"' in line]


def object_sync_idle() -> list[dict[str, Any]]:
    """``run`` with ``SYNC_OBJECTS=true`` on a quiet instance: the backfill, the first object
    round (a sweep, as nothing recorded one yet), then rounds with nothing changed. Requests
    of an object round come from the service's own log line (GitLab requests it made) and
    are checked against the simulator's count over the same idle seconds."""
    projects = int(os.environ.get("BENCH_SYNC_PROJECTS", "200"))
    with (simulator(projects, 100, 2000, quiet_minutes=180) as sim,
          tempfile.TemporaryDirectory() as tmp):
        log = Path(tmp) / "service.log"
        env = {**{k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields},
               "GITLAB_BASE_URL": f"{sim.url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
               "OUTPUT_FILE": str(Path(tmp) / "out.jsonl"),
               "STATE_PATH": str(Path(tmp) / "state.sqlite3"), "OPERATIONS_PER_SECOND": "5000",
               "BACKFILL_WAITER_INTERVAL": "0.2", "BACKFILL_CONCURRENCY": "16",
               "SYNC_OBJECTS": "true", "SCHEDULING_POLL_INTERVAL": "2", "LOG_LEVEL": "info",
               "METRICS_PORT": "0", "LOG_PORT": "0"}
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gitlab_producer", "run"], env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while len(_object_rounds(log)) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            sim.reset_stats()
            counted_from = len(_object_rounds(log))
            while len(_object_rounds(log)) < counted_from + 5 and time.monotonic() < deadline:
                time.sleep(0.2)
            idle_stats = sim.stats()
        finally:
            proc.terminate()
            proc.wait(30)
        rounds = _object_rounds(log)
    sweep, idle = rounds[0], rounds[counted_from:counted_from + 5]
    per_round = [r["requests"] for r in idle]
    median = sorted(per_round)[len(per_round) // 2]
    return [
        {"figure": "object sync: idle round", "value": median, "unit": "requests",
         "limit": "listing pages only", "ratio": None,
         "detail": f"{projects} projects, nothing changed; object rounds' own requests "
                   f"{per_round} (projects read: {[r['projects'] for r in idle]}); the "
                   f"simulator counted {idle_stats['total']} requests of every kind over those "
                   f"rounds and the event rounds beside them: {idle_stats}"},
        {"figure": "object sync: first sweep after the backfill", "value": sweep["requests"],
         "unit": "requests", "limit": "reported", "ratio": None,
         "detail": f"{projects} projects: every list read whole again, only the children of "
                   f"changed parents and open merge requests' commits; produced "
                   f"{sweep['produced']}, deleted {sweep['deleted']}, {sweep['duration_s']} s"},
    ]


def backfill_memory() -> list[dict[str, Any]]:
    """Peak RSS of a full backfill (every kind) at growing instance sizes
    (``BENCH_MEMORY_SIZES``: project counts, each with the simulator's ~64 objects per
    project on average, jobs and resource events on top)."""
    sizes = [int(n) for n in os.environ.get("BENCH_MEMORY_SIZES", "500,1500,3000").split(",")]
    runs = []
    for projects in sizes:
        with (simulator(projects, max(100, projects // 10), 2000) as sim,
              tempfile.TemporaryDirectory() as tmp):
            env = backfill_env(sim, Path(tmp))
            code, took, _cpu, peak = run_measured([sys.executable, "-m", "gitlab_producer",
                                                   "backfill"], env)
            with Path(env["OUTPUT_FILE"]).open("rb") as out:
                records = sum(1 for _line in out)
        runs.append((projects, peak, records, took, code))
        print(f"   {projects} projects: {peak:.0f} MB peak RSS, {records} records in "
              f"{took:.0f} s, exit {code}", flush=True)
    largest = runs[-1]
    growth = largest[1] - runs[0][1]
    text = "; ".join(f"{p} projects: {m:.0f} MB over {r} records in {t:.0f} s (exit {c})"
                     for p, m, r, t, c in runs)
    return [
        {"figure": f"backfill: peak memory, {largest[0]} projects", "value": round(largest[1]),
         "unit": "MB", "limit": "<= 300", "ratio": round(largest[1] / 300, 2),
         "detail": f"every kind, embedded store, file sink; {text}"},
        {"figure": "backfill: peak memory growth with instance size", "value": round(growth),
         "unit": "MB", "limit": "flat", "ratio": None,
         "detail": f"{runs[0][0]} to {largest[0]} projects ({runs[0][2]} to {largest[2]} "
                   f"records): {runs[0][1]:.0f} -> {largest[1]:.0f} MB"},
    ]
