"""Checks of the shared request budget against what the simulator saw, that hold on a loaded
machine: the limit is read from the budget's own record of slots, and arrivals are checked to
follow their slots (never ahead of them), not to keep to calendar seconds. On the loaded
2-core test machine a stall of the test's process or of the instances bunched late requests:
a calendar second of 14 arrivals then one of 27 at 20/s, while every second's slots were <= 20.
"""

from __future__ import annotations

import redis

from gitlab_producer.gitlab.shared_budget import budget_keys


def slots_per_second(client: redis.Redis, prefix: str) -> dict[int, int]:
    """The budget's own record: slots handed out per second of Redis's clock (all
    instances)."""
    used = budget_keys(prefix)[2]
    keys = list(client.scan_iter(f"{used}*", count=1000))
    values = client.mget(keys) if keys else []
    return {int(k.decode().removeprefix(used)): int(v) for k, v in zip(keys, values, strict=True)
            if v is not None}


def assert_sent_within_the_budget(arrivals: dict[int, int], slots: dict[int, int],
                                  rate: int) -> None:
    """No second's slots exceed ``rate``, and by the end of every second no more requests
    arrived than slots began (the simulator and Redis share this host's clock; one of slack
    for a sleep's wake-up a hair early across a second's boundary): no request went out
    before its slot, nor without one. A request may arrive late."""
    assert slots and max(slots.values()) <= rate, slots
    arrived_by = slots_by = 0
    for second in range(min(min(slots), min(arrivals)), max(arrivals) + 1):
        arrived_by += arrivals.get(second, 0)
        slots_by += slots.get(second, 0)
        assert arrived_by <= slots_by + 1, (second, arrived_by, slots_by, arrivals, slots)
