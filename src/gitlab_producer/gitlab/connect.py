"""The GitLab client as the settings describe it: token, budget, timeouts, retries, caps.

One constructor for every command (the event rounds, the backfill, captures), so that a
setting such as ``GITLAB_MAX_PAGES`` or the shared budget reaches all of them.
"""

from __future__ import annotations

from gitlab_producer.config import Settings
from gitlab_producer.gitlab.client import GitLabClient, RetryPolicy
from gitlab_producer.gitlab.shared_budget import open_budget
from gitlab_producer.metrics import Metrics


def client_from_settings(settings: Settings, metrics: Metrics, *, max_connections: int,
                         rate_limit_retries: int) -> GitLabClient:
    """A client on the settings' budget (shared in Redis when ``REDIS_ADDRESS`` is set)."""
    s = settings
    return GitLabClient(
        s.gitlab_base_url, s.gitlab_private_token.get_secret_value(),
        open_budget(s, metrics), metrics, s.gitlab_timeout,
        RetryPolicy(max_retries=s.gitlab_max_retries, rate_limit_retries=rate_limit_retries),
        max_connections=max_connections, max_body=s.gitlab_max_body,
        max_pages=s.gitlab_max_pages)
