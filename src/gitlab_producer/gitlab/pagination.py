"""Paginators: where the next page is, read only from the headers GitLab sends.

GitLab filters visibility after paging, so a short (even empty) page is not the end; only the
headers say so. ``X-Total`` is never trusted (GitLab drops it past 10,000 rows). A list that
offers a page it already offered, or more pages than ``max_pages``, raises
:class:`PaginationError` naming the list: a broken proxy or server must not keep a round
running for ever.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gitlab_producer.gitlab.errors import PaginationError

# Pages per list before it is abandoned as endless: 2,000,000 rows at 100 per page, 40 times
# GitLab's own 50,000-row offset limit. No list this service reads comes near it: an instance
# of 100,000 users lists them in 1,000 pages, and an entity's events are read only from its
# cursor. GITLAB_MAX_PAGES changes it (a first read from a distant SYNC_SINCE of a very
# busy project may need more).
DEFAULT_MAX_PAGES = 20_000
_LINK_RE = re.compile(r'<([^>]+)>\s*;\s*rel="([^"]+)"')


def parse_link(header: str | None) -> dict[str, str]:
    """``Link`` header -> {rel: url}."""
    return {rel: url for url, rel in _LINK_RE.findall(header or "")}


@dataclass(frozen=True)
class NextPage:
    """Where the next request goes: a full URL (keyset) or a page number (offset)."""

    url: str | None = None
    page: int | None = None


class Paginator:
    """Reads the next-page token from response headers; refuses to loop or to go on past
    ``max_pages`` pages (``None``: no cap). ``name`` names the list in the errors."""

    def __init__(self, name: str = "", max_pages: int | None = None) -> None:
        self._seen: set[NextPage] = set()
        self.name = name
        self.max_pages = max_pages

    def next_page(self, headers: Mapping[str, str]) -> NextPage | None:
        found = self._find(headers)
        if found is not None:
            if found in self._seen:
                raise PaginationError(f"{self.name}: pagination loop: {found} was already "
                                      "requested")
            if self.max_pages is not None and len(self._seen) + 1 >= self.max_pages:
                raise PaginationError(
                    f"{self.name}: still offers a next page after {self.max_pages} pages "
                    "(GITLAB_MAX_PAGES); the list was abandoned")
            self._seen.add(found)
        return found

    def _find(self, headers: Mapping[str, str]) -> NextPage | None:
        raise NotImplementedError


class OffsetPaginator(Paginator):
    """``X-Next-Page`` (empty on the last page), falling back to ``Link: rel="next"``."""

    def _find(self, headers: Mapping[str, str]) -> NextPage | None:
        nxt = headers.get("x-next-page")
        if nxt is not None:
            return NextPage(page=int(nxt)) if nxt.strip().isdigit() else None
        link = parse_link(headers.get("link")).get("next")
        return NextPage(url=link) if link else None


class KeysetPaginator(Paginator):
    """Keyset answers carry only ``Link: rel="next"``; follow it, never build it."""

    def _find(self, headers: Mapping[str, str]) -> NextPage | None:
        link = parse_link(headers.get("link")).get("next")
        return NextPage(url=link) if link else None


# How far before the last timestamp seen the next request starts: GitLab renders
# milliseconds, and some lists filter ``>=`` (issues) where others filter ``>`` (pipelines);
# starting a millisecond earlier reads the last items again under both, never past them.
CURSOR_OVERLAP = timedelta(milliseconds=1)


def cursor_text(at: datetime) -> str:
    """A cursor as a query value: UTC, milliseconds (GitLab parses any ISO 8601)."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_cursor(text: object) -> datetime | None:
    """GitLab's timestamp text (any offset) -> an aware datetime (None when absent or bad)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        found = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return found if found.tzinfo is not None else found.replace(tzinfo=UTC)


@dataclass(frozen=True)
class TimeCursor:
    """Where a list read in ascending order of a timestamp goes on: from ``after`` (None: the
    start) and, inside a run of objects sharing one timestamp, the ``page`` of that run."""

    after: datetime | None = None
    page: int = 1


class TimeCursorPaginator:
    """Follows a list ordered by a timestamp, ascending, by moving the time filter to the
    last timestamp read instead of counting pages: an object deleted meanwhile shifts
    nothing, and one edited meanwhile moves to the end, where it is read again. Only a page
    whose objects all fall in the overlap (a run of more than a page sharing one timestamp)
    is followed by the next page number of that run, so such a run cannot loop. The end is
    what the offset headers say. The cursor only moves forward (a later time, or the next
    page at the same time), so it cannot loop; a list that never ends is abandoned after
    ``max_pages`` requests as every other list."""

    def __init__(self, name: str, max_pages: int | None, start: TimeCursor) -> None:
        self.name = name
        self.max_pages = max_pages
        self.current = start
        self.requests = 1  # the request of ``start`` is the first

    def advance(self, headers: Mapping[str, str],
                stamps: list[datetime]) -> TimeCursor | None:
        """The cursor after a page with the timestamps ``stamps`` (None: the list ended)."""
        if OffsetPaginator().next_page(headers) is None:
            return None
        current = self.current
        start = max(stamps) - CURSOR_OVERLAP if stamps else None
        if start is not None and (current.after is None or start > current.after):
            found = TimeCursor(start)
        else:
            found = TimeCursor(current.after, current.page + 1)
        if self.max_pages is not None and self.requests >= self.max_pages:
            raise PaginationError(
                f"{self.name}: still offers a next page after {self.max_pages} pages "
                "(GITLAB_MAX_PAGES); the list was abandoned")
        self.requests += 1
        self.current = found
        return found
