"""GitLab client: status -> behaviour table, backoff, 429 handling, pagination, token hygiene.

Unit tests on httpx's MockTransport (no network, no sleeping: the retry policy's delays are 0).
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from gitlab_producer.gitlab.client import GitLabClient, RetryPolicy
from gitlab_producer.gitlab.errors import (
    BadRequestError,
    FatalGitLabError,
    GitLabError,
    NotFoundError,
    RetriesExhaustedError,
)
from gitlab_producer.gitlab.pagination import KeysetPaginator, OffsetPaginator, parse_link
from gitlab_producer.gitlab.ratelimit import RateLimiter

BASE = "https://gitlab.test/api/v4"
FAST = RetryPolicy(max_retries=3, rate_limit_retries=3, base_s=0, cap_s=0, throttle_base_s=0,
                   throttle_cap_s=0)
JSON = {"content-type": "application/json"}


def make_client(handler: Callable[[httpx.Request], httpx.Response],
                policy: RetryPolicy = FAST) -> GitLabClient:
    return GitLabClient(BASE, "tok-secret", RateLimiter(10_000), timeout_s=1, policy=policy,
                        transport=httpx.MockTransport(handler))


def scripted(*responses: httpx.Response | Exception) -> tuple[
        Callable[[httpx.Request], httpx.Response], list[httpx.Request]]:
    seen: list[httpx.Request] = []
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, Exception):
            raise item
        return item

    return handler, seen


OK = httpx.Response(200, json=[{"id": 1}])


@pytest.mark.parametrize("first,retried", [
    (httpx.Response(500, json={"message": "500"}), True),
    (httpx.Response(502, html="<html>502</html>"), True),
    (httpx.Response(503, text="unavailable"), True),
    (httpx.Response(200, content=b'[{"id": 1', headers=JSON), True),  # truncated JSON
    (httpx.Response(200, html="<html>login</html>"), True),  # HTML instead of JSON
    (httpx.ReadTimeout("slow"), True),
    (httpx.ConnectError("refused"), True),
    (httpx.RemoteProtocolError("dropped"), True),
    (httpx.Response(429, text="Retry later"), True),
])
async def test_retriable_answers_are_retried(first: httpx.Response | Exception,
                                             retried: bool) -> None:
    handler, seen = scripted(first, OK)
    async with make_client(handler) as client:
        answer = await client.get("projects")
    assert answer.body == [{"id": 1}]
    assert len(seen) == 2 if retried else 1


@pytest.mark.parametrize("status,error", [
    (401, FatalGitLabError), (403, FatalGitLabError), (404, NotFoundError),
    (400, BadRequestError), (405, BadRequestError), (422, BadRequestError),
])
async def test_non_retriable_statuses_raise_at_once(status: int,
                                                    error: type[GitLabError]) -> None:
    handler, seen = scripted(httpx.Response(status, json={"message": "x"}))
    async with make_client(handler) as client:
        with pytest.raises(error):
            await client.get("projects")
    assert len(seen) == 1


async def test_retries_are_bounded_then_reported() -> None:
    handler, seen = scripted(httpx.Response(502, html="<html/>"))
    async with make_client(handler) as client:
        with pytest.raises(RetriesExhaustedError, match="gave up after 4 tries"):
            await client.get("projects")
    assert len(seen) == FAST.max_retries + 1


async def test_429_pauses_everyone_for_retry_after() -> None:
    handler, _ = scripted(httpx.Response(429, text="Retry later", headers={"Retry-After": "7"}),
                          OK)
    client = make_client(handler)
    paused: list[float] = []
    client.limiter.pause = paused.append  # type: ignore[method-assign]
    await client.get("projects/1/events")
    assert len(paused) == 1 and 7 <= paused[0] <= 7.25
    await client.aclose()


async def test_429_without_headers_backs_off_on_its_own() -> None:
    handler, _ = scripted(httpx.Response(429, text="Retry later"),
                          httpx.Response(429, text="Retry later"), OK)
    policy = RetryPolicy(base_s=0, cap_s=0, throttle_base_s=2, throttle_cap_s=60)
    client = make_client(handler, policy)
    paused: list[float] = []
    client.limiter.pause = paused.append  # type: ignore[method-assign]
    await client.get("projects")
    assert 1 <= paused[0] <= 2 and 2 <= paused[1] <= 4  # grows without a header to follow
    await client.aclose()


async def test_token_only_in_the_header() -> None:
    handler, seen = scripted(OK)
    async with make_client(handler) as client:
        await client.get("projects", {"per_page": 5})
    request = seen[0]
    assert request.headers["PRIVATE-TOKEN"] == "tok-secret"
    assert "tok-secret" not in str(request.url)


async def test_links_to_another_host_are_refused() -> None:
    handler, seen = scripted(OK)
    async with make_client(handler) as client:
        with pytest.raises(GitLabError, match="another host"):
            await client.get("https://evil.test/api/v4/projects?page=2")
    assert not seen


async def test_pages_follow_headers_past_short_and_empty_pages() -> None:
    pages = {
        "1": httpx.Response(200, json=[{"id": 3}], headers={"x-next-page": "2"}),
        "2": httpx.Response(200, json=[], headers={"x-next-page": "3"}),
        "3": httpx.Response(200, json=[{"id": 1}], headers={"x-next-page": ""}),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return pages[request.url.params.get("page", "1")]

    async with make_client(handler) as client:
        got = [page async for page in client.pages("projects/1/events", {"per_page": 2})]
    assert got == [[{"id": 3}], [], [{"id": 1}]]


async def test_keyset_pages_follow_the_next_link() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        after = request.url.params.get("id_after")
        if after is None:
            link = f'<{BASE}/projects?pagination=keyset&id_after=2>; rel="next"'
            return httpx.Response(200, json=[{"id": 1}, {"id": 2}], headers={"link": link})
        return httpx.Response(200, json=[])

    async with make_client(handler) as client:
        got = [page async for page in client.pages("projects", {"pagination": "keyset"},
                                                   keyset=True)]
    assert got == [[{"id": 1}, {"id": 2}], []]


def test_paginators_read_headers_and_refuse_loops() -> None:
    offset = OffsetPaginator()
    assert offset.next_page({"x-next-page": "4"}).page == 4  # type: ignore[union-attr]
    assert offset.next_page({"x-next-page": ""}) is None
    with pytest.raises(GitLabError, match="loop"):
        offset.next_page({"x-next-page": "4"})
    keyset = KeysetPaginator()
    link = '<https://g/api/v4/projects?id_after=9>; rel="next", <https://g/x>; rel="first"'
    assert keyset.next_page({"link": link}).url == "https://g/api/v4/projects?id_after=9"  # type: ignore[union-attr]
    assert keyset.next_page({}) is None
    assert parse_link(None) == {}
