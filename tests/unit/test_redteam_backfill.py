"""Red-team finding on the backfill: an issue deleted while the offset-paged issue list is read
shifts the later issues one place up, so the first issue of the next page is never read."""

from __future__ import annotations

from pathlib import Path

import httpx

from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.gitlab.transport import AiohttpTransport, RawResponse
from gitlab_producer.objects.delivery import ObjectDeliverer
from gitlab_producer.objects.state import StateStore
from gitlab_producer.simulator.server import running_simulator
from gitlab_producer.simulator.world import WorldSpec
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.unit.test_objects_delivery import ListSink
from tests.unit.test_objects_retry_pass import FailingList, import_once

BIG = WorldSpec(projects=1, users=6, events=30, history_days=1.0, seed=35, quiet_s=7200.0,
                objects_per_project=12, feature_off_share=0.0, big_project_issues=150)


class DeletingAfterFirstPage(FailingList):
    """The real transport; right after the first page of issues, issue 1 is deleted."""

    def __init__(self, inner: AiohttpTransport, sim_url: str) -> None:
        super().__init__(inner, "$^")
        self.sim_url = sim_url
        self.deleted = False

    async def get(self, url: str) -> RawResponse:
        answer = await self.inner.get(url)
        if url.split("?")[0].endswith("/projects/1/issues") and not self.deleted:
            self.deleted = True
            httpx.post(f"{self.sim_url}/_simulator/changes", timeout=10,
                       json={"kind": "delete_issue", "project_id": 1, "iid": 1})
        return answer


async def test_an_issue_deleted_during_the_listing_costs_no_other_issue(tmp_path: Path) -> None:
    with running_simulator(BIG) as sim:
        transport = DeletingAfterFirstPage(
            AiohttpTransport({"PRIVATE-TOKEN": "sim-token"}, 5.0, 8), sim.url)
        client = GitLabClient(f"{sim.url}/api/v4", "sim-token", RateLimiter(1000),
                              transport=transport)
        store = SQLiteStore(tmp_path / "state.db")
        sink = ListSink()
        try:
            await import_once(StateStore(store), client,
                              ObjectDeliverer(store, sink, "p", "s", 3600),
                              frozenset({"issues"}))
        finally:
            await client.aclose()
            await store.close()
        assert transport.deleted
        issues = {m.key.decode() for m in sink.sent if m.topic == "p.issues"}
        assert {f"projects/1/issues/{i}" for i in range(2, 151)} <= issues
