"""The sync's shared state built from the settings, for every process that reads events
(``run``, and ``worker`` taking the shared rounds' jobs)."""

from __future__ import annotations

import asyncio

from gitlab_producer.config import Settings
from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.metrics import Metrics
from gitlab_producer.sinks.base import Sink
from gitlab_producer.store.base import Store
from gitlab_producer.store.redis_claims import shared_claims
from gitlab_producer.sync.delivery import Deliverer
from gitlab_producer.sync.entities import SyncContext
from gitlab_producer.sync.windows import WindowRules

SINCE_KEY = "since"  # meta: the first round's start, fixed once (GitLab's time)


def sync_context(settings: Settings, client: GitLabClient, store: Store, sink: Sink,
                 metrics: Metrics, since: float, stop: asyncio.Event) -> SyncContext:
    """The context of the rounds: the deliverer (with claims across instances on Redis), the
    windows' margins, the page size and the start."""
    s = settings
    deliverer = Deliverer(store, sink, s.cache_ttl * 60, metrics, s.instance, client.clock.now,
                          shared_claims(store, s.instance))
    rules = WindowRules(s.sync_overlap, s.project_activity_lag, s.user_resync_interval)
    return SyncContext(client, store, deliverer, metrics, rules, s.gitlab_per_page_pagination,
                       since, stop)
