"""The one place where the service meets GitLab's API.

Rate limiting, ``Retry-After``, backoff with jitter and error translation all live here; code
that lists projects or events never sleeps and never retries by itself. A 429 with GitLab's
headers pauses the whole budget; one without (a per-endpoint limit) pauses that endpoint
alone, and after ``endpoint_wait_s`` of such waits in one call the call gives up (429), so a
stuck entity is retried in a later round instead of holding up this one. The token travels only
in the ``PRIVATE-TOKEN`` header and never appears in a URL or a log line.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode, urlparse

import orjson

from gitlab_producer.gitlab.calendar import GitLabClock
from gitlab_producer.gitlab.errors import (
    BadRequestError,
    FatalGitLabError,
    ForbiddenError,
    GitLabError,
    NotFoundError,
    ResponseTooLargeError,
    RetriesExhaustedError,
)
from gitlab_producer.gitlab.pagination import (
    DEFAULT_MAX_PAGES,
    KeysetPaginator,
    OffsetPaginator,
    Paginator,
)
from gitlab_producer.gitlab.ratelimit import EndpointPauses, RateLimiter
from gitlab_producer.gitlab.transport import (
    DEFAULT_MAX_BODY,
    AiohttpTransport,
    BodyTooLarge,
    ChunkWrite,
    RawResponse,
    Transport,
    TransportFailure,
    TransportTimeout,
)
from gitlab_producer.logs import get_logger
from gitlab_producer.metrics import Metrics
from gitlab_producer.redaction import host_port, mask_userinfo

log = get_logger(__name__)
Decoder = Callable[[bytes], Any]  # raises ValueError on a body it cannot read
T = TypeVar("T")


class ChunkWriter(Protocol):
    """Where :meth:`GitLabClient.download` streams a body."""

    async def write(self, chunk: bytes) -> None:
        """Take the next chunk."""

    async def abort(self) -> None:
        """Drop what was written: the attempt failed."""


W = TypeVar("W", bound=ChunkWriter)


def decode_json_list(body: bytes) -> list[Any]:
    data = orjson.loads(body)
    if not isinstance(data, list):
        raise ValueError("expected a JSON array")
    return data


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in; userinfo ignored."""
    parsed = urlparse(url)
    try:
        port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    except ValueError:
        port = -1  # never equal to a valid origin
    return parsed.scheme.lower(), (parsed.hostname or "").lower(), port


def _endpoint_key(url: str) -> str:
    """What a 429 without headers holds back: the URL without its query (one entity's list,
    whatever the page)."""
    return url.split("?", 1)[0]


class _Retry(Exception):
    """Internal: this attempt failed in a way worth another try."""

    def __init__(self, reason: str, status: int | None = None,
                 pause_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.pause_s = pause_s  # a 429's pause (Retry-After, RateLimit-Reset or our backoff)


@dataclass(frozen=True)
class Answer:
    """A successful GitLab answer: the body (parsed JSON or raw bytes) and its headers."""

    body: Any
    headers: Mapping[str, str]  # lower-cased names


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter."""

    max_retries: int = 6
    rate_limit_retries: int = 30
    base_s: float = 0.5
    cap_s: float = 30.0
    throttle_base_s: float = 1.0
    throttle_cap_s: float = 60.0
    # GitLab's limits reset within their period (a minute; ten for the projects listing): a
    # longer Retry-After or RateLimit-Reset is a broken or hostile answer, not a reason to
    # stop every request for hours.
    max_pause_s: float = 900.0
    # Seconds one call waits, in all, for its endpoint's own pauses (429s without headers).
    endpoint_wait_s: float = 60.0

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.cap_s, self.base_s * 2.0**attempt))

    def throttle_s(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.throttle_cap_s, self.throttle_base_s * 2.0**attempt)
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


class GitLabClient:
    """Async GitLab REST v4 client sharing one :class:`RateLimiter` across all callers."""

    def __init__(
        self,
        base_url: str,
        token: str,
        limiter: RateLimiter,
        metrics: Metrics | None = None,
        timeout_s: float = 30.0,
        policy: RetryPolicy | None = None,
        transport: Transport | None = None,
        max_connections: int = 32,
        rng: random.Random | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        max_pages: int = DEFAULT_MAX_PAGES,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._origin = _origin(self.base_url)
        self.limiter = limiter
        self.metrics = metrics or Metrics()
        self.policy = policy or RetryPolicy()
        self._rng = rng or random.Random()
        self.endpoint_pauses = EndpointPauses()
        self.max_pages = max_pages
        self.reachable: bool | None = None  # None until the first answer
        self.answered_at: float | None = None  # monotonic time of the last useful answer
        self.clock = GitLabClock(self.metrics.gitlab_clock_skew.set)  # from every answer's Date
        self._http: Transport = transport or AiohttpTransport(
            {"PRIVATE-TOKEN": token, "Accept": "application/json",
             "User-Agent": "gitlab-producer"}, timeout_s, max_connections, max_body)

    async def aclose(self) -> None:
        await self._http.aclose()
        await self.limiter.aclose()

    async def __aenter__(self) -> GitLabClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- single requests ------------------------------------------------------------------
    async def get(self, path: str, params: Mapping[str, Any] | None = None,
                  endpoint: str = "", decode: Decoder | None = orjson.loads) -> Answer:
        """GET ``path`` (relative to the base URL, or a same-origin absolute URL). The body is
        decoded by ``decode`` (JSON by default; ``None`` keeps the bytes); a body that does not
        decode is retried like a 5xx, since GitLab's proxies send truncated or HTML pages."""
        endpoint = endpoint or path
        url = self._url(path, params)
        return await self._retrying(endpoint, url,
                                    lambda: self._attempt(url, endpoint, decode))

    async def download(self, path: str, params: Mapping[str, Any] | None, endpoint: str,
                       open_writer: Callable[[], Awaitable[W]]) -> W:
        """GET ``path`` and stream the body into a writer from ``open_writer`` (one per
        attempt: a failed attempt's writer is aborted). Same budget, retries and errors as
        :meth:`get`; the body is not held in memory, so it has no size cap."""
        url = self._url(path, params)

        async def attempt() -> W:
            writer = await open_writer()
            try:
                await self._attempt(url, endpoint, None, writer.write)
            except BaseException:
                await writer.abort()
                raise
            return writer

        return await self._retrying(endpoint, url, attempt)

    async def _retrying(self, endpoint: str, url: str,
                        attempt: Callable[[], Awaitable[T]]) -> T:
        failures = throttles = 0
        key, waited = _endpoint_key(url), 0.0
        while True:
            pause = self.endpoint_pauses.remaining(key)
            if pause > 0:
                # A pause left by an earlier call is waited out before one try of this call.
                if throttles and waited + pause > self.policy.endpoint_wait_s:
                    raise RetriesExhaustedError(
                        f"{endpoint}: still rate limited (429 without headers) after "
                        f"{waited:.0f} s", 429, retry_in_s=pause)
                waited += pause
                self.metrics.rate_limit_wait.inc(pause)
                await asyncio.sleep(pause)
            try:
                answer = await attempt()
                self.endpoint_pauses.clear(key)
                self.answered_at = time.monotonic()
                return answer
            except _Retry as retry:
                if retry.status == 429:
                    throttles += 1
                    if throttles > self.policy.rate_limit_retries:
                        raise RetriesExhaustedError(
                            f"{endpoint}: still rate limited after {throttles} tries", 429,
                            retry_in_s=retry.pause_s) from None
                    continue  # the pause is set, on the shared limiter or on this endpoint
                failures += 1
                self.metrics.retries.labels(retry.reason).inc()
                if failures > self.policy.max_retries:
                    raise RetriesExhaustedError(
                        f"{endpoint}: gave up after {failures} tries ({retry.reason})",
                        retry.status) from None
                delay = self.policy.backoff_s(failures - 1, self._rng)
                log.info("gitlab_retry", endpoint=endpoint, reason=retry.reason,
                         attempt=failures, delay_s=round(delay, 3))
                await asyncio.sleep(delay)

    def _url(self, path: str, params: Mapping[str, Any] | None) -> str:
        """The full, encoded URL; ``path`` is relative and already encoded, or a link."""
        if "://" in path:
            # Only ever follow links back to the same GitLab (scheme, host and port): the
            # token goes with them, and an https -> http link would send it in clear text.
            if _origin(path) != self._origin:
                raise GitLabError("refusing to follow a link to another origin: "
                                  f"{mask_userinfo(path.split('?', 1)[0])}")
            url = path
        else:
            url = f"{self.base_url}/{path.lstrip('/')}"
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        return url

    async def _attempt(self, url: str, endpoint: str, decode: Decoder | None,
                       write: ChunkWrite | None = None) -> Answer:
        waited = await self.limiter.acquire()
        if waited:
            self.metrics.rate_limit_wait.inc(waited)
        started, sent = time.perf_counter(), time.time()
        try:
            if write is None:
                response = await self._http.get(url)
            else:
                response = await self._http.download(url, write)
        except BodyTooLarge as exc:
            self.metrics.gitlab_requests.labels(endpoint, "too_large").inc()
            raise ResponseTooLargeError(f"{endpoint}: answer refused: {exc} "
                                        "(GITLAB_MAX_BODY)") from None
        except TransportTimeout:
            self.reachable = False
            self.metrics.gitlab_requests.labels(endpoint, "timeout").inc()
            raise _Retry("timeout") from None
        except TransportFailure as exc:
            self.reachable = False
            self.metrics.gitlab_requests.labels(endpoint, "connection").inc()
            raise _Retry(f"connection: {exc}") from None
        finally:
            self.metrics.gitlab_latency.labels(endpoint).observe(time.perf_counter() - started)
        if not response.foreign:  # object storage's clock is not GitLab's
            self.clock.observe(response.headers.get("date"), sent, time.time())
        status, content = response.status, response.body
        self.reachable = status < 500
        self.metrics.gitlab_requests.labels(endpoint, str(status)).inc()
        if status == 429:
            raise _Retry("429", 429, self._on_throttle(response, endpoint, _endpoint_key(url)))
        if status >= 500:
            raise _Retry(f"status {status}", status)
        if 300 <= status < 400:
            # An API answer's redirect is never followed: the token would go along (possibly
            # to another host, or to a link-local metadata address); a download's transport
            # followed what it safely could. Not retried: the answer will not change.
            to = host_port(response.headers.get("location", "")) or "nowhere"
            why = ("a download follows a few http(s) redirects, none to link-local addresses"
                   if write is not None else "is GITLAB_BASE_URL the final URL?")
            raise BadRequestError(f"{endpoint}: GitLab answered {status}, a redirect to {to}: "
                                  f"not followed ({why})", status)
        if status == 401:
            raise FatalGitLabError(f"{endpoint}: GitLab answered 401: the token is wrong, "
                                   "expired or revoked", status)
        if status == 403:
            raise ForbiddenError(f"{endpoint}: GitLab answered 403: the token's account may "
                                 f"not read this: {content[:200]!r}", status)
        if status == 404:
            raise NotFoundError(f"{endpoint}: not found", 404)
        if status >= 400:
            raise BadRequestError(f"{endpoint}: GitLab answered {status}: {content[:200]!r}",
                                  status)
        if decode is None:
            return Answer(content, response.headers)
        if "json" not in response.headers.get("content-type", ""):
            raise _Retry("not json", status)
        try:
            return Answer(decode(content), response.headers)
        except ValueError:
            raise _Retry("bad json", status) from None

    def _on_throttle(self, response: RawResponse, endpoint: str, key: str) -> float:
        self.metrics.throttled.inc()
        pause = None
        retry_after = response.headers.get("retry-after", "")
        reset = response.headers.get("ratelimit-reset", "")
        if retry_after.isdigit():
            pause = float(retry_after)
        elif reset.isdigit():
            pause = max(0.0, float(reset) - self.clock.now())  # an instant in GitLab's time
        if pause is None:
            # gitlab.com's per-endpoint limits (projects, groups, users APIs) send no headers:
            # that endpoint waits, with a backoff of its own; every other request goes on.
            pause = self.policy.throttle_s(self.endpoint_pauses.streak(key), self._rng)
            self.endpoint_pauses.pause(key, pause)
            log.warning("gitlab_endpoint_throttled", endpoint=endpoint, pause_s=round(pause, 3))
            return pause
        if pause > self.policy.max_pause_s:
            log.warning("gitlab_pause_capped", endpoint=endpoint, asked_s=round(pause),
                        pause_s=self.policy.max_pause_s)
            pause = self.policy.max_pause_s
        pause += self._rng.uniform(0, 0.25)
        self.limiter.pause(pause)
        self.metrics.rate_limit_wait.inc(pause)
        log.warning("gitlab_throttled", endpoint=endpoint, pause_s=round(pause, 3))
        return pause

    async def check_token(self) -> None:
        """``GET /user``: raises :class:`FatalGitLabError` when GitLab rejects the token (401),
        or refuses it the API (403: a token without the ``read_api`` scope, a blocked
        account). Other errors (GitLab unreachable) surface as they are."""
        try:
            await self.get("user", endpoint="user")
        except ForbiddenError as exc:
            raise FatalGitLabError("user: GitLab answered 403 for the token's own account: "
                                   "it lacks the read_api scope or the account is blocked",
                                   403) from exc

    # -- pagination -----------------------------------------------------------------------
    async def pages(self, path: str, params: Mapping[str, Any], endpoint: str = "",
                    keyset: bool = False,
                    decode: Callable[[bytes], list[Any]] = decode_json_list,
                    ) -> AsyncIterator[list[Any]]:
        """Every page of a list, following the pagination headers to the end (at most
        ``max_pages``: see :class:`~gitlab_producer.gitlab.pagination.Paginator`)."""
        name = path.split("?", 1)[0]
        paginator: Paginator = (KeysetPaginator if keyset else OffsetPaginator)(
            name, self.max_pages)
        query: dict[str, Any] | None = dict(params)
        target = path
        while True:
            answer = await self.get(target, query, endpoint, decode=decode)
            yield answer.body
            nxt = paginator.next_page(answer.headers)
            if nxt is None:
                return
            if nxt.url is not None:
                target, query = nxt.url, None
            else:
                query = {**params, "page": nxt.page}
