"""GitLab REST v4 endpoints of the simulator, routed on the raw (still URL-encoded) path."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web
from multidict import MultiMapping

from gitlab_producer.simulator import repository as repo
from gitlab_producer.simulator.catalog import project_json, user_json
from gitlab_producer.simulator.control import BARE_429_BODY, EntityFaults
from gitlab_producer.simulator.paging import (
    PagingError,
    keyset_headers,
    offset_page,
    per_page_of,
)
from gitlab_producer.simulator.routing import compile_routes, match_route
from gitlab_producer.simulator.world import World

JSON = "application/json"
Handler = Callable[["ApiRequest"], web.StreamResponse]


@dataclass
class ApiRequest:
    """What a handler needs: the world, the route's captured raw segments, query and method."""

    world: World
    parts: Sequence[str]
    query: MultiMapping[str]
    method: str
    base_url: str
    faults: EntityFaults = field(default_factory=EntityFaults)
    admin: bool = False

    def q(self) -> dict[str, str]:
        return {k: self.query[k] for k in self.query}


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON,
                        headers=headers)


def not_found(what: str = "404 Not found") -> web.Response:
    return json_response({"message": what}, 404)


def bad_request(error: str) -> web.Response:
    return json_response({"error": error}, 400)


def _list_body(items: Sequence[bytes]) -> bytes:
    return b"[" + b",".join(items) + b"]"


# What a broken GitLab or proxy lists: records the sync cannot use (EntityFaults).
BAD_PROJECTS = (b'{"name":"no-id","last_activity_at":"2026-01-01T00:00:00.000Z"}',
                b'{"id":990001,"last_activity_at":null}', b'{"id":990002}',
                b'{"id":"990003","last_activity_at":"2026-01-01T00:00:00.000Z"}', b"null")
BAD_USERS = (b'{"username":"no-id"}', b'{"id":true}', b'{"id":990004,"last_activity_on":5}')
BAD_EVENTS = (b'{"project_id":%d,"action_name":"no id","created_at":"2026-01-01T00:00:00Z"}',
              b'{"id":990005,"project_id":%d,"action_name":"no created_at"}')


def _with_bad(good: list[bytes], bad: Sequence[bytes]) -> list[bytes]:
    """The bad records first and in the middle of the good ones."""
    middle = len(good) // 2
    return [*bad[:1], *good[:middle], *bad[1:], *good[middle:]]


def _endless_offset(req: ApiRequest, route: str, headers: dict[str, str]) -> None:
    """Offer one more page after the last (EntityFaults.endless)."""
    if route in req.faults.endless and not headers.get("X-Next-Page"):
        headers["X-Next-Page"] = str(int(headers.get("X-Page", "1")) + 1)


def _parse_time(world: World, text: str) -> int:
    """An ISO 8601 parameter; without an offset it is the server's local time, as in Rails."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone(timedelta(seconds=world.spec.utc_offset_s)))
    return int(dt.timestamp() * 1000)


def _project_id(world: World, raw: str) -> int | None:
    """``:id`` is a numeric id or the URL-encoded full path (``group1%2Fproject-1``)."""
    text = unquote(raw)
    if text.isdigit():
        pid = int(text)
    else:
        match = re.fullmatch(r"(?:group\d+/)+project-(\d+)", text)
        pid = int(match.group(1)) if match else 0
    return pid if 1 <= pid <= world.project_count and pid not in world.deleted_projects else None


# -- events ---------------------------------------------------------------------------------
def _events(req: ApiRequest, indices: object, path: str, bad_in: int | None = None
            ) -> web.Response:
    q = req.q()
    for key in ("after", "before"):
        if key in q and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", q[key]):
            return bad_request(f"{key} is invalid")
    sort = q.get("sort", "desc")
    if sort not in ("asc", "desc"):
        return bad_request("sort does not have a valid value")
    world = req.world
    with world.lock:
        selected = world.event_ids_in(indices, q.get("after"), q.get("before"),  # type: ignore[arg-type]
                                      q.get("action"), q.get("target_type"))
    if sort == "desc":
        selected.reverse()
    page = offset_page(len(selected), q, f"{req.base_url}{path}")
    # GitLab filters what the token may see after paging: pages can come back short.
    forbidden = req.faults.forbidden_projects
    rows = [world.render(i) for i in selected[page.start:page.stop]
            if world.visible(i) and world.ev_project[i] not in forbidden]
    if bad_in is not None:
        rows = _with_bad(rows, [b % bad_in for b in BAD_EVENTS])
    if path.startswith("/projects/"):
        _endless_offset(req, "project_events", page.headers)
    return web.Response(body=_list_body(rows), content_type=JSON, headers=page.headers)


def project_events(req: ApiRequest) -> web.Response:
    pid = _project_id(req.world, req.parts[0])
    if pid is None:
        return not_found("404 Project Not Found")
    if pid in req.faults.forbidden_projects:
        return json_response({"message": "403 Forbidden"}, 403)
    if pid in req.faults.throttled_projects:
        return web.Response(status=429, body=BARE_429_BODY, content_type=JSON)
    return _events(req, req.world.project_events[pid - 1], f"/projects/{req.parts[0]}/events",
                   pid if pid in req.faults.malformed_events else None)


def user_events(req: ApiRequest) -> web.Response:
    uid = int(req.parts[0]) if req.parts[0].isdigit() else 0
    if not 1 <= uid <= req.world.user_count:
        return not_found("404 User Not Found")
    return _events(req, req.world.user_events[uid - 1], f"/users/{uid}/events")


# -- projects -------------------------------------------------------------------------------
PROJECT_ORDERS = ("id", "name", "path", "created_at", "updated_at", "last_activity_at")


def _project_rows(world: World, q: dict[str, str]) -> list[int]:
    after = (_parse_time(world, q["last_activity_after"]) if "last_activity_after" in q
             else None)
    before = (_parse_time(world, q["last_activity_before"]) if "last_activity_before" in q
              else None)
    id_after = int(q.get("id_after", 0))
    id_before = int(q.get("id_before", 0)) or world.project_count + 1
    activity = world.project_last_activity_ms
    deleted = world.deleted_projects
    return [pid for pid in range(id_after + 1, id_before)
            if pid not in deleted and (after is None or activity[pid - 1] > after)
            and (before is None or activity[pid - 1] < before)]


def _project_sort_key(world: World, order: str) -> Callable[[int], Any]:
    if order in ("created_at",):
        return lambda pid: (world.project_created_ms[pid - 1], pid)
    if order in ("updated_at", "last_activity_at"):
        return lambda pid: (world.project_last_activity_ms[pid - 1], pid)
    if order in ("name", "path"):
        return lambda pid: (f"project-{pid}", pid)
    return lambda pid: pid


def _render_project(world: World, pid: int, simple: bool) -> bytes:
    return orjson.dumps(project_json(
        pid, world.render_time(world.project_created_ms[pid - 1]),
        world.render_time(world.project_last_activity_ms[pid - 1]), world.spec.host, simple))


def projects_list(req: ApiRequest) -> web.Response:
    q = req.q()
    order = q.get("order_by", "created_at")
    sort = q.get("sort", "desc")
    if order not in PROJECT_ORDERS or sort not in ("asc", "desc"):
        return bad_request("order_by does not have a valid value")
    simple = q.get("simple", "false").lower() == "true"
    world = req.world
    try:
        with world.lock:
            rows = _project_rows(world, q)
    except ValueError:
        return bad_request("last_activity_after is invalid")
    base = f"{req.base_url}/projects"
    if q.get("pagination") == "keyset":
        if order != "id":
            return json_response({"error": "Keyset pagination is not yet available for this "
                                  "type of request"}, 405)
        per_page = per_page_of(q)
        chunk = rows[:per_page] if sort == "asc" else rows[::-1][:per_page]
        cursor = {} if not chunk else (
            {"id_after": str(chunk[-1])} if sort == "asc" else {"id_before": str(chunk[-1])})
        headers = keyset_headers(chunk, per_page, base, q, **cursor)
        if "projects_list" in req.faults.endless and not headers and sort == "asc":
            # Always one more (empty) page, each at a new cursor: no loop to detect.
            after = max([int(q.get("id_after", 0)), *chunk]) + 1
            headers = keyset_headers([0] * per_page, per_page, base, q, id_after=str(after))
        rows_json = [_render_project(world, p, simple) for p in chunk]
        if req.faults.malformed_listings and "id_after" not in q:
            rows_json = _with_bad(rows_json, BAD_PROJECTS)
        return web.Response(body=_list_body(rows_json), content_type=JSON, headers=headers)
    rows.sort(key=_project_sort_key(world, order), reverse=sort == "desc")
    page = offset_page(len(rows), q, base, resource="Project")
    body = _list_body([_render_project(world, p, simple) for p in rows[page.start:page.stop]])
    return web.Response(body=body, content_type=JSON, headers=page.headers)


def members_all(req: ApiRequest) -> web.Response:
    world = req.world
    pid = _project_id(world, req.parts[0])
    if pid is None:
        return not_found("404 Project Not Found")
    rows = []
    for uid, level in repo.members(pid, world.user_count):
        data = user_json(uid, world.render_time(world.user_created_ms[uid - 1]), "",
                         world.spec.host)
        data.pop("last_activity_on")
        data.update({"access_level": level, "expires_at": None, "membership_state": "active"})
        rows.append(orjson.dumps(data))
    page = offset_page(len(rows), req.q(), f"{req.base_url}/projects/{req.parts[0]}/members/all")
    return web.Response(body=_list_body(rows[page.start:page.stop]), content_type=JSON,
                        headers=page.headers)


# -- users ----------------------------------------------------------------------------------
USER_ORDERS = ("id", "name", "username", "created_at", "updated_at")


def _render_user(world: World, uid: int) -> bytes:
    last = world.user_last_activity_ms[uid - 1]
    return orjson.dumps(user_json(uid, world.render_time(world.user_created_ms[uid - 1]),
                                  world.render_date(last), world.spec.host))


def _user_key(order: str) -> Callable[[int], Any]:
    if order in ("name", "username"):
        return lambda uid: (f"user{uid}", uid)
    return lambda uid: uid


def users_list(req: ApiRequest) -> web.Response:
    q = req.q()
    order, sort = q.get("order_by", "id"), q.get("sort", "desc")
    if order not in USER_ORDERS or sort not in ("asc", "desc"):
        return bad_request("order_by does not have a valid value")
    world = req.world
    key = _user_key(order)
    uids = sorted(range(1, world.user_count + 1), key=key, reverse=sort == "desc")
    base = f"{req.base_url}/users"
    if q.get("pagination") == "keyset":
        if order not in ("id", "name", "username"):
            return json_response({"error": "Keyset pagination is not yet available for this "
                                  "type of request"}, 405)
        per_page = per_page_of(q)
        start = 0
        if "cursor" in q:
            try:
                last = int(orjson.loads(base64.urlsafe_b64decode(q["cursor"]))["id"])
            except (ValueError, KeyError, TypeError):
                return bad_request("cursor is invalid")
            start = uids.index(last) + 1 if last in uids else len(uids)
        chunk = uids[start:start + per_page]
        cursor = base64.urlsafe_b64encode(orjson.dumps({"id": chunk[-1]})).decode() if chunk else ""
        headers = keyset_headers(chunk, per_page, base, q, cursor=cursor)
        rows_json = [_render_user(world, u) for u in chunk]
        if req.faults.malformed_listings and "cursor" not in q:
            rows_json = _with_bad(rows_json, BAD_USERS)
        return web.Response(body=_list_body(rows_json), content_type=JSON, headers=headers)
    page = offset_page(len(uids), q, base, resource="User")
    body = _list_body([_render_user(world, u) for u in uids[page.start:page.stop]])
    return web.Response(body=body, content_type=JSON, headers=page.headers)


def user(req: ApiRequest) -> web.Response:
    """A single user; an administrator's token also sees the ``email``."""
    uid = int(req.parts[0]) if req.parts[0].isdigit() else 0
    if not 1 <= uid <= req.world.user_count:
        return not_found("404 User Not Found")
    if req.admin:
        data = orjson.loads(_render_user(req.world, uid))
        data.update({"email": f"user{uid}@example.com", "is_admin": uid == 1})
        return json_response(data)
    return web.Response(body=_render_user(req.world, uid), content_type=JSON)


def current_user(req: ApiRequest) -> web.Response:
    return web.Response(body=_render_user(req.world, 1), content_type=JSON)


# -- repository files and artifacts ---------------------------------------------------------
def _file(req: ApiRequest, raw: bool) -> web.StreamResponse:
    pid = _project_id(req.world, req.parts[0])
    if pid is None:
        return not_found("404 Project Not Found")
    # The path must arrive as one encoded segment: '/' inside it never reaches this route,
    # and a double-encoded '%252F' decodes to a name that does not exist.
    path = unquote(req.parts[1])
    ref = req.query.get("ref")
    if ref is None:
        if not raw:
            return bad_request("ref is missing")
        ref = "main"
    blob = repo.get_blob(pid, path, ref)
    if blob is None:
        return not_found("404 File Not Found")
    if raw:
        return web.Response(body=blob.content, content_type="text/plain",
                            headers=blob.headers())
    if req.method == "HEAD":
        return web.Response(headers=blob.headers(), content_type=JSON)
    return json_response(blob.json())


def file_json(req: ApiRequest) -> web.StreamResponse:
    return _file(req, raw=False)


def file_raw(req: ApiRequest) -> web.StreamResponse:
    return _file(req, raw=True)


def file_unencoded(req: ApiRequest) -> web.Response:
    """A file path whose '/' was not encoded never names a file."""
    return not_found("404 File Not Found")


def _zip(pid: int, job_id: int) -> web.Response:
    return web.Response(body=repo.artifacts_zip(pid, job_id), content_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="artifacts.zip"'
                                 f"; job={job_id}"})


def _artifact_file(pid: int, job_id: int, path: str) -> web.Response:
    data = repo.artifact_files(pid, job_id).get(path)
    if data is None:
        return not_found("404 Not found")
    return web.Response(body=data, content_type="application/octet-stream")


def _job_of(req: ApiRequest, ref_raw: str) -> tuple[int, int] | web.Response:
    pid = _project_id(req.world, req.parts[0])
    if pid is None:
        return not_found("404 Project Not Found")
    ref, job = unquote(ref_raw), req.query.get("job", "")
    if repo.resolve_ref(pid, ref) is None or job not in repo.JOB_NAMES:
        return not_found("404 Not found")
    return pid, repo.job_id_for(pid, ref, job)


def job_artifacts(req: ApiRequest) -> web.Response:
    pid = _project_id(req.world, req.parts[0])
    if pid is None or not req.parts[1].isdigit():
        return not_found("404 Not found")
    if len(req.parts) > 2:
        return _artifact_file(pid, int(req.parts[1]), unquote(req.parts[2]))
    return _zip(pid, int(req.parts[1]))


def ref_artifacts(req: ApiRequest) -> web.Response:
    found = _job_of(req, req.parts[1])
    if isinstance(found, web.Response):
        return found
    pid, job_id = found
    if len(req.parts) > 2:
        return _artifact_file(pid, job_id, unquote(req.parts[2]))
    return _zip(pid, job_id)


SEG = r"([^/]+)"
ROUTES: tuple[tuple[str, re.Pattern[str], Handler], ...] = compile_routes(
    (
        ("projects_list", r"projects", projects_list),
        ("project_events", rf"projects/{SEG}/events", project_events),
        ("members", rf"projects/{SEG}/members/all", members_all),
        ("files", rf"projects/{SEG}/repository/files/{SEG}", file_json),
        ("files_raw", rf"projects/{SEG}/repository/files/{SEG}/raw", file_raw),
        ("files", rf"projects/{SEG}/repository/files/(.+)", file_unencoded),
        ("artifacts", rf"projects/{SEG}/jobs/(\d+)/artifacts(?:/(.+))?", job_artifacts),
        ("artifacts", rf"projects/{SEG}/jobs/artifacts/{SEG}/download", ref_artifacts),
        ("artifacts", rf"projects/{SEG}/jobs/artifacts/{SEG}/raw/(.+)", ref_artifacts),
        ("users_list", r"users", users_list),
        ("user", rf"users/{SEG}", user),
        ("user_events", rf"users/{SEG}/events", user_events),
        ("current_user", r"user", current_user),
    )
)


def route(raw_path: str) -> tuple[str, Handler, list[str]] | None:
    """Match a raw path below ``/api/v4/`` to (route name, handler, captured raw segments)."""
    return match_route(ROUTES, raw_path)


def handle(world: World, raw_path: str, query: MultiMapping[str], method: str,
           base_url: str, faults: EntityFaults | None = None, admin: bool = False
           ) -> tuple[str, web.StreamResponse]:
    """Answer one authenticated API request; returns the route name for statistics."""
    found = route(raw_path)
    if found is None:
        return "unknown", not_found("404 Not Found")
    name, handler, parts = found
    try:
        return name, handler(ApiRequest(world, parts, query, method, base_url,
                                        faults or EntityFaults(), admin))
    except PagingError as exc:
        return name, json_response(exc.body, exc.status)
