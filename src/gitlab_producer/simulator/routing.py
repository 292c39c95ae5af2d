"""Routes of the simulator's REST API: a path below ``/api/v4/`` matched to its handler."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypeVar

H = TypeVar("H")


def compile_routes(table: Iterable[tuple[str, str, H]]) -> tuple[tuple[str, re.Pattern[str], H],
                                                                  ...]:
    """(route name, pattern, handler) rows with their patterns compiled, in order."""
    return tuple((name, re.compile(pattern), handler) for name, pattern, handler in table)


def match_route(routes: tuple[tuple[str, re.Pattern[str], H], ...], raw_path: str
                ) -> tuple[str, H, list[str]] | None:
    """The first route whose pattern matches all of ``raw_path``: (name, handler, the raw
    segments it captured)."""
    for name, pattern, handler in routes:
        match = pattern.fullmatch(raw_path)
        if match:
            return name, handler, [g for g in match.groups() if g is not None]
    return None
