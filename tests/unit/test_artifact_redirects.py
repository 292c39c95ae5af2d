"""GitLab with object storage answers an artifact download with a 302 to a signed URL on
another host (the simulator's ``object_storage`` switch): the capture follows it, and the
token goes to GitLab's origin only. Redirect loops end after a few hops."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gitlab_producer.artifact_store import ArtifactStore
from gitlab_producer.capture import Capturer
from gitlab_producer.gitlab.client import GitLabClient, RetryPolicy
from gitlab_producer.gitlab.errors import BadRequestError
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.gitlab.transport import DOWNLOAD_REDIRECTS
from gitlab_producer.simulator import repository as repo
from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from gitlab_producer.sinks.file import FileSink

SHA = "c" * 40
FAST = RetryPolicy(max_retries=1, base_s=0, cap_s=0)


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    with running_simulator(WorldSpec(projects=2, users=2, events=10, seed=5)) as sim:
        yield sim


async def capture_via(sim: SimulatorThread, storage_url: str, tmp_path: Path
                      ) -> dict[str, bytes]:
    """Capture job artifacts with artifact downloads redirected to ``storage_url``; the files
    in the stored archive."""
    httpx.post(f"{sim.url}/_simulator/settings", json={"object_storage": storage_url},
               timeout=10)
    job = repo.job_id_for(1, "main", "build")
    folder = tmp_path / storage_url.split("/")[2].replace(":", "-")
    client = GitLabClient(f"{sim.url}/api/v4", "sim-token", RateLimiter(100), policy=FAST)
    capturer = Capturer(client, ArtifactStore(f"file://{folder}"),
                        FileSink(str(tmp_path / "announced.jsonl"), "artifacts"), (), "gl")
    try:
        await capturer.capture_artifacts(1, SHA, job, "build")
    finally:
        await capturer.sink.close()
        await client.aclose()
    with zipfile.ZipFile(folder / "1" / SHA / "artifacts" / "build.zip") as archive:
        return {name: archive.read(name) for name in archive.namelist()}


async def test_artifacts_follow_the_redirect_without_the_token(simulator: SimulatorThread,
                                                               tmp_path: Path) -> None:
    port = simulator.url.rsplit(":", 1)[1]
    expected = repo.artifact_files(1, repo.job_id_for(1, "main", "build"))
    # Another origin (the bucket's host name differs): followed, without PRIVATE-TOKEN.
    assert await capture_via(simulator, f"http://localhost:{port}", tmp_path) == expected
    stats = httpx.get(f"{simulator.url}/_simulator/stats", timeout=10).json()
    assert stats["by_route"]["artifacts"] == {"302": 1}
    assert stats["object_storage"] == {"served": 1, "token_seen": 0}
    # GitLab's own origin keeps the token (the count above could see one).
    assert await capture_via(simulator, simulator.url, tmp_path) == expected
    stats = httpx.get(f"{simulator.url}/_simulator/stats", timeout=10).json()
    assert stats["object_storage"] == {"served": 2, "token_seen": 1}


async def test_redirect_loops_end_after_a_few_hops(tmp_path: Path) -> None:
    hops = []

    async def loop(request: web.Request) -> web.Response:
        hops.append(request.path)
        return web.Response(status=302, headers={"Location": "/api/v4/loop"})

    app = web.Application()
    app.router.add_get("/api/v4/loop", loop)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    store = ArtifactStore(f"file://{tmp_path}")
    try:
        async with GitLabClient(str(server.make_url("/api/v4")), "tok", RateLimiter(100),
                                policy=FAST) as client:
            with pytest.raises(BadRequestError, match="302, a redirect to"):
                await client.download("loop", None, "loop",
                                      lambda: store.open_writer(1, SHA, "a.zip"))
    finally:
        await server.close()
    assert len(hops) == 1 + DOWNLOAD_REDIRECTS  # not retried either
