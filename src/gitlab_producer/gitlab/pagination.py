"""Paginators: where the next page is, read only from the headers GitLab sends.

GitLab filters visibility after paging, so a short (even empty) page is not the end; only the
headers say so. ``X-Total`` is never trusted (GitLab drops it past 10,000 rows).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gitlab_producer.gitlab.errors import GitLabError

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
    """Reads the next-page token from response headers and refuses to loop."""

    def __init__(self) -> None:
        self._seen: set[NextPage] = set()

    def next_page(self, headers: Mapping[str, str]) -> NextPage | None:
        found = self._find(headers)
        if found is not None:
            if found in self._seen:
                raise GitLabError(f"pagination loop: {found} was already requested")
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
