"""Pure rules of keeping objects current (``SYNC_OBJECTS``), tested without GitLab or a store:
the window a project's stream is read in, when its watermark may move, which children are read
again, when a sweep is due and what it deletes.

Times are GitLab's (Unix seconds on GitLab's clock, :class:`~gitlab_producer.gitlab.calendar.
GitLabClock`): a window ends at the round's start as GitLab saw it, so an object GitLab wrote
after that instant is in the next window, never in none.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gitlab_producer.objects.streams import STREAMS, Stream

# Streams read in ``updated_after`` windows (GitLab filters them by their updated_at).
WINDOWED: tuple[str, ...] = tuple(s.name for s in STREAMS
                                  if s.updated_filter == "updated_after")
# Top-level lists without such a filter: read whole by a sweep (version marks keep what did
# not change from being produced again); jobs, the longest of them, only by a sweep.
WHOLE: tuple[str, ...] = ("branches", "tags", "labels", "releases", "members",
                          "protected_branches")
SWEEP_ONLY: tuple[str, ...] = ("jobs",)
# Children without a time filter, read again when their parent changed.
CHILDREN: dict[str, tuple[str, ...]] = {
    "issues": ("discussions", "resource_state_events", "resource_label_events",
               "resource_milestone_events"),
    "merge_requests": ("discussions", "resource_state_events", "resource_label_events",
                       "resource_milestone_events", "merge_request_commits"),
}
MR_COMMITS = "merge_request_commits"


@dataclass(frozen=True)
class Window:
    """``updated_after`` .. ``updated_before`` of one read (GitLab's time, Unix seconds)."""

    after: float
    before: float

    def params(self, stream: Stream) -> dict[str, str]:
        """The query parameters of the window for ``stream`` (empty: read it whole)."""
        if stream.updated_filter == "since":  # commits: by their commit date
            return {"since": iso(self.after)}
        if stream.updated_filter != "updated_after":
            return {}
        return {"updated_after": iso(self.after), "updated_before": iso(self.before)}


def iso(ts: float) -> str:
    from datetime import UTC

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def parse_ts(text: Any) -> float | None:
    """GitLab's timestamp text -> Unix seconds (None when absent or malformed)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def window(watermark: float, round_start: float, overlap_s: float) -> Window:
    """The window after ``watermark``: from ``overlap_s`` before it (objects GitLab made
    visible late, a clock a little off) to the round's start."""
    return Window(watermark - overlap_s, max(round_start, watermark))


def next_watermark(current: float, read: Window, complete: bool) -> float:
    """Where a stream's watermark stands after a read of ``read``: at its end only when every
    record of the window (and the children it called for) was delivered; never backwards."""
    return max(current, read.before) if complete else current


def changed(item: Mapping[str, Any], fresh: bool, marked: bool, watermark: float) -> bool:
    """Whether a listed parent's children are read again: a new version was produced now, an
    event or webhook named it, or it was updated after the last complete window (a version
    produced by a round that failed before its children were read is not fresh any more,
    but the watermark did not move past it)."""
    if fresh or marked:
        return True
    updated = parse_ts(item.get("updated_at"))
    return updated is None or updated > watermark


def rereads(parent: str, item: Mapping[str, Any], is_changed: bool,
            wanted: Collection[str]) -> tuple[str, ...]:
    """The child streams of a listed ``parent`` to read again: all of them when it changed;
    an open merge request's commits in any case (a push to its branch adds commits)."""
    names = CHILDREN.get(parent, ())
    if is_changed:
        out = names
    elif parent == "merge_requests" and item.get("state") == "opened":
        out = (MR_COMMITS,)
    else:
        out = ()
    return tuple(n for n in out if n in wanted)


def sweep_due(last_sweep: float | None, now: float, interval_s: float) -> bool:
    """A full reconciliation runs every ``interval_s`` (0: every round), and first of all."""
    return last_sweep is None or interval_s <= 0 or now - last_sweep >= interval_s


def deleted(known: Collection[str], listed: Collection[str]) -> list[str]:
    """Keys produced before that a complete list no longer shows: tombstones, in key order.
    Only a complete list may delete (a list cut short shows less than what exists)."""
    present = set(listed)
    return sorted(k for k in known if k not in present)
