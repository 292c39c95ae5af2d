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
