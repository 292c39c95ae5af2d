"""What ``gitlab-producer status`` shows, and what a project's final log line counts: per
project its stage, status, objects fetched and imported per kind (and those too large for
Kafka, not produced), failed jobs, kinds skipped
(403), parents gone and user-cache hits, summed over every job of the project."""

from __future__ import annotations

from typing import Any

from gitlab_producer.objects.planner import STAGE_NAMES
from gitlab_producer.objects.state import (
    FAILED,
    TERMINAL_JOB,
    ProjectRecord,
    StateStore,
    add_counts,
)


async def project_summary(state: StateStore, project: ProjectRecord) -> dict[str, Any]:
    """Totals over the project's jobs (finished stages and the current one)."""
    fetched: dict[str, int] = {}
    imported: dict[str, int] = {}
    too_large: dict[str, int] = {}
    skipped: set[str] = set()
    failed: list[str] = []
    running = gone = user_hits = user_requests = 0
    jobs = await state.project_jobs(project)
    for job in jobs:
        add_counts(fetched, job.fetched)
        add_counts(imported, job.imported)
        add_counts(too_large, job.too_large)
        skipped.update(job.skipped)
        gone += job.gone
        user_hits += job.user_hits
        user_requests += job.user_requests
        if job.status == FAILED:
            failed.append(job.id)
        elif job.status not in TERMINAL_JOB:
            running += 1
    return {
        "project_id": project.project_id, "status": project.status,
        "stage": STAGE_NAMES.get(project.stage, str(project.stage)),
        "fetched": dict(sorted(fetched.items())), "imported": dict(sorted(imported.items())),
        "too_large": dict(sorted(too_large.items())),
        "jobs": len(jobs), "jobs_unfinished": running, "failed_jobs": sorted(failed),
        "skipped_kinds": sorted(skipped), "parents_gone": gone,
        "user_lookups": {"cached": user_hits, "requested": user_requests},
        "stage_durations_s": project.stage_durations, "error": project.error or None,
    }
