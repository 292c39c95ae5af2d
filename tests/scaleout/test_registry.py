"""Instances alive on one Redis: heartbeats, a killed instance ageing out, a clean stop."""

from __future__ import annotations

import os
import subprocess
import sys

from gitlab_producer.instances import ALIVE_WITHIN_S, InstanceRegistry, cluster_status
from gitlab_producer.metrics import Metrics
from gitlab_producer.store.redis_store import connect
from tests.conftest import TEST_REDIS_DB


async def test_alive_killed_and_stopped_instances(redis_address: str,
                                                  redis_prefix: str) -> None:
    client = connect(redis_address, db=TEST_REDIS_DB)
    metrics = [Metrics() for _ in range(3)]
    one, killed, stopped = (InstanceRegistry(client, redis_prefix, m, 10.0, f"i{n}")
                            for n, m in enumerate(metrics))
    try:
        metrics[0].budget_reserved.inc(7)
        metrics[0].claims_taken_over.inc(2)
        for registry in (killed, stopped, one):
            await registry.beat()
        assert metrics[0].instances_alive._value.get() == 3
        # The killed one's last heartbeat is older than the liveness window.
        now_s, _ = await client.time()
        await client.zadd(f"{redis_prefix}instances:seen",
                          {"i1": now_s - ALIVE_WITHIN_S - 1})
        await stopped.leave()
        found = await cluster_status(client, redis_prefix, 10.0)
        by_name = {i["instance"]: i for i in found["instances"]}
        assert found["instances_alive"] == 1
        assert [by_name[n]["alive"] for n in ("i0", "i1", "i2")] == [True, False, False]
        assert by_name["i0"]["requests_reserved"] == 7
        assert by_name["i0"]["events_taken_over"] == 2
        assert by_name["i2"]["stopped"] is True
        assert await one.beat() == 1  # the metric too: only itself is alive now
    finally:
        await client.aclose()


def test_instances_command_needs_redis() -> None:
    done = subprocess.run([sys.executable, "-m", "gitlab_producer", "instances"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={"GITLAB_PRIVATE_TOKEN": "x", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "config error: REDIS_ADDRESS: empty (the embedded store has one instance: this "
        "command reads the instances of a Redis)"]
