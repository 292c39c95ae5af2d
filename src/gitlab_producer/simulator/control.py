"""Request statistics, rate limiting and fault injection of the simulator."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from gitlab_producer.simulator.object_storage import ObjectStorage

FAULT_KINDS = ("html502", "error500", "truncated", "slow", "drop")

# On gitlab.com the per-endpoint limits of the projects, groups and users APIs
# (Gitlab::ApplicationRateLimiter) answer 429 with a JSON message and no headers at all.
BARE_429_ROUTES = frozenset({"projects_list", "project", "users_list", "user", "groups",
                             "group", "group_projects"})
BARE_429_BODY = (b'{"message":{"error":"This endpoint has been requested too many times. '
                 b'Try again later."}}')


@dataclass
class RouteBudget:
    """At most ``limit`` requests per ``period_s`` on one route (like gitlab.com's listings)."""

    limit: int
    period_s: float

    @classmethod
    def parse(cls, text: str) -> tuple[str, RouteBudget]:
        """``projects_list=2000/600`` -> ("projects_list", RouteBudget(2000, 600))."""
        route, _, spec = text.partition("=")
        limit, _, period = spec.partition("/")
        return route.strip(), cls(int(limit), float(period or 1))


# gitlab.com's per-endpoint limits (doc/user/gitlab_com/rate_limits.md).
GITLAB_COM_BUDGETS: dict[str, RouteBudget] = {
    "projects_list": RouteBudget(2000, 600),  # GET /projects
    "project": RouteBudget(400, 60),  # GET /projects/:id
    "groups": RouteBudget(200, 60),  # GET /groups
    "user": RouteBudget(300, 600),  # GET /users/:id
}


@dataclass(frozen=True)
class Throttle:
    """A refused request: what to send with the 429."""

    name: str
    limit: int
    observed: int
    reset_epoch: int
    retry_after_s: int
    per_endpoint: bool = False  # a route budget, not the global authenticated limit


@dataclass(frozen=True)
class EntityFaults:
    """Run-time switches for what one bad entity or record looks like (all off by default).

    - ``forbidden_projects``: their events answer 403, and their events leave users' lists
      (the token lost access to the project)
    - ``malformed_listings``: the first page of the project and user listings also carries
      records without an id, with ``last_activity_at: null``, of the wrong types
    - ``malformed_events``: these projects' event pages carry events without an id or a
      ``created_at`` between the good ones
    - ``endless``: routes (``projects_list``, ``project_events``) whose last page still offers
      a next (new, never repeated) page
    - ``throttled_projects``: their events answer 429 without any header, as GitLab's
      per-endpoint limits do, for as long as the switch is on
    """

    forbidden_projects: frozenset[int] = frozenset()
    malformed_listings: bool = False
    malformed_events: frozenset[int] = frozenset()
    endless: frozenset[str] = frozenset()
    throttled_projects: frozenset[int] = frozenset()

    def updated(self, body: dict[str, object]) -> EntityFaults:
        def ints(key: str, old: frozenset[int]) -> frozenset[int]:
            return frozenset(int(i) for i in body[key]) if key in body else old  # type: ignore[attr-defined]

        return EntityFaults(
            ints("forbidden_projects", self.forbidden_projects),
            bool(body.get("malformed_listings", self.malformed_listings)),
            ints("malformed_events", self.malformed_events),
            frozenset(str(r) for r in body["endless"]) if "endless" in body  # type: ignore[attr-defined]
            else self.endless,
            ints("throttled_projects", self.throttled_projects))

    def snapshot(self) -> dict[str, object]:
        return {"forbidden_projects": sorted(self.forbidden_projects),
                "malformed_listings": self.malformed_listings,
                "malformed_events": sorted(self.malformed_events),
                "endless": sorted(self.endless),
                "throttled_projects": sorted(self.throttled_projects)}


@dataclass
class Stats:
    """Counts per route and status, the busiest one-second window, token-in-query count.

    ``per_second`` counts requests by the second their answer was ready, ``arrivals`` by the
    second they arrived: the one GitLab's throttle counts them in (a slow answer moves a
    request into the next second of ``per_second``)."""

    by_route_status: Counter[tuple[str, int]] = field(default_factory=Counter)
    per_second: Counter[int] = field(default_factory=Counter)
    arrivals: Counter[int] = field(default_factory=Counter)
    token_in_query: int = 0
    total: int = 0
    # Arrival times within the last second, and the most ever seen within any one second
    # (a sliding window: calendar seconds miss a burst that straddles two of them).
    recent: deque[float] = field(default_factory=deque)
    max_in_any_second: int = 0
    # How many arrivals found the second up to them holding n requests (themselves included):
    # one request read late shows as one arrival over a limit, a budget too loose as many.
    in_last_second: Counter[int] = field(default_factory=Counter)

    def arrived(self, now: float) -> None:
        self.arrivals[int(now)] += 1
        self.recent.append(now)
        while self.recent and self.recent[0] <= now - 1.0:
            self.recent.popleft()
        self.max_in_any_second = max(self.max_in_any_second, len(self.recent))
        self.in_last_second[len(self.recent)] += 1

    def snapshot(self) -> dict[str, object]:
        by_route: dict[str, dict[str, int]] = {}
        for (route, status), n in sorted(self.by_route_status.items()):
            by_route.setdefault(route, {})[str(status)] = n
        return {
            "total": self.total,
            "by_route": by_route,
            "max_per_second": max(self.per_second.values(), default=0),
            "max_in_any_second": self.max_in_any_second,
            "in_last_second_at_arrival": {str(k): v for k, v in
                                          sorted(self.in_last_second.items())},
            "token_in_query": self.token_in_query,
            "seconds": len(self.per_second),
            "per_second": {str(k): v for k, v in sorted(self.per_second.items())},
            "max_arrivals_per_second": max(self.arrivals.values(), default=0),
            "arrivals_per_second": {str(k): v for k, v in sorted(self.arrivals.items())},
        }


class Control:
    """Mutable simulator switches plus the bookkeeping every request goes through."""

    def __init__(
        self,
        rate_limit: float = 0.0,
        route_budgets: dict[str, RouteBudget] | None = None,
        fault_rate: float = 0.0,
        fault_kinds: tuple[str, ...] = FAULT_KINDS,
        slow_s: float = 2.0,
        seed: int = 1,
    ) -> None:
        self.lock = threading.Lock()
        self.rate_limit = rate_limit
        self.route_budgets = route_budgets or {}
        self.fault_rate = fault_rate
        self.fault_kinds = fault_kinds
        self.slow_s = slow_s
        # Hostile answers, for the client's hardening tests: Link headers pointing elsewhere
        # (another scheme or port), a redirect for every API request, padded JSON bodies.
        self.link_base = ""
        self.redirect_to = ""
        self.pad_bytes = 0
        self.object_storage = ObjectStorage()  # off until its base_url is set
        self.stats = Stats()
        self.entity_faults = EntityFaults()  # replaced whole, so readers need no lock
        self._rng = random.Random(seed ^ 0x5EED)
        self._second_counts: Counter[int] = Counter()
        self._route_windows: dict[str, list[float]] = {}

    def record(self, route: str, status: int, token_in_query: bool) -> None:
        with self.lock:
            self.stats.total += 1
            self.stats.by_route_status[(route, status)] += 1
            self.stats.per_second[int(time.time())] += 1
            if token_in_query:
                self.stats.token_in_query += 1

    def arrived(self) -> None:
        """A request arrived (counted in the sliding window at arrival, before handling)."""
        with self.lock:
            self.stats.arrived(time.time())

    def reset_stats(self) -> None:
        with self.lock:
            self.stats = Stats()

    def throttle(self, route: str) -> Throttle | None:
        """Count the request against the budgets; a Throttle when it is over one."""
        now = time.time()
        with self.lock:
            if self.rate_limit > 0:
                second = int(now)
                self._second_counts[second] += 1
                if len(self._second_counts) > 4:
                    for old in [s for s in self._second_counts if s < second - 2]:
                        del self._second_counts[old]
                observed = self._second_counts[second]
                if observed > self.rate_limit:
                    return Throttle("throttle_authenticated_api", int(self.rate_limit),
                                    observed, second + 1, 1)
            budget = self.route_budgets.get(route)
            if budget:
                window = self._route_windows.setdefault(route, [])
                cutoff = now - budget.period_s
                while window and window[0] <= cutoff:
                    window.pop(0)
                if len(window) >= budget.limit:
                    reset = window[0] + budget.period_s
                    return Throttle(f"throttle_{route}", budget.limit, len(window) + 1,
                                    int(reset) + 1, max(1, int(reset - now) + 1), True)
                window.append(now)
        return None

    def pick_fault(self) -> str | None:
        with self.lock:
            if self.fault_rate <= 0 or self._rng.random() >= self.fault_rate:
                return None
            return self._rng.choice(self.fault_kinds)
