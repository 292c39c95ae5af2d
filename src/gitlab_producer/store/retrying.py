"""Waiting out a store that does not answer: the service's rounds and the import worker's
start retry it with capped exponential backoff instead of failing (a Redis restarting, or
started after the service)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gitlab_producer.logs import get_logger
from gitlab_producer.metrics import Metrics
from gitlab_producer.store.base import StoreError

log = get_logger(__name__)
RETRY_FIRST_S = 1.0  # after a round or start-up step that failed as a whole, doubling ...
RETRY_CAP_S = 60.0  # ... up to this
T = TypeVar("T")


def retry_delay(failures: int) -> float:
    """Seconds before the next try after ``failures`` consecutive failures (>= 1)."""
    return float(min(RETRY_CAP_S, RETRY_FIRST_S * 2 ** min(failures - 1, 16)))


async def until_the_store_answers(step: str, work: Callable[[], Awaitable[T]],
                                  metrics: Metrics) -> T:
    """``work()`` until the store answers it, backing off; each failure is logged
    (``store_unreachable``) and counted. The caller bounds it (by its stop signal)."""
    failures = 0
    while True:
        try:
            return await work()
        except StoreError as exc:
            failures += 1
            delay = retry_delay(failures)
            metrics.store_retries.inc()
            log.warning("store_unreachable", step=step, error=str(exc),
                        attempt=failures, retry_in_s=delay)
            await asyncio.sleep(delay)
