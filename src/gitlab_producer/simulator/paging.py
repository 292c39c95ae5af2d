"""GitLab's offset and keyset pagination headers (``lib/api/helpers/pagination_strategies.rb``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlencode

T = TypeVar("T")

MAX_PER_PAGE = 100
DEFAULT_PER_PAGE = 20
COUNT_LIMIT = 10_000  # above this GitLab leaves out X-Total, X-Total-Pages and rel="last"
OFFSET_LIMIT = 50_000  # on endpoints that also offer keyset pagination


class PagingError(Exception):
    """A paging parameter GitLab would refuse; carries GitLab's status and JSON body."""

    def __init__(self, status: int, body: dict[str, str]) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


def per_page_of(query: Mapping[str, str]) -> int:
    try:
        value = int(query.get("per_page", DEFAULT_PER_PAGE))
    except ValueError as exc:
        raise PagingError(400, {"error": "per_page is invalid"}) from exc
    return min(max(value, 1), MAX_PER_PAGE)


def page_of(query: Mapping[str, str]) -> int:
    try:
        return max(int(query.get("page", 1)), 1)
    except ValueError as exc:
        raise PagingError(400, {"error": "page is invalid"}) from exc


def _url(base: str, query: Mapping[str, str], **changes: str) -> str:
    params = dict(query)
    params.update(changes)
    return f"{base}?{urlencode(params)}"


@dataclass(frozen=True)
class OffsetPage:
    """One offset page: the row slice and the headers GitLab sends with it."""

    start: int
    stop: int
    headers: dict[str, str]


def offset_page(
    total: int, query: Mapping[str, str], base: str, resource: str | None = None
) -> OffsetPage:
    """Slice bounds and headers for ``total`` rows. ``resource`` names a keyset-capable type
    (``Project``, ``User``) whose offset pagination stops at 50,000 rows."""
    page, per_page = page_of(query), per_page_of(query)
    if resource and page * per_page > OFFSET_LIMIT:
        raise PagingError(405, {"error": (
            f"Offset pagination has a maximum allowed offset of {OFFSET_LIMIT} for requests "
            f"that return objects of type {resource}. Remaining records can be retrieved "
            "using keyset pagination.")})
    start = (page - 1) * per_page
    stop = min(start + per_page, total)
    pages = max(1, -(-total // per_page))
    has_next = stop < total
    headers = {
        "X-Page": str(page),
        "X-Per-Page": str(per_page),
        "X-Next-Page": str(page + 1) if has_next else "",
        "X-Prev-Page": str(page - 1) if page > 1 else "",
    }
    # The other parameters (repeated ones such as iids[] included) are encoded once for all
    # the links (hot path).
    rest = urlencode([(k, v) for k, v in query.items() if k not in ("page", "per_page")])
    prefix = f"{base}?{rest}&" if rest else f"{base}?"

    def link(to_page: int, rel: str) -> str:
        return f'<{prefix}page={to_page}&per_page={per_page}>; rel="{rel}"'

    links = []
    if page > 1:
        links.append(link(page - 1, "prev"))
    if has_next:
        links.append(link(page + 1, "next"))
    links.append(link(1, "first"))
    if total <= COUNT_LIMIT:
        headers["X-Total"] = str(total)
        headers["X-Total-Pages"] = str(pages)
        links.append(link(pages, "last"))
    headers["Link"] = ", ".join(links)
    return OffsetPage(start, max(start, stop), headers)


def keyset_headers(
    rows: Sequence[object], per_page: int, base: str, query: Mapping[str, str], **cursor: str
) -> dict[str, str]:
    """Keyset answers carry only ``Link: rel="next"`` while a page came back full."""
    if len(rows) < per_page:
        return {}
    params = {k: v for k, v in query.items() if k not in ("id_after", "id_before", "cursor")}
    return {"Link": f'<{_url(base, params, **cursor)}>; rel="next"'}
