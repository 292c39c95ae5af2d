"""``python -m bench.inprocess_run run --once``: this tree's service with its scale-out parts
swapped for the single-process ones it has for the embedded store, on the same Redis store:
the in-process round (no job engine), this process's own request limiter and its own claims.
For the benchmark only (``scaleout_overhead``): the same code but for the parts whose cost it
measures, so that costs every mode shares (added since the historical baseline) cancel."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import gitlab_producer.gitlab.connect as connect
import gitlab_producer.service as service
import gitlab_producer.sync.context as context
from gitlab_producer.cli import main
from gitlab_producer.config import Settings
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.metrics import Metrics
from gitlab_producer.sync.round import SyncRound


@contextlib.asynccontextmanager
async def in_process_rounds(ctx: Any, settings: Settings, once: bool = False
                            ) -> AsyncIterator[SyncRound]:
    yield SyncRound(ctx, settings.gitlab_concurrency, settings.sync_users)


def own_limiter(settings: Settings, metrics: Metrics) -> RateLimiter:
    metrics.budget_limit.set(settings.operations_per_second)
    return RateLimiter(settings.operations_per_second)


service.round_runner = in_process_rounds  # type: ignore[assignment]
connect.open_budget = own_limiter
context.shared_claims = lambda store, owner: None

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
