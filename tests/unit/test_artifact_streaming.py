"""Downloads stream to the store in chunks through the one GitLab client; answers held in
memory are capped. Real HTTP on loopback (aiohttp's test server), real fsspec backends."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gitlab_producer.artifact_store import ArtifactStore
from gitlab_producer.gitlab.client import GitLabClient, RetryPolicy
from gitlab_producer.gitlab.errors import ResponseTooLargeError
from gitlab_producer.gitlab.ratelimit import RateLimiter

SHA = "b" * 40
BIG = bytes(range(256)) * (5 * 4096)  # 5 MiB
CAP = 64 * 1024
FAST = RetryPolicy(max_retries=2, base_s=0, cap_s=0)


@pytest.fixture
async def gitlab() -> AsyncIterator[tuple[str, dict[str, int]]]:
    calls = {"flaky": 0}

    async def big(_: web.Request) -> web.StreamResponse:
        return web.Response(body=BIG, content_type="application/zip")

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(20):
            await response.write(b" " * 8192)  # no Content-Length: counted while read
        await response.write_eof()
        return response

    async def bomb(_: web.Request) -> web.Response:
        body = gzip.compress(b"[" + b" " * (4 * CAP) + b"]")
        return web.Response(body=body, headers={"Content-Type": "application/json",
                                                "Content-Encoding": "gzip"})

    async def flaky(request: web.Request) -> web.StreamResponse:
        calls["flaky"] += 1
        if calls["flaky"] == 1:  # half an answer, then the connection drops
            response = web.StreamResponse(headers={"Content-Length": str(len(BIG))})
            await response.prepare(request)
            await response.write(BIG[: len(BIG) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        return web.Response(body=BIG)

    app = web.Application()
    for name, handler in (("big", big), ("chunked", chunked), ("bomb", bomb),
                          ("flaky", flaky)):
        app.router.add_get(f"/api/v4/{name}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/api/v4")), calls
    finally:
        await server.close()


def client_for(base: str) -> GitLabClient:
    return GitLabClient(base, "tok", RateLimiter(1000), timeout_s=10, policy=FAST,
                        max_body=CAP)


@pytest.mark.parametrize("path", ["big", "chunked", "bomb"])
async def test_answers_over_the_cap_are_refused(gitlab: tuple[str, dict[str, int]],
                                                path: str) -> None:
    async with client_for(gitlab[0]) as client:
        with pytest.raises(ResponseTooLargeError, match="GITLAB_MAX_BODY"):
            await client.get(path, decode=None)


async def test_a_download_streams_past_the_cap_into_the_store(
        gitlab: tuple[str, dict[str, int]], tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}")
    writers = []

    async def open_writer():  # type: ignore[no-untyped-def]
        writer = await store.open_writer(1, SHA, "artifacts/build.zip")
        writers.append(writer)
        return writer

    async with client_for(gitlab[0]) as client:
        writer = await client.download("flaky", None, "flaky", open_writer)
    stored = await writer.commit()
    assert gitlab[1]["flaky"] == 2 and len(writers) == 2  # the cut attempt was retried
    assert (tmp_path / "1" / SHA / "artifacts" / "build.zip").read_bytes() == BIG
    assert (stored.size, stored.sha256) == (len(BIG), hashlib.sha256(BIG).hexdigest())
    assert not list(tmp_path.rglob("*.partial"))  # the cut attempt left nothing


@pytest.mark.parametrize("url", ["file://{tmp}", "memory://abort-{name}"])
async def test_an_aborted_write_leaves_nothing(url: str, tmp_path: Path) -> None:
    store = ArtifactStore(url.format(tmp=tmp_path, name=tmp_path.name))
    writer = await store.open_writer(1, SHA, "lib/a.txt")
    await writer.write(b"half of it")
    await writer.abort()
    assert await store.find(1, SHA, "lib/a.txt") is None
    assert not store.fs.find(store.root)
    stored = await store.put(1, SHA, "lib/a.txt", b"all of it")
    again = await store.put(1, SHA, "lib/a.txt", b"all of it")
    assert not stored.skipped and again.skipped and again.sha256 == stored.sha256
    assert store.fs.cat_file(store.target(1, SHA, "lib/a.txt")) == b"all of it"
