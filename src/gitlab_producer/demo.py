"""``gitlab-producer demo``: a simulated GitLab with live activity, the service on embedded
defaults (SQLite store, JSON-lines file), a few rounds, then a check against the ground truth."""

from __future__ import annotations

import asyncio
import shutil
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
from pydantic import SecretStr

from gitlab_producer.config import load_settings
from gitlab_producer.demo_backfill import run_backfill_demo
from gitlab_producer.logs import configure
from gitlab_producer.service import Service
from gitlab_producer.simulator.server import running_simulator
from gitlab_producer.simulator.world import WorldSpec
from gitlab_producer.sync.round import RoundResult


def _say(text: str) -> None:
    print(text, flush=True)


def read_sent_ids(path: Path) -> list[int]:
    """Event ids in a JSON-lines sink file, in order, repeats included."""
    if not path.exists():
        return []
    with path.open("rb") as lines:
        return [int(orjson.loads(line)["headers"]["event_id"]) for line in lines if line.strip()]


def run_demo(rounds: int = 3, out_dir: Path = Path("var/demo")) -> int:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    events_file = out_dir / "events.jsonl"
    spec = WorldSpec(projects=300, users=60, events=20_000, history_days=2.0)
    configure("warning")
    with running_simulator(spec, live_rate=20.0) as sim:
        world = sim.sim.world
        since = datetime.fromtimestamp(world.start_ms / 1000, UTC)
        _say(f"simulated GitLab at {sim.url}/api/v4: {spec.projects} projects, {spec.users} "
             f"users, {spec.events} events over {spec.history_days:g} days, 20 new events/s")
        # The demo runs on embedded defaults whatever the shell has set: the environment
        # would otherwise override these (as it does for the service).
        embedded = {
            "gitlab_base_url": f"{sim.url}/api/v4",
            "gitlab_private_token": SecretStr(sim.sim.token), "sync_since": since,
            "state_path": out_dir / "state.sqlite3",
            "output_file": str(events_file), "kafka_bootstrap_servers": "",
            "redis_address": "", "metrics_port": 0, "log_port": 0, "webhook_port": 0,
            "log_level": "warning", "sync_users": True,
        }
        settings = load_settings(
            None, **embedded, scheduling_poll_interval=2, operations_per_second=200,
            # Events outside projects are only in users' lists; re-read today's active users
            # every round so the final check is exact. The default (600 s) trades that for
            # cost: such events may then arrive up to that much later, never lost.
            user_resync_interval=0,
        ).model_copy(update=embedded)

        async def report(result: RoundResult) -> None:
            _say(f"round: {result.produced:>6} events to {events_file} | projects read "
                 f"{result.synced['project']:>3}, users read {result.synced['user']:>2} | "
                 f"{result.duration_s:5.2f} s | {'complete' if result.ok else result.error}")

        code = asyncio.run(Service(settings, ops_host="127.0.0.1").run(
            max_rounds=rounds, on_round=report))
        sim.sim.live_rate = 0.0
        _say("live activity stopped; one last round to catch up:")
        code = code or asyncio.run(Service(settings, ops_host="127.0.0.1").run(
            once=True, on_round=report))
        truth = httpx.get(f"{sim.url}/_simulator/truth", timeout=30).json()["events"]
        _say("the full object history of ten projects (gitlab-producer backfill):")
        backfilled = run_backfill_demo(settings, sim.url, list(range(1, 11)),
                                       out_dir / "objects.jsonl")
    expected = {row[0] for row in truth}
    sent = read_sent_ids(events_file)
    missing = len(expected - set(sent))
    doubled = len(sent) - len(set(sent))
    with events_file.open("rb") as lines:
        sample = orjson.loads(lines.readline())
    _say("one message as it was produced:")
    _say(orjson.dumps(sample, option=orjson.OPT_INDENT_2).decode())
    _say(f"ground truth: {len(expected)} visible events; delivered {len(set(sent))}; "
         f"missing {missing}; duplicates {doubled}")
    return 0 if code == 0 and backfilled == 0 and missing == 0 and doubled == 0 else 1
