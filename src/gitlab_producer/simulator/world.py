"""The simulated GitLab instance: projects, users and events, generated from a seed.

Events are stored column-wise in compact arrays (a million events cost tens of megabytes) and
rendered to GitLab's JSON shape only when served; the rendered bytes are cached per event.
Event ids grow with ``created_at``, as they do in GitLab.

Like a self-managed GitLab with a ``time_zone`` in ``gitlab.yml``, the world may live at a
fixed offset from UTC (``WorldSpec.utc_offset_s``): every timestamp is rendered in that zone
with its offset, events' ``after``/``before`` dates are that zone's days, and
``last_activity_on`` is that zone's date. Times are stored as UTC epoch milliseconds.
"""

from __future__ import annotations

import random
import re
import threading
import time
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

import orjson

from gitlab_producer.simulator import targets
from gitlab_producer.simulator.catalog import ACTIONS, ActionKind, render_event

DAY_MS = 86_400_000


def _kind_choices(projectless: bool) -> tuple[list[int], list[int]]:
    kinds = [i for i, a in enumerate(ACTIONS) if a.projectless == projectless and a.weight]
    cumulative, total = [], 0
    for i in kinds:
        total += ACTIONS[i].weight
        cumulative.append(total)
    return kinds, cumulative


# Action kinds (and cumulative weights) for project events and for events outside projects.
_KIND_CHOICES = {False: _kind_choices(False), True: _kind_choices(True)}


@dataclass(frozen=True)
class WorldSpec:
    """What to generate. Same spec and seed, same instance (timestamps are relative to start)."""

    projects: int = 200
    users: int = 50
    events: int = 5_000
    seed: int = 1
    history_days: float = 3.0
    hidden_share: float = 0.03
    projectless_share: float = 0.05
    activity_interval_s: float = 3600.0
    quiet_s: float = 0.0  # the generated history ends this long before start-up
    host: str = "gitlab.example.com"
    objects_per_project: int = 60  # mean issues + merge requests + notes + pipelines
    big_project_issues: int = 0  # project 1 gets this many issues when set
    feature_off_share: float = 0.1  # share of projects with each feature switched off
    utc_offset_s: int = 0  # the server's time zone (UTC-12..UTC+14), as GitLab's time_zone


def parse_utc_offset(text: str) -> int:
    """``+03:00``, ``-08:00``, ``+05:45``, ``Z`` or ``0`` -> seconds east of UTC."""
    text = text.strip()
    if text in ("Z", "0", "+00:00", "-00:00"):
        return 0
    match = re.fullmatch(r"([+-])(\d{1,2}):?(\d{2})", text)
    if not match:
        raise ValueError(f"not a UTC offset: {text!r} (expected e.g. +03:00 or -08:00)")
    sign, hours, minutes = match.groups()
    seconds = (int(hours) * 60 + int(minutes)) * 60
    if int(minutes) >= 60 or not -12 * 3600 <= (-seconds if sign == "-" else seconds) <= 14 * 3600:
        raise ValueError(f"UTC offset out of range (UTC-12..UTC+14): {text!r}")
    return -seconds if sign == "-" else seconds


@lru_cache(maxsize=4096)
def _day_text(day: int) -> str:
    return datetime.fromtimestamp(day * 86_400, tz=UTC).strftime("%Y-%m-%d")


@lru_cache(maxsize=64)
def _offset_text(offset_s: int) -> str:
    if offset_s == 0:
        return "Z"
    sign, minutes = ("+" if offset_s > 0 else "-"), abs(offset_s) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def iso_ms(epoch_ms: int, utc_offset_s: int = 0) -> str:
    """GitLab's timestamp format, in the server's zone: ``2017-02-09T10:43:19.667Z`` at UTC,
    ``2017-02-09T13:43:19.667+03:00`` at UTC+3 (hot path: no datetime). Every timestamp
    the simulator sends is rendered here (through :meth:`World.render_time`)."""
    seconds, ms = divmod(epoch_ms + utc_offset_s * 1000, 1000)
    day, second_of_day = divmod(seconds, 86_400)
    hour, rest = divmod(second_of_day, 3600)
    minute, second = divmod(rest, 60)
    return (f"{_day_text(day)}T{hour:02d}:{minute:02d}:{second:02d}.{ms:03d}"
            f"{_offset_text(utc_offset_s)}")


class World:
    """All simulated data plus the operations the HTTP layer needs. Thread-safe for appends."""

    def __init__(self, spec: WorldSpec, now_ms: int | None = None) -> None:
        self.spec = spec
        self.lock = threading.Lock()
        self.base_url = ""
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        rng = random.Random(spec.seed)
        start = now - int(spec.history_days * DAY_MS)
        self.start_ms = start
        self.end_ms = now  # the generated objects are spread up to here
        self.deleted_projects: set[int] = set()
        self._shapes: dict[int, targets.Shape] = {}
        # Events made by object changes name their object explicitly: (target, detail), the
        # detail being the note's body for a note, the pushed ref for a push.
        self.ev_target: dict[int, tuple[targets.Target | None, str | None]] = {}
        n_proj, n_users = max(1, spec.projects), max(1, spec.users)

        self.project_created_ms = array(
            "q", (start - rng.randrange(1, 400) * DAY_MS for _ in range(n_proj))
        )
        self.project_last_activity_ms = array("q", self.project_created_ms)
        self.project_events: list[array[int]] = [array("i") for _ in range(n_proj)]
        self.user_created_ms = array(
            "q", (start - rng.randrange(1, 900) * DAY_MS for _ in range(n_users))
        )
        self.user_last_activity_ms = array("q", self.user_created_ms)
        self.user_events: list[array[int]] = [array("i") for _ in range(n_users)]

        self.ev_time = array("q")
        self.ev_project = array("i")  # 0: the event belongs to no project
        self.ev_author = array("i")
        self.ev_action = array("b")
        self.ev_hidden = bytearray()
        self._rendered: list[bytes | None] = []
        self._rng = rng

        end = now - int(spec.quiet_s * 1000)
        times = sorted(rng.randrange(start, max(start + 1, end)) for _ in range(spec.events))
        for t in times:
            self._append_random_event(t)

    # -- generation -------------------------------------------------------------------------
    def _pick_project(self) -> int:
        if self._rng.random() < self.spec.projectless_share:
            return 0
        # Skewed activity: a few busy projects, a long tail of quiet ones.
        return 1 + int(len(self.project_events) * self._rng.random() ** 2)

    def _append_random_event(self, t_ms: int) -> int:
        project = self._pick_project()
        author = 1 + self._rng.randrange(len(self.user_events))
        kinds, cumulative = _KIND_CHOICES[project == 0]
        action = self._rng.choices(kinds, cum_weights=cumulative)[0]
        hidden = self._rng.random() < self.spec.hidden_share
        return self._append(t_ms, project, author, action, hidden)

    def _append(self, t_ms: int, project: int, author: int, action: int, hidden: bool) -> int:
        idx = len(self.ev_time)
        self.ev_time.append(t_ms)
        self.ev_project.append(project)
        self.ev_author.append(author)
        self.ev_action.append(action)
        self.ev_hidden.append(1 if hidden else 0)
        self._rendered.append(None)
        if project:
            self.project_events[project - 1].append(idx)
            last = self.project_last_activity_ms[project - 1]
            # GitLab resets last_activity_at only when the stored value is older than the
            # interval (Event::RESET_PROJECT_ACTIVITY_INTERVAL), so it lags by up to an hour.
            if t_ms - last > self.spec.activity_interval_s * 1000:
                self.project_last_activity_ms[project - 1] = t_ms
        self.user_events[author - 1].append(idx)
        day = self.day_start_ms(t_ms)
        if day > self.user_last_activity_ms[author - 1]:
            self.user_last_activity_ms[author - 1] = day
        return idx

    def add_events(
        self,
        count: int,
        project_id: int | None = None,
        author_id: int | None = None,
        at_ms: int | None = None,
    ) -> list[int]:
        """Create ``count`` new visible events now (live mode and tests). Returns their ids."""
        ids = []
        with self.lock:
            for _ in range(count):
                t = at_ms if at_ms is not None else int(time.time() * 1000)
                if self.ev_time and t < self.ev_time[-1]:
                    t = self.ev_time[-1]  # ids and times grow together
                if project_id is None and author_id is None:
                    idx = self._append_random_event(t)
                else:
                    project = project_id if project_id is not None else self._pick_project()
                    author = author_id or 1 + self._rng.randrange(len(self.user_events))
                    kinds = _KIND_CHOICES[project == 0][0]
                    idx = self._append(t, project, author, self._rng.choice(kinds), False)
                ids.append(idx + 1)
        return ids

    def add_object_event(self, project: int, author: int, action_name: str, target_type: str | None,
                         target: targets.Target | None, detail: str | None = None,
                         at_ms: int | None = None) -> tuple[int, int]:
        """An event made by an object change (a note, a state change, a push), naming its
        object. Returns (event id, created_at in ms)."""
        action = next(i for i, a in enumerate(ACTIONS) if a.action_name == action_name
                      and a.target_type == target_type and not a.projectless)
        with self.lock:
            t = at_ms if at_ms is not None else int(time.time() * 1000)
            if self.ev_time and t < self.ev_time[-1]:
                t = self.ev_time[-1]
            idx = self._append(t, project, author, action, False)
            self.ev_target[idx] = (target, detail)
        return idx + 1, t

    def project_shape(self, project: int) -> targets.Shape:
        """How many objects of each kind the project's generated base holds (cached)."""
        found = self._shapes.get(project)
        if found is None:
            found = self._shapes[project] = targets.shape(
                self.spec.seed, project, self.spec.objects_per_project,
                self.spec.big_project_issues)
        return found

    def event_target(self, idx: int) -> tuple[targets.Target | None, str | None]:
        """The project object an event names (None for events outside projects and pushes)."""
        explicit = self.ev_target.get(idx)
        if explicit is not None:
            return explicit
        action, project = ACTIONS[self.ev_action[idx]], self.ev_project[idx]
        if action.target_type is None or not project:
            return None, None
        return targets.base_target(
            self.spec.seed, project, idx + 1, action.target_type, self.ev_time[idx],
            self.project_shape(project), self.project_created_ms[project - 1], self.end_ms,
            newest=action.action_name == "opened"), None

    # -- the server's time zone -------------------------------------------------------------
    def render_time(self, epoch_ms: int) -> str:
        """A timestamp as this server renders it (its zone, with the offset)."""
        return iso_ms(epoch_ms, self.spec.utc_offset_s)

    def render_date(self, epoch_ms: int) -> str:
        """The server's date at that instant (``last_activity_on``)."""
        return self.render_time(epoch_ms)[:10]

    def day_start_ms(self, epoch_ms: int) -> int:
        """Start of the server's day holding that instant."""
        offset_ms = self.spec.utc_offset_s * 1000
        return epoch_ms - (epoch_ms + offset_ms) % DAY_MS

    def date_start_ms(self, date_text: str) -> int:
        """Start of the server's day ``YYYY-MM-DD`` (its midnight, as an instant)."""
        return _day_ms(date_text) - self.spec.utc_offset_s * 1000

    # -- queries ----------------------------------------------------------------------------
    @property
    def project_count(self) -> int:
        return len(self.project_events)

    @property
    def user_count(self) -> int:
        return len(self.user_events)

    def event_ids_in(
        self,
        indices: array[int],
        after: str | None,
        before: str | None,
        action: str | None,
        target_type: str | None,
    ) -> list[int]:
        """Indices (ascending) of ``indices`` that pass GitLab's events filters (before paging)."""
        lo, hi = 0, len(indices)
        times = self.ev_time
        if after:
            # after=D: created_at > D.end_of_day in the server's zone: from D+1 00:00 there.
            bound = self.date_start_ms(after) + DAY_MS
            lo = bisect_left(indices, bound, key=lambda i: times[i])
        if before:
            # before=D: created_at < D.beginning_of_day in the server's zone.
            bound = self.date_start_ms(before)
            hi = bisect_left(indices, bound, lo, hi, key=lambda i: times[i])
        selected = indices[lo:hi]
        if action or target_type:
            selected = array("i", (i for i in selected if _matches(ACTIONS[self.ev_action[i]],
                                                                   action, target_type)))
        return list(selected)

    def render(self, idx: int) -> bytes:
        """The event as GitLab's JSON bytes (cached)."""
        cached = self._rendered[idx]
        if cached is None:
            author = self.ev_author[idx]
            target, detail = self.event_target(idx)
            # orjson's result keeps its whole working buffer (~8 KB for an event of 1 KB);
            # a trimmed copy is what stays in the cache (measured: 8,153 -> 1,048 bytes).
            cached = bytes(memoryview(orjson.dumps(render_event(
                event_id=idx + 1,
                action=ACTIONS[self.ev_action[idx]],
                project_id=self.ev_project[idx] or None,
                author_id=author,
                created_at=self.render_time(self.ev_time[idx]),
                host=self.spec.host,
                target=target,
                detail=detail,
            ))))
            self._rendered[idx] = cached
        return cached

    def visible(self, idx: int) -> bool:
        return not self.ev_hidden[idx]

    def truth(self, since_id: int = 0, hidden: bool = False
              ) -> list[tuple[int, int | None, int]]:
        """Every visible event (with ``hidden``: every event): (id, project_id, author_id)."""
        return [(i + 1, self.ev_project[i] or None, self.ev_author[i])
                for i in range(since_id, len(self.ev_time)) if hidden or not self.ev_hidden[i]]


def _matches(kind: ActionKind, action: str | None, target_type: str | None) -> bool:
    if action and kind.action_filter != action:
        return False
    return not (target_type and (kind.target_filter or "") != target_type)


def _day_ms(date_text: str) -> int:
    dt = datetime.strptime(date_text[:10], "%Y-%m-%d").replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)
