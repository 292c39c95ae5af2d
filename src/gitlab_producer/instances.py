"""The instances working on one Redis, as each one reports itself (``gitlab-producer instances``
and the ``instances_alive`` metric).

Every instance with a Redis store writes a heartbeat every :data:`HEARTBEAT_S`: its id in the
sorted set ``{prefix}instances:seen`` scored by Redis's ``TIME`` (clocks of the machines do
not matter), and what it did so far in the hash ``{prefix}instances`` (requests it reserved
in the shared budget and their wait, events produced, events it took over from an instance
that gave them up or died, rounds). An instance whose heartbeat is older than
:data:`ALIVE_WITHIN_S` (killed), or that said it stopped, is shown as gone; after a day it is
forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aioredis
from prometheus_client import Metric
from redis.exceptions import RedisError

from gitlab_producer.gitlab.shared_budget import budget_use
from gitlab_producer.logs import get_logger
from gitlab_producer.metrics import Metrics
from gitlab_producer.store.base import Store
from gitlab_producer.store.redis_store import RedisStore
from gitlab_producer.sync.round_state import latest_round
from gitlab_producer.tasks import cancel_and_wait

log = get_logger(__name__)
HEARTBEAT_S = 5.0
ALIVE_WITHIN_S = 3 * HEARTBEAT_S
FORGET_AFTER_S = 86_400


def _total(metric: Any, **labels: str) -> float:
    """The sum of a counter's (or a histogram's ``_sum``) samples with ``labels``."""
    collected: list[Metric] = list(metric.collect())
    return float(sum(s.value for m in collected for s in m.samples
                     if s.name.endswith(("_total", "_sum"))
                     and all(s.labels.get(k) == v for k, v in labels.items())))


def instance_id() -> str:
    """host:pid:random, unique across restarts and machines."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def registry_for(store: Store, prefix: str, metrics: Metrics, per_second: float
                 ) -> InstanceRegistry | None:
    """A registry when the store is Redis (where more than one instance may run)."""
    if not isinstance(store, RedisStore):
        return None
    return InstanceRegistry(store.client, prefix, metrics, per_second)


@contextlib.asynccontextmanager
async def heartbeat(registry: InstanceRegistry | None, stop: asyncio.Event
                    ) -> AsyncIterator[None]:
    """Beat while the body runs; leave the set of instances at the end."""
    if registry is None:
        yield
        return
    task = asyncio.create_task(registry.run(stop))
    try:
        yield
    finally:
        await cancel_and_wait(task)
        await registry.leave()


class InstanceRegistry:
    """This instance's heartbeat in Redis."""

    def __init__(self, client: aioredis.Redis, prefix: str, metrics: Metrics, per_second: float,
                 instance: str | None = None) -> None:
        self._redis = client
        self._prefix = prefix
        self._per_second = per_second
        self._seen_key = f"{prefix}instances:seen"
        self._info_key = f"{prefix}instances"
        self.metrics = metrics
        self.instance = instance or instance_id()
        self.started = time.time()

    def report(self) -> dict[str, Any]:
        m = self.metrics
        return {"started": round(self.started, 3),
                "requests_reserved": int(_total(m.budget_reserved)),
                "budget_wait_s": round(_total(m.budget_wait), 3),
                "events_produced": int(_total(m.events_produced)),
                "events_taken_over": int(_total(m.claims_taken_over)),
                "events_held_elsewhere": int(_total(m.claims_held_elsewhere)),
                "round_jobs": {kind: int(_total(m.round_jobs, kind=kind))
                               for kind in ("discover", "project", "user")},
                "round_jobs_taken_over": int(_total(m.round_jobs_taken_over)),
                "round_jobs_requeued": int(_total(m.round_jobs_requeued)),
                "rounds": {outcome: int(_total(m.rounds, outcome=outcome))
                           for outcome in ("success", "failure")}}

    async def beat(self) -> int:
        """Write the heartbeat; returns how many instances are alive (this one included)."""
        now_s, now_us = await self._redis.time()
        now = now_s + now_us / 1e6
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(self._seen_key, {self.instance: now})
            pipe.hset(self._info_key, self.instance, orjson.dumps(self.report()))
            pipe.zrangebyscore(self._seen_key, "-inf", now - FORGET_AFTER_S)
            pipe.zrangebyscore(self._seen_key, now - ALIVE_WITHIN_S, "+inf")
            *_, forgotten, fresh = await pipe.execute()
        if forgotten:
            await self._redis.zrem(self._seen_key, *forgotten)
            await self._redis.hdel(self._info_key, *forgotten)
        reports = await self._redis.hmget(self._info_key, fresh) if fresh else []
        alive = sum(1 for r in reports if r and not orjson.loads(r).get("stopped"))
        self.metrics.instances_alive.set(alive)
        use = await budget_use(self._redis, self._prefix, int(HEARTBEAT_S))
        self.metrics.budget_use.set(sum(use.values()) / (len(use) * self._per_second))
        return alive

    async def run(self, stop: asyncio.Event) -> None:
        """Beat until ``stop``; an unreachable Redis is logged once per outage."""
        failing = False
        while not stop.is_set():
            try:
                await self.beat()
                failing = False
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("instance_heartbeat_failed", error=str(exc))
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_S)

    async def leave(self) -> None:
        """At a clean stop: a last report, marked stopped (a killed one ages out)."""
        report = {**self.report(), "stopped": True}
        with contextlib.suppress(RedisError, OSError):
            await self._redis.hset(self._info_key, self.instance, orjson.dumps(report))


async def cluster_status(client: aioredis.Redis, prefix: str, per_second: float
                         ) -> dict[str, Any]:
    """Instances alive and gone with their reports, and the shared budget's use over the last
    ten whole seconds (across all instances)."""
    now_s, now_us = await client.time()
    now = now_s + now_us / 1e6
    seen: Any = await client.zrange(f"{prefix}instances:seen", 0, -1, withscores=True)
    infos: Any = await client.hgetall(f"{prefix}instances")
    instances = []
    for raw_id, at in seen:
        name = raw_id.decode()
        report = orjson.loads(infos[raw_id]) if raw_id in infos else {}
        instances.append({"instance": name,
                          "alive": now - at <= ALIVE_WITHIN_S and not report.get("stopped"),
                          "last_seen_s_ago": round(now - at, 1), **report})
    use = await budget_use(client, prefix, 10)
    return {"instances_alive": sum(1 for i in instances if i["alive"]),
            "instances": instances,
            "round": await latest_round(client, prefix),
            "budget": {"limit_per_second": per_second,
                       "use": round(sum(use.values()) / (10 * per_second), 3),
                       "per_second": [use[s] for s in sorted(use)]}}

