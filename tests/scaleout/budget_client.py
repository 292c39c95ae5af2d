"""One "instance" for the shared-budget tests: a GitLab client on the shared budget that keeps
``CONCURRENCY`` requests waiting for slots for ``SECONDS`` seconds (monotonic: it may run
under faketime), then prints how many it sent.

Usage: python -m tests.scaleout.budget_client REDIS_ADDRESS PREFIX RATE SIM_URL SECONDS
"""

from __future__ import annotations

import asyncio
import sys
import time

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.shared_budget import SharedBudget
from gitlab_producer.metrics import Metrics
from gitlab_producer.store.redis_store import connect

CONCURRENCY = 8
TEST_REDIS_DB = 13


async def main(address: str, prefix: str, rate: float, url: str, seconds: float) -> None:
    budget = SharedBudget(connect(address, db=TEST_REDIS_DB), rate, prefix, Metrics())
    client = GitLabClient(f"{url}/api/v4", "sim-token", budget, timeout_s=10)
    deadline = time.monotonic() + seconds
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while time.monotonic() < deadline:
            await client.get("projects", {"per_page": 1})
            sent += 1

    try:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    finally:
        await client.aclose()
    print(sent, flush=True)


if __name__ == "__main__":
    redis_address, key_prefix, per_second, sim_url, duration = sys.argv[1:6]
    asyncio.run(main(redis_address, key_prefix, float(per_second), sim_url, float(duration)))
