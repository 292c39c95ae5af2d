"""An :class:`Importer` on a test's embedded store whose GitLab never answers: for the
bookkeeping rules, where no job may need GitLab."""

from __future__ import annotations

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.objects.delivery import ObjectDeliverer
from gitlab_producer.objects.engine import LocalDispatcher
from gitlab_producer.objects.stages import Importer, ImportOptions
from gitlab_producer.objects.state import StateStore
from gitlab_producer.objects.streams import KINDS
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.unit.test_objects_delivery import ListSink


def offline_importer(store: SQLiteStore, dispatcher: LocalDispatcher,
                     kinds: frozenset[str] = frozenset(KINDS), waiter_interval_s: float = 1.0
                     ) -> tuple[Importer, GitLabClient]:
    """(the importer, its client: close it after the test)."""
    client = GitLabClient("http://127.0.0.1:9/api/v4", "t", RateLimiter(10))
    importer = Importer(StateStore(store), client,
                        ObjectDeliverer(store, ListSink(), "p", "s", 60), dispatcher,
                        ImportOptions(kinds, waiter_interval_s, 60))
    return importer, client
