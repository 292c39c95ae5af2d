"""Object routes of CI: pipelines, their jobs, project jobs (offset or keyset pagination) and
deployments (filtered and ordered as GitLab's DeploymentsFinder does)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from gitlab_producer.simulator import objects_json as js
from gitlab_producer.simulator.objects import (
    Deployment,
    Pipeline,
    ProjectObjects,
)
from gitlab_producer.simulator.objects_web import (
    JSON,
    ObjRequest,
    bad,
    dump,
    in_range,
    json_answer,
    not_found,
    page,
    project_of,
    refuse,
    sorted_rows,
    time_param,
)
from gitlab_producer.simulator.paging import keyset_headers, per_page_of

PIPELINE_SCOPES = {"running": ("running",), "pending": ("pending",),
                   "finished": ("success", "failed", "canceled", "skipped"),
                   "branches": None, "tags": ()}


def pipelines(req: ObjRequest) -> web.Response:
    po = project_of(req, "pipelines")
    q = req.q()
    lo, hi = time_param(q, "updated_after"), time_param(q, "updated_before")
    scope = q.get("scope")
    if scope is not None and scope not in PIPELINE_SCOPES:
        raise bad("scope does not have a valid value")
    statuses = PIPELINE_SCOPES.get(scope or "branches")
    rows = [p for p in po.pipelines if not p.deleted and in_range(p.updated, lo, hi)
            and (statuses is None or p.status in statuses)
            and q.get("status", p.status) == p.status and q.get("ref", p.ref) == p.ref
            and q.get("sha", p.sha) == p.sha]
    rows = sorted_rows(rows, q, {"id": lambda p: p.id, "status": lambda p: (p.status, p.id),
                             "ref": lambda p: (p.ref, p.id), "user_id": lambda p: (p.user, p.id),
                             "updated_at": lambda p: (p.updated, p.id)}, "id", "desc")
    return page(req, rows, lambda p: po.render(("pipeline", p.id), lambda: dump(
        js.pipeline_json(req.world, po, p))))


def _pipeline(req: ObjRequest) -> tuple[ProjectObjects, Pipeline]:
    po = project_of(req, "pipelines")
    found = next((p for p in po.pipelines if str(p.id) == req.parts[1] and not p.deleted), None)
    if found is None:
        raise not_found("404 Not found")
    return po, found


def pipeline(req: ObjRequest) -> web.Response:
    po, pipe = _pipeline(req)
    return json_answer(js.pipeline_json(req.world, po, pipe, single=True))


def _job_scope(req: ObjRequest) -> set[str] | None:
    wanted = set(req.query.getall("scope[]", [])) | set(req.query.getall("scope", []))
    return wanted or None


def pipeline_jobs(req: ObjRequest) -> web.Response:
    po, pipe = _pipeline(req)
    wanted = _job_scope(req)
    rows = [j for j in pipe.jobs if wanted is None or j.status in wanted]
    return page(req, rows, lambda j: po.render(("job", j.id), lambda: dump(
        js.job_json(req.world, po, pipe, j))))


def jobs(req: ObjRequest) -> web.Response:
    """Offset pagination, or keyset (``pagination=keyset``, ``order_by=id``, ``sort=desc``)."""
    po = project_of(req, "jobs")
    q = req.q()
    wanted = _job_scope(req)
    rows = sorted(((p, j) for p in po.pipelines if not p.deleted for j in p.jobs
                   if wanted is None or j.status in wanted), key=lambda pj: pj[1].id,
                  reverse=True)
    def render(pj: tuple[Pipeline, Any]) -> bytes:
        return po.render(("job", pj[1].id), lambda: dump(js.job_json(req.world, po, *pj)))

    if q.get("pagination") != "keyset":
        return page(req, rows, render)
    if q.get("order_by", "id") != "id" or q.get("sort", "desc") != "desc":
        raise refuse(405, {"error": "Keyset pagination is not yet available for this type "
                            "of request"})
    per_page = per_page_of(q)
    if "cursor" in q:
        try:
            last = int(orjson.loads(base64.urlsafe_b64decode(q["cursor"]))["id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise bad("cursor is invalid") from exc
        rows = [pj for pj in rows if pj[1].id < last]
    chunk = rows[:per_page]
    cursor = (base64.urlsafe_b64encode(orjson.dumps({"id": chunk[-1][1].id})).decode()
              if chunk else "")
    headers = keyset_headers(chunk, per_page, f"{req.base_url}/{req.path}", q, cursor=cursor)
    body = b"[" + b",".join(render(pj) for pj in chunk) + b"]"
    return web.Response(body=body, content_type=JSON, headers=headers)


def job(req: ObjRequest) -> web.Response:
    po = project_of(req, "jobs")
    job_id = int(req.parts[1])
    pipe = po.pipeline_of(job_id)
    found = next((j for j in pipe.jobs if j.id == job_id), None) if pipe else None
    if pipe is None or found is None:
        raise not_found("404 Not found")
    return json_answer(js.job_json(req.world, po, pipe, found))


DEPLOYMENT_STATUSES = ("created", "running", "success", "failed", "canceled", "skipped",
                       "blocked")


def _deployments_invalid(q: dict[str, str], updated: bool, finished: bool) -> str | None:
    """GitLab's DeploymentsFinder#validate! (the ``updated_at`` pairing is only logged)."""
    if updated and finished:
        return "Both `updated_at` filter and `finished_at` filter can not be specified"
    if finished != (q.get("order_by") == "finished_at"):
        return "`finished_at` filter and `finished_at` sorting must be paired"
    if finished and q.get("status") != "success":
        return "`finished_at` filter must be combined with `success` status filter."
    if q.get("status", "success") not in DEPLOYMENT_STATUSES:
        return f"The deployment status {q['status']} is invalid"
    return None


def deployments(req: ObjRequest) -> web.Response:
    """Ordered by ``order_by`` (id, asc by default); filtering by ``updated_*`` orders by
    ``updated_at`` whatever was asked, as GitLab does."""
    po = project_of(req, "deployments")
    q = req.q()
    lo, hi = time_param(q, "updated_after"), time_param(q, "updated_before")
    f_lo, f_hi = time_param(q, "finished_after"), time_param(q, "finished_before")
    updated = lo is not None or hi is not None
    finished = f_lo is not None or f_hi is not None
    invalid = _deployments_invalid(q, updated, finished)
    if invalid:
        raise refuse(400, {"message": f"400 Bad request - {invalid}"})
    rows = [d for d in po.deployments if not d.pipeline.deleted
            and in_range(d.updated, lo, hi) and q.get("status", d.status) == d.status
            and (not finished or in_range(d.job.finished or 0, f_lo, f_hi))
            and q.get("environment", "production") == "production"]
    keys: dict[str, Callable[[Deployment], Any]] = {
        "id": lambda d: d.id, "updated_at": lambda d: (d.updated, d.id),
        "finished_at": lambda d: (d.job.finished or 0, d.id), "ref": lambda d: (d.pipeline.ref,
                                                                                 d.id)}
    order = q.get("order_by", "id")
    order = "updated_at" if updated else {"created_at": "id", "iid": "id"}.get(order, order)
    return page(req, sorted(rows, key=keys.get(order, keys["id"]),
                             reverse=q.get("sort") == "desc"),
                 lambda d: po.render(("deployment", d.id), lambda: dump(
                     js.deployment_json(req.world, po, d))))


def deployment(req: ObjRequest) -> web.Response:
    po = project_of(req, "deployments")
    found = next((d for d in po.deployments if str(d.id) == req.parts[1]
                  and not d.pipeline.deleted), None)
    if found is None:
        raise not_found("404 Not found")
    return json_answer(js.deployment_json(req.world, po, found))


