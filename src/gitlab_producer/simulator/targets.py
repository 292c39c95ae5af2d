"""Pure, cheap functions of (seed, project id, ...) that both the events and the objects of the
simulator derive from, so that an event names a real issue, merge request, milestone or note
without the project's objects being generated when the event is rendered.

Ids are unique per kind (GitLab keeps one table per kind): issue and merge request ids are
``project * 100_000 + iid``, milestones ``project * 1_000 + iid``; the note an event names has
id ``1000 + event id`` (as the events always had), the notes of the generated base
``10**12 + project * 10**6 + serial`` and notes created later ``2 * 10**12 + serial``.
"""

from __future__ import annotations

from dataclasses import dataclass

MASK = (1 << 64) - 1
IID_STRIDE = 100_000
MILESTONE_STRIDE = 1_000
EVENT_NOTE_BASE = 1000
BASE_NOTE_BASE = 10**12
NEW_NOTE_BASE = 2 * 10**12
# The note events of the generated history: this share comments on merge requests.
NOTE_ON_MR_PERCENT = 30


def mix(*parts: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): fast, stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (part & MASK)) * 0xBF58476D1CE4E5B9 & MASK
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & MASK
        h ^= h >> 29
    return h


def unit(*parts: int) -> float:
    """A number in [0, 1) from ``parts``."""
    return (mix(*parts) >> 11) / float(1 << 53)


@dataclass(frozen=True)
class Shape:
    """How many objects of each kind a project's generated base holds."""

    issues: int
    merge_requests: int
    milestones: int
    notes: int
    pipelines: int


def shape(seed: int, project_id: int, per_project: int, big_project_issues: int = 0) -> Shape:
    """Skewed sizes (a few big projects, a long tail), mean ``per_project`` objects; project 1
    is always one of the biggest (tests and demos read it)."""
    scale = 2.5 if project_id == 1 else 0.25 + 2.25 * unit(seed, project_id, 1) ** 2  # mean 1
    total = max(5, int(per_project * scale))
    issues = max(1, total * 2 // 10)
    if project_id == 1 and big_project_issues:
        issues = big_project_issues
    return Shape(issues=min(issues, IID_STRIDE - 1), merge_requests=max(1, total // 10),
                 milestones=1 + mix(seed, project_id, 2) % 3, notes=total // 2,
                 pipelines=max(1, total * 2 // 10))


def created_of(seed: int, project_id: int, iid: int, count: int, first_ms: int, end_ms: int,
               salt: int) -> int:
    """The creation time of the ``iid``-th of ``count`` objects spread over [first, end):
    it grows with ``iid``, as GitLab's iids do."""
    span = max(1, end_ms - first_ms)
    frac = unit(seed, project_id, iid, salt)
    return first_ms + int((iid - 1 + frac) / count * span)


def iids_before(count: int, first_ms: int, end_ms: int, t_ms: int) -> int:
    """How many of ``count`` objects (spread as by ``created_of``) exist at ``t_ms``."""
    if t_ms >= end_ms:
        return count
    span = max(1, end_ms - first_ms)
    return max(1, min(count, int((t_ms - first_ms) / span * count)))


@dataclass(frozen=True)
class Target:
    """What an event of the generated history names."""

    target_type: str  # Issue, MergeRequest, Milestone, Note
    target_id: int
    target_iid: int | None
    noteable_type: str | None = None
    noteable_id: int | None = None
    noteable_iid: int | None = None


def issue_title(iid: int) -> str:
    return f"Issue {iid}: {WORDS[iid % len(WORDS)]}"


def mr_title(iid: int) -> str:
    return f"Merge request {iid}: {WORDS[(iid * 7) % len(WORDS)]}"


WORDS = ("fix login redirect", "speed up search", "add dark mode", "crash on empty input",
         "update dependencies", "document the API", "flaky test in CI", "support time zones")


def base_target(seed: int, project_id: int, event_id: int, target_type: str, t_ms: int,
                shape_: Shape, first_ms: int, end_ms: int, newest: bool = False) -> Target:
    """The object an event of the generated history names (``first_ms``: project creation,
    ``end_ms``: end of the generated history). Issues and merge requests are picked among those
    that exist at the event's time; "opened" names the newest of them."""
    h = mix(seed, project_id, event_id, 7)
    if target_type == "Milestone":
        iid = 1 + h % shape_.milestones
        return Target("Milestone", project_id * MILESTONE_STRIDE + iid, iid)
    kind = target_type
    if target_type == "Note":
        kind = "MergeRequest" if h % 100 < NOTE_ON_MR_PERCENT else "Issue"
    count = shape_.issues if kind == "Issue" else shape_.merge_requests
    existing = iids_before(count, first_ms, end_ms, t_ms)
    iid = existing if newest else 1 + (h >> 8) % existing
    thing_id = project_id * IID_STRIDE + iid
    if target_type == "Note":
        return Target("Note", EVENT_NOTE_BASE + event_id, None, kind, thing_id, iid)
    return Target(kind, thing_id, iid)


def target_title(target: Target) -> str:
    if target.target_type == "Issue":
        return issue_title(target.target_iid or 0)
    if target.target_type == "MergeRequest":
        return mr_title(target.target_iid or 0)
    if target.target_type == "Milestone":
        return f"Milestone {target.target_iid}"
    iid = target.noteable_iid or 0
    return issue_title(iid) if target.noteable_type == "Issue" else mr_title(iid)
