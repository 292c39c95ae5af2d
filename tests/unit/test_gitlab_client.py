"""GitLab client: status -> behaviour table, backoff, 429 handling, pagination, token hygiene.

Unit tests on a scripted transport (no network, no sleeping: the retry policy's delays are 0);
the real aiohttp transport is exercised against the simulator at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlparse

import orjson
import pytest

from gitlab_producer.gitlab.client import GitLabClient, RetryPolicy
from gitlab_producer.gitlab.errors import (
    BadRequestError,
    FatalGitLabError,
    ForbiddenError,
    GitLabError,
    NotFoundError,
    PaginationError,
    RetriesExhaustedError,
)
from gitlab_producer.gitlab.pagination import KeysetPaginator, OffsetPaginator, parse_link
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.gitlab.transport import (
    AiohttpTransport,
    RawResponse,
    TransportFailure,
    TransportTimeout,
)

BASE = "https://gitlab.test/api/v4"
FAST = RetryPolicy(max_retries=3, rate_limit_retries=3, base_s=0, cap_s=0, throttle_base_s=0,
                   throttle_cap_s=0)
JSON = {"content-type": "application/json"}


def answer(status: int, body: object = None, text: str | None = None, html: str | None = None,
           headers: dict[str, str] | None = None) -> RawResponse:
    if html is not None:
        return RawResponse(status, {"content-type": "text/html", **(headers or {})},
                           html.encode())
    if text is not None:
        return RawResponse(status, {"content-type": "text/plain", **(headers or {})},
                           text.encode())
    return RawResponse(status, {**JSON, **(headers or {})}, orjson.dumps(body))


class ScriptedTransport:
    """Answers each GET from a function of the URL; records what was asked."""

    def __init__(self, handler: Callable[[str], RawResponse]) -> None:
        self.handler = handler
        self.urls: list[str] = []

    async def get(self, url: str) -> RawResponse:
        self.urls.append(url)
        return self.handler(url)

    async def aclose(self) -> None:
        return None


def make_client(handler: Callable[[str], RawResponse],
                policy: RetryPolicy = FAST) -> tuple[GitLabClient, ScriptedTransport]:
    transport = ScriptedTransport(handler)
    return GitLabClient(BASE, "tok-secret", RateLimiter(10_000), timeout_s=1, policy=policy,
                        transport=transport), transport


def scripted(*responses: RawResponse | Exception) -> Callable[[str], RawResponse]:
    queue = list(responses)

    def handler(_: str) -> RawResponse:
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, Exception):
            raise item
        return item

    return handler


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlparse(url).query).items()}


OK = answer(200, [{"id": 1}])


@pytest.mark.parametrize("first", [
    answer(500, {"message": "500"}),
    answer(502, html="<html>502</html>"),
    answer(503, text="unavailable"),
    RawResponse(200, JSON, b'[{"id": 1'),  # truncated JSON
    answer(200, html="<html>login</html>"),  # HTML instead of JSON
    TransportTimeout("slow"),
    TransportFailure("ConnectionRefusedError"),
    TransportFailure("ServerDisconnectedError"),
    answer(429, text="Retry later"),
])
async def test_retriable_answers_are_retried(first: RawResponse | Exception) -> None:
    client, transport = make_client(scripted(first, OK))
    got = await client.get("projects")
    assert got.body == [{"id": 1}]
    assert len(transport.urls) == 2
    await client.aclose()


@pytest.mark.parametrize("status,error", [
    (401, FatalGitLabError), (403, ForbiddenError), (404, NotFoundError),
    (400, BadRequestError), (405, BadRequestError), (422, BadRequestError),
])
async def test_non_retriable_statuses_raise_at_once(status: int,
                                                    error: type[GitLabError]) -> None:
    client, transport = make_client(scripted(answer(status, {"message": "x"})))
    with pytest.raises(error):
        await client.get("projects")
    assert len(transport.urls) == 1


async def test_only_401_is_fatal_and_403_names_one_resource() -> None:
    """A 401 is the token's problem: fatal. A 403 on one resource is that resource's problem
    (the sync skips the entity): it must not be a FatalGitLabError, which stops the round."""
    client, _ = make_client(scripted(answer(403, {"message": "403 Forbidden"})))
    with pytest.raises(ForbiddenError, match="projects/7/events") as forbidden:
        await client.get("projects/7/events")
    assert not isinstance(forbidden.value, FatalGitLabError)
    assert forbidden.value.status == 403
    client, _ = make_client(scripted(answer(401, {"message": "401 Unauthorized"})))
    with pytest.raises(FatalGitLabError, match="401"):
        await client.get("projects/7/events")


@pytest.mark.parametrize("status", [401, 403])
async def test_token_check_reads_the_own_account(status: int) -> None:
    client, transport = make_client(scripted(answer(status, {"message": "x"})))
    with pytest.raises(FatalGitLabError, match=str(status)):
        await client.check_token()
    assert transport.urls == [f"{BASE}/user"]
    client, _ = make_client(scripted(answer(200, {"id": 1, "username": "bot"})))
    await client.check_token()


async def test_retries_are_bounded_then_reported() -> None:
    client, transport = make_client(scripted(answer(502, html="<html/>")))
    with pytest.raises(RetriesExhaustedError, match="gave up after 4 tries"):
        await client.get("projects")
    assert len(transport.urls) == FAST.max_retries + 1


async def test_429_pauses_everyone_for_retry_after() -> None:
    client, _ = make_client(scripted(
        answer(429, text="Retry later", headers={"retry-after": "7"}), OK))
    paused: list[float] = []
    client.limiter.pause = paused.append  # type: ignore[method-assign]
    await client.get("projects/1/events")
    assert len(paused) == 1 and 7 <= paused[0] <= 7.25


@pytest.mark.parametrize("header", ["retry-after", "ratelimit-reset"])
async def test_a_huge_pause_asked_by_a_429_is_capped(header: str) -> None:
    """A Retry-After of a day (or a reset years ahead) must not stop every request."""
    client, _ = make_client(scripted(
        answer(429, text="Retry later", headers={header: "99999999999"}), OK))
    paused: list[float] = []
    client.limiter.pause = paused.append  # type: ignore[method-assign]
    await client.get("projects/1/events")
    cap = FAST.max_pause_s
    assert len(paused) == 1 and cap <= paused[0] <= cap + 0.25


async def test_429_without_headers_pauses_that_endpoint_alone() -> None:
    """A per-endpoint limit's 429 (no header): that endpoint backs off on its own, growing,
    and gives up after ``endpoint_wait_s``; the budget is not paused, other endpoints go on."""
    policy = RetryPolicy(base_s=0, cap_s=0, throttle_base_s=0.2, throttle_cap_s=1,
                         endpoint_wait_s=0.5)
    bare = answer(429, {"message": {"error": "This endpoint has been requested too many times."}})
    client, transport = make_client(lambda url: bare if "/projects/1/" in url else OK, policy)
    paused: list[float] = []
    client.limiter.pause = paused.append  # type: ignore[method-assign]
    stuck = asyncio.create_task(client.get("projects/1/events"))
    await asyncio.sleep(0.02)
    started = time.monotonic()
    assert (await client.get("projects/2/events")).body == [{"id": 1}]
    assert time.monotonic() - started < 0.09 and not stuck.done()  # a pause is >= 0.1 s
    with pytest.raises(RetriesExhaustedError, match="429 without headers") as gave_up:
        await stuck
    assert gave_up.value.status == 429 and paused == []
    assert 2 <= sum("/projects/1/" in url for url in transport.urls) <= 4  # 0.1-0.2, 0.2-0.4 s


async def test_token_never_in_the_url() -> None:
    client, transport = make_client(scripted(OK))
    await client.get("projects", {"per_page": 5})
    assert transport.urls == [f"{BASE}/projects?per_page=5"]
    assert "tok-secret" not in transport.urls[0]


@pytest.mark.parametrize("link", [
    "https://evil.test/api/v4/projects?page=2",
    "http://gitlab.test/api/v4/projects?page=2",  # a downgrade: the token in clear text
    "https://gitlab.test:8443/api/v4/projects?page=2",
    "https://gitlab.test:99999/api/v4/projects?page=2",
    "https://gitlab.test@evil.test/api/v4/projects?page=2",
])
async def test_links_to_another_origin_are_refused(link: str) -> None:
    client, transport = make_client(scripted(OK))
    with pytest.raises(GitLabError, match="another origin"):
        await client.get(link)
    assert not transport.urls


@pytest.mark.parametrize("link", ["https://gitlab.test/api/v4/projects?page=2",
                                  "https://GitLab.test:443/api/v4/projects?page=2"])
async def test_links_to_the_same_origin_are_followed(link: str) -> None:
    client, transport = make_client(scripted(OK))
    await client.get(link)
    assert transport.urls == [link]


async def test_pages_follow_headers_past_short_and_empty_pages() -> None:
    pages = {
        "1": answer(200, [{"id": 3}], headers={"x-next-page": "2"}),
        "2": answer(200, [], headers={"x-next-page": "3"}),
        "3": answer(200, [{"id": 1}], headers={"x-next-page": ""}),
    }
    client, _ = make_client(lambda url: pages[query(url).get("page", "1")])
    got = [page async for page in client.pages("projects/1/events", {"per_page": 2})]
    assert got == [[{"id": 3}], [], [{"id": 1}]]


async def test_keyset_pages_follow_the_next_link_exactly() -> None:
    link = f"{BASE}/users?pagination=keyset&cursor=eyJpZCI6Nn0%3D"

    def handler(url: str) -> RawResponse:
        if "cursor" not in url:
            return answer(200, [{"id": 1}], headers={"link": f'<{link}>; rel="next"'})
        assert url == link  # followed as given, not rebuilt or re-encoded
        return answer(200, [])

    client, _ = make_client(handler)
    got = [page async for page in client.pages("users", {"pagination": "keyset"},
                                               keyset=True)]
    assert got == [[{"id": 1}], []]


async def test_endless_pagination_is_capped_naming_the_list() -> None:
    """A server that always offers another (new) page: loop detection cannot see it; the
    page cap stops the list with an error naming it."""
    def always_more(url: str) -> RawResponse:
        page = int(query(url).get("page", 1))
        # (Bounded, so that a broken cap fails the test instead of hanging it.)
        return answer(200, [], headers={"x-next-page": str(page + 1) if page < 1000 else ""})

    client, transport = make_client(always_more)
    client.max_pages = 25
    with pytest.raises(PaginationError, match=r"projects/3/events: .* after 25 pages"):
        async for _ in client.pages("projects/3/events", {"per_page": 100}):
            pass
    assert len(transport.urls) == 25
    # A list of exactly max_pages pages is read to its end.
    def pages_to_25(url: str) -> RawResponse:
        page = int(query(url).get("page", 1))
        return answer(200, [{"id": page}], headers={"x-next-page": str(page + 1) if page < 25
                                                    else ""})

    client, _ = make_client(pages_to_25)
    client.max_pages = 25
    assert len([p async for p in client.pages("projects/3/events", {})]) == 25


def test_paginators_read_headers_and_refuse_loops() -> None:
    offset = OffsetPaginator()
    assert offset.next_page({"x-next-page": "4"}).page == 4  # type: ignore[union-attr]
    assert offset.next_page({"x-next-page": ""}) is None
    with pytest.raises(PaginationError, match="loop"):
        offset.next_page({"x-next-page": "4"})
    keyset = KeysetPaginator()
    link = '<https://g/api/v4/projects?id_after=9>; rel="next", <https://g/x>; rel="first"'
    assert keyset.next_page({"link": link}).url == "https://g/api/v4/projects?id_after=9"  # type: ignore[union-attr]
    assert keyset.next_page({}) is None
    assert parse_link(None) == {}


async def test_aiohttp_transport_maps_failures() -> None:
    from gitlab_producer.simulator.server import running_simulator
    from gitlab_producer.simulator.world import WorldSpec

    spec = WorldSpec(projects=2, users=2, events=10)
    for kind, error in (("drop", TransportFailure), ("slow", TransportTimeout)):
        with running_simulator(spec, fault_rate=1.0, fault_kinds=(kind,), slow_s=2.0) as sim:
            transport = AiohttpTransport({"PRIVATE-TOKEN": "sim-token"}, 0.5, 4)
            with pytest.raises(error):
                await transport.get(f"{sim.url}/api/v4/projects/1/events")
            await transport.aclose()
    with running_simulator(spec) as sim:
        transport = AiohttpTransport({"PRIVATE-TOKEN": "sim-token"}, 5, 4)
        ok = await transport.get(f"{sim.url}/api/v4/projects/1/events?per_page=5")
        assert ok.status == 200 and ok.headers["x-per-page"] == "5"
        await transport.aclose()
    refused = AiohttpTransport({}, 2, 1)
    with pytest.raises(TransportFailure):
        await refused.get("http://127.0.0.1:1/api/v4/projects")
    await refused.aclose()
