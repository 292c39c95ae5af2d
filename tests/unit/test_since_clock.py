"""SYNC_SINCE's default is the start of GitLab's day by GitLab's clock (its Date header), also
when GitLab does not answer at start-up: the host's clock, a day behind here, must not move it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from gitlab_producer.config import load_settings
from gitlab_producer.gitlab.calendar import DAY_S, utc_day_start
from gitlab_producer.service import SINCE_KEY, Service
from gitlab_producer.simulator.server import free_port
from gitlab_producer.store import SQLiteStore
from tests.conftest import simulator_process
from tests.waits import wait_until_async


async def test_default_since_waits_for_gitlabs_clock(tmp_path: Path) -> None:
    with simulator_process(tmp_path / "sim.log", "--projects", "3", "--users", "2",
                           "--events", "20", clock_shift_s=DAY_S) as sim:
        faults = {"fault_rate": 1.0, "fault_kinds": ["drop"]}  # no answer, no Date header
        httpx.post(f"{sim.url}/_simulator/settings", json=faults, timeout=10)
        settings = load_settings(
            None, gitlab_base_url=f"{sim.url}/api/v4", gitlab_private_token="sim-token",
            state_path=tmp_path / "state.sqlite3", output_file=str(tmp_path / "out.jsonl"),
            metrics_port=free_port(), log_port=free_port(), gitlab_max_retries=0,
            sync_users=False)
        run = asyncio.create_task(Service(settings, ops_host="127.0.0.1").run(once=True))

        async def unanswered() -> bool:  # the token check and the first clock read
            stats = await asyncio.to_thread(sim.get, "/_simulator/stats")
            return sum(stats["arrivals_per_second"].values()) >= 2

        await wait_until_async(unanswered, 30, "two requests left unanswered")
        httpx.post(f"{sim.url}/_simulator/settings", json={"fault_rate": 0.0}, timeout=10)
        code = await asyncio.wait_for(run, 60)
    store = SQLiteStore(settings.state_path)
    try:
        since = float(await store.get_meta(SINCE_KEY) or 0)
    finally:
        await store.close()
    assert since == utc_day_start(time.time() + DAY_S)  # GitLab's day, a day ahead
    assert code == 0  # and the round, once GitLab answered, completed


async def test_a_burst_run_whose_gitlab_never_answers_exits_1(tmp_path: Path) -> None:
    """``--once`` does not wait for GitLab's clock for ever: a few tries, then exit 1, and
    no SYNC_SINCE is fixed from the host's clock."""
    settings = load_settings(
        None, gitlab_base_url=f"http://127.0.0.1:{free_port()}/api/v4",
        gitlab_private_token="sim-token", state_path=tmp_path / "state.sqlite3",
        output_file=str(tmp_path / "out.jsonl"), metrics_port=free_port(),
        log_port=free_port(), gitlab_max_retries=0)
    run = Service(settings, ops_host="127.0.0.1").run(once=True)
    assert await asyncio.wait_for(run, 30) == 1
    store = SQLiteStore(settings.state_path)
    try:
        assert await store.get_meta(SINCE_KEY) is None
    finally:
        await store.close()
