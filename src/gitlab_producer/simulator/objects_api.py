"""GitLab REST v4 routes of the projects' objects (issues, merge requests, notes, discussions,
resource events, award emoji, pipelines, jobs, deployments, releases, repository data, groups,
uploads), routed like ``api.py`` on the raw, still URL-encoded path."""

from __future__ import annotations

import re
from collections.abc import Callable

from aiohttp import web
from multidict import MultiMapping

from gitlab_producer.simulator.objects_ci_api import (
    deployment,
    deployments,
    job,
    jobs,
    pipeline,
    pipeline_jobs,
    pipelines,
)
from gitlab_producer.simulator.objects_repo_api import (
    branch,
    branches,
    commit,
    commit_refs,
    commits,
    group,
    group_projects,
    groups_list,
    label,
    labels,
    milestone,
    milestones,
    project,
    protected_branch,
    protected_branches,
    release,
    releases,
    tag,
    tags,
    upload,
    wikis,
)
from gitlab_producer.simulator.objects_store import ObjectWorld
from gitlab_producer.simulator.objects_web import ObjRequest, Refusal, json_answer
from gitlab_producer.simulator.objects_work_api import (
    award_emoji,
    discussion,
    discussions,
    issue,
    issues,
    merge_request,
    merge_requests,
    mr_approvals,
    mr_commits,
    note,
    notes,
    resource_events,
)
from gitlab_producer.simulator.paging import PagingError
from gitlab_producer.simulator.routing import compile_routes, match_route
from gitlab_producer.simulator.world import World

Handler = Callable[[ObjRequest], web.StreamResponse]

SEG = r"([^/]+)"
P = rf"projects/{SEG}"
THING = rf"{P}/(issues|merge_requests)/(\d+)"
# The routes a full-history import reads most come first (the patterns do not overlap).
ROUTES: tuple[tuple[str, re.Pattern[str], Handler], ...] = compile_routes(
    (
        ("notes", rf"{THING}/notes", notes),
        ("discussions", rf"{THING}/discussions", discussions),
        ("resource_events", rf"{THING}/resource_(state|label|milestone)_events(?:/(\d+))?",
         resource_events),
        ("issues", rf"{P}/issues", issues),
        ("merge_requests", rf"{P}/merge_requests", merge_requests),
        ("pipelines", rf"{P}/pipelines", pipelines),
        ("jobs", rf"{P}/jobs", jobs),
        ("deployments", rf"{P}/deployments", deployments),
        ("issue", rf"{P}/issues/(\d+)", issue),
        ("merge_request", rf"{P}/merge_requests/(\d+)", merge_request),
        ("note", rf"{THING}/notes/(\d+)", note),
        ("discussion", rf"{THING}/discussions/([0-9a-f]+)", discussion),
        ("award_emoji", rf"{THING}/award_emoji(?:/(\d+))?", award_emoji),
        ("pipeline_jobs", rf"{P}/pipelines/(\d+)/jobs", pipeline_jobs),
        ("project", P, project),
        ("groups", r"groups", groups_list),
        ("group", rf"groups/{SEG}", group),
        ("group_projects", rf"groups/{SEG}/projects", group_projects),
        ("labels", rf"{P}/labels", labels),
        ("label", rf"{P}/labels/{SEG}", label),
        ("milestones", rf"{P}/milestones", milestones),
        ("milestone", rf"{P}/milestones/(\d+)", milestone),
        ("releases", rf"{P}/releases", releases),
        ("release", rf"{P}/releases/{SEG}", release),
        ("protected_branches", rf"{P}/protected_branches", protected_branches),
        ("protected_branch", rf"{P}/protected_branches/{SEG}", protected_branch),
        ("branches", rf"{P}/repository/branches", branches),
        ("branch", rf"{P}/repository/branches/{SEG}", branch),
        ("tags", rf"{P}/repository/tags", tags),
        ("tag", rf"{P}/repository/tags/{SEG}", tag),
        ("commits", rf"{P}/repository/commits", commits),
        ("commit", rf"{P}/repository/commits/{SEG}", commit),
        ("commit_refs", rf"{P}/repository/commits/{SEG}/refs", commit_refs),
        ("mr_commits", rf"{P}/merge_requests/(\d+)/commits", mr_commits),
        ("mr_approvals", rf"{P}/merge_requests/(\d+)/approvals", mr_approvals),
        ("pipeline", rf"{P}/pipelines/(\d+)", pipeline),
        ("job", rf"{P}/jobs/(\d+)", job),
        ("deployment", rf"{P}/deployments/(\d+)", deployment),
        ("wikis", rf"{P}/wikis", wikis),
        ("uploads", rf"{P}/uploads/([0-9a-f]{{32}})/{SEG}", upload),
    )
)


def route(raw_path: str) -> tuple[str, Handler, list[str]] | None:
    """Match a raw path below ``/api/v4/`` to (route name, handler, captured raw segments)."""
    return match_route(ROUTES, raw_path)


def handle(world: World, objects: ObjectWorld, raw_path: str, query: MultiMapping[str],
           base_url: str) -> tuple[str, web.StreamResponse] | None:
    """Answer one authenticated API request when it is an object route, else None."""
    found = route(raw_path)
    if found is None:
        return None
    name, handler, parts = found
    try:
        return name, handler(ObjRequest(world, objects, parts, query, base_url, raw_path))
    except Refusal as exc:
        return name, exc.response
    except PagingError as exc:
        return name, json_answer(exc.body, exc.status)
