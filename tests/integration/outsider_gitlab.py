"""A small GitLab REST v4 stand-in written from GitLab's documentation, independent of the
project's simulator: the outsider tests attack the service against it.

Run as a process (so that ``faketime`` can move its clock)::

    python outsider_gitlab.py --port 8080 [--utc-offset -08:00] [--token T]

What it serves (``doc/api/events.md``, ``doc/api/projects.md``, ``doc/api/users.md``):
``GET /api/v4/user``, ``/projects`` (keyset by id, ``last_activity_after``), ``/users``
(keyset by id, ``last_activity_on`` as the zone's date), ``/projects/:id/events`` and
``/users/:id/events`` (offset pagination, newest id first, ``after``/``before`` as whole days
of the zone, ``X-Next-Page``/``Link``/``X-Total``), and GitLab's hourly
``last_activity_at`` rule. Timestamps are rendered in the zone with its offset.

Control (not GitLab): ``POST /_ctl/events`` ``{"events": [{"project_id": 1 | null,
"author_id": 2, "created_at": iso?, "extra": {...}?}]}`` adds events (ids ascending), answers
their ids; ``POST /_ctl/faults`` ``{"faults": [{"path": regex, "kind": "429" | "500" | "html"
| "truncated" | "slow" | "drop" | "notjson_object", "times": n, "seconds": s?}]}`` queues
faults for matching requests; ``POST /_ctl/hidden`` ``{"ids": [...]}`` hides events (GitLab's
visibility filter, applied after paging); ``GET /_ctl/events`` the ground truth;
``GET /_ctl/stats`` requests per path; ``POST /_ctl/insert_on_read`` ``{"path": regex,
"page": n, "events": [...]}``: events added just before that page is answered (a list
changing while read).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from aiohttp import web


@dataclass
class Fault:
    path: re.Pattern[str]
    kind: str
    times: int
    seconds: float = 0.0


@dataclass
class World:
    zone: timezone
    token: str
    events: list[dict[str, Any]] = field(default_factory=list)
    hidden: set[int] = field(default_factory=set)
    projects: dict[int, datetime] = field(default_factory=dict)  # id -> last_activity_at
    users: dict[int, datetime] = field(default_factory=dict)  # id -> last activity (time)
    faults: list[Fault] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    inserts: list[dict[str, Any]] = field(default_factory=list)
    next_id: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))

    def render(self, at: datetime) -> str:
        local = at.astimezone(self.zone)
        return local.isoformat(timespec="milliseconds")

    def add(self, spec: dict[str, Any]) -> dict[str, Any]:
        now = datetime.now(UTC)
        created = (datetime.fromisoformat(spec["created_at"]) if spec.get("created_at")
                   else now)
        eid = spec.get("id") or next(self.next_id)
        author = int(spec.get("author_id", 1))
        project = spec.get("project_id")
        event: dict[str, Any] = {
            "id": eid, "title": None, "project_id": project,
            "action_name": spec.get("action_name", "pushed to"),
            "target_id": None, "target_iid": None, "target_type": None,
            "author_id": author, "target_title": spec.get("target_title"),
            "created_at": self.render(created),
            "author": {"name": f"User {author}", "username": f"user{author}", "id": author,
                       "state": "active", "avatar_url": None,
                       "web_url": f"https://gitlab.example.com/user{author}"},
            "author_username": f"user{author}",
            "_ts": created,
        }
        event.update(spec.get("extra", {}))
        self.events.append(event)
        self.events.sort(key=lambda e: e["id"])
        # GitLab resets last_activity_at only when it is older than an hour.
        if project is not None:
            last = self.projects.get(project)
            if last is None or created - last > timedelta(hours=1):
                self.projects[project] = created
        last_user = self.users.get(author)
        if last_user is None or created > last_user:
            self.users[author] = created
        return event


def public(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if not k.startswith("_")}


def day_end(world: World, day: str) -> datetime:
    d = datetime.fromisoformat(day).replace(tzinfo=world.zone)
    return d + timedelta(days=1)


async def apply_fault(world: World, request: web.Request) -> web.StreamResponse | None:
    for fault in world.faults:
        if fault.times > 0 and fault.path.search(request.path_qs):
            fault.times -= 1
            if fault.kind == "429":
                return web.Response(status=429, text="Retry later",
                                    headers={"Retry-After": str(int(fault.seconds or 1))})
            if fault.kind == "429bare":
                return web.json_response({"message": {"error": "This endpoint has been "
                                          "requested too many times. Try again later."}},
                                         status=429)
            if fault.kind == "500":
                return web.json_response({"message": "500 Internal Server Error"}, status=500)
            if fault.kind == "html":
                return web.Response(status=502, content_type="text/html",
                                    text="<html><body><h1>502 Bad Gateway</h1></body></html>")
            if fault.kind == "html200":
                return web.Response(status=200, content_type="text/html",
                                    text="<!DOCTYPE html><html>sign in</html>")
            if fault.kind == "slow":
                await asyncio.sleep(fault.seconds)
                return None
            if fault.kind == "drop":
                assert request.transport is not None
                request.transport.close()
                raise ConnectionResetError
            if fault.kind == "truncated":
                return web.Response(status=200, content_type="application/json",
                                    text='[{"id": 1, "created_at": "2026-')
            if fault.kind == "notjson_object":
                return web.json_response({"message": "weird"}, status=200)
    return None


def paged(request: web.Request, rows: list[Any], world: World) -> web.Response:
    per_page = min(int(request.query.get("per_page", "20")), 100)
    page = int(request.query.get("page", "1"))
    for insert in list(world.inserts):
        if re.search(insert["path"], request.path) and insert["page"] == page:
            world.inserts.remove(insert)
            for spec in insert["events"]:
                world.add(spec)
            raise Rebuild
    start = (page - 1) * per_page
    chunk = rows[start:start + per_page]
    total_pages = max(1, -(-len(rows) // per_page))
    headers = {"X-Page": str(page), "X-Per-Page": str(per_page), "X-Total": str(len(rows)),
               "X-Total-Pages": str(total_pages), "X-Prev-Page": str(page - 1) if page > 1
               else ""}
    base = f"{request.scheme}://{request.host}{request.path}"
    query = dict(request.query)
    links = []
    if page < total_pages:
        headers["X-Next-Page"] = str(page + 1)
        links.append(f'<{base}?{urlencode({**query, "page": page + 1})}>; rel="next"')
    else:
        headers["X-Next-Page"] = ""
    links.append(f'<{base}?{urlencode({**query, "page": 1})}>; rel="first"')
    links.append(f'<{base}?{urlencode({**query, "page": total_pages})}>; rel="last"')
    headers["Link"] = ", ".join(links)
    # Visibility is filtered after paging: a short page may have a next one.
    visible = [public(e) for e in chunk if not isinstance(e, dict) or e.get("id") not in
               world.hidden]
    return web.json_response(visible, headers=headers, dumps=lambda o: json.dumps(
        o, ensure_ascii=False))


class Rebuild(Exception):
    """The list changed while it was read: build it again."""


def events_response(request: web.Request, world: World, keep: Any) -> web.Response:
    while True:
        rows = [e for e in world.events if keep(e)]
        after = request.query.get("after")
        before = request.query.get("before")
        if after:
            bound = day_end(world, after)
            rows = [e for e in rows if e["_ts"] >= bound]
        if before:
            bound = datetime.fromisoformat(before).replace(tzinfo=world.zone)
            rows = [e for e in rows if e["_ts"] < bound]
        rows.sort(key=lambda e: e["id"], reverse=request.query.get("sort", "desc") != "asc")
        try:
            return paged(request, rows, world)
        except Rebuild:
            continue


def keyset(request: web.Request, rows: list[tuple[int, dict[str, Any]]]) -> web.Response:
    if request.query.get("pagination") != "keyset":
        return paged(request, [r for _, r in rows], request.app["world"])
    per_page = min(int(request.query.get("per_page", "20")), 100)
    id_after = int(request.query.get("id_after", "0"))
    rows = sorted([r for r in rows if r[0] > id_after], key=lambda r: r[0])
    chunk = rows[:per_page]
    headers = {}
    if len(rows) > per_page:
        base = f"{request.scheme}://{request.host}{request.path}"
        query = {**request.query, "id_after": chunk[-1][0]}
        headers["Link"] = f'<{base}?{urlencode(query)}>; rel="next"'
    return web.json_response([r for _, r in chunk], headers=headers)


def build_app(world: World) -> web.Application:
    routes = web.RouteTableDef()

    @web.middleware
    async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_ctl"):
            return await handler(request)
        key = re.sub(r"/\d+", "/:id", request.path)
        world.stats[key] = world.stats.get(key, 0) + 1
        if request.headers.get("PRIVATE-TOKEN") != world.token:
            return web.json_response({"message": "401 Unauthorized"}, status=401)
        fault = await apply_fault(world, request)
        if fault is not None:
            return fault
        return await handler(request)

    @routes.get("/api/v4/user")
    async def me(request: web.Request) -> web.Response:
        return web.json_response({"id": 1, "username": "root", "is_admin": True,
                                  "state": "active"})

    @routes.get("/api/v4/projects")
    async def projects(request: web.Request) -> web.Response:
        after = request.query.get("last_activity_after")
        bound = datetime.fromisoformat(after.replace("Z", "+00:00")) if after else None
        rows = []
        for pid, last in world.projects.items():
            if bound is not None and last <= bound:
                continue
            rows.append((pid, {"id": pid, "name": f"p{pid}", "path_with_namespace":
                               f"g/p{pid}", "last_activity_at": world.render(last),
                               "description": None}))
        return keyset(request, rows)

    @routes.get("/api/v4/users")
    async def users(request: web.Request) -> web.Response:
        rows = [(uid, {"id": uid, "username": f"user{uid}", "name": "Ünïcødé 名前",
                       "state": "active",
                       "last_activity_on": last.astimezone(world.zone).date().isoformat()})
                for uid, last in world.users.items()]
        return keyset(request, rows)

    @routes.get(r"/api/v4/projects/{pid:\d+}/events")
    async def project_events(request: web.Request) -> web.Response:
        pid = int(request.match_info["pid"])
        if pid not in world.projects:
            return web.json_response({"message": "404 Project Not Found"}, status=404)
        return events_response(request, world, lambda e: e["project_id"] == pid)

    @routes.get(r"/api/v4/users/{uid:\d+}/events")
    async def user_events(request: web.Request) -> web.Response:
        uid = int(request.match_info["uid"])
        return events_response(request, world, lambda e: e["author_id"] == uid)

    @routes.post("/_ctl/events")
    async def add_events(request: web.Request) -> web.Response:
        body = await request.json()
        added = [world.add(spec)["id"] for spec in body["events"]]
        return web.json_response({"ids": added})

    @routes.get("/_ctl/events")
    async def truth(request: web.Request) -> web.Response:
        return web.json_response([public(e) for e in world.events])

    @routes.post("/_ctl/faults")
    async def faults(request: web.Request) -> web.Response:
        body = await request.json()
        for f in body["faults"]:
            world.faults.append(Fault(re.compile(f["path"]), f["kind"], int(f.get("times", 1)),
                                      float(f.get("seconds", 0))))
        return web.json_response({"ok": True})

    @routes.post("/_ctl/hidden")
    async def hide(request: web.Request) -> web.Response:
        world.hidden = set((await request.json())["ids"])
        return web.json_response({"ok": True})

    @routes.post("/_ctl/insert_on_read")
    async def insert_on_read(request: web.Request) -> web.Response:
        world.inserts.append(await request.json())
        return web.json_response({"ok": True})

    @routes.get("/_ctl/stats")
    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"requests": world.stats,
                                  "faults_left": sum(f.times for f in world.faults)})

    app = web.Application(middlewares=[gate])
    app["world"] = world
    app.add_routes(routes)
    return app


def parse_offset(text: str) -> timezone:
    sign = -1 if text.startswith("-") else 1
    hours, minutes = text.lstrip("+-").split(":")
    return timezone(sign * timedelta(hours=int(hours), minutes=int(minutes)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--utc-offset", default="+00:00")
    parser.add_argument("--token", default="outsider-token")
    args = parser.parse_args()
    world = World(parse_offset(args.utc_offset), args.token)
    web.run_app(build_app(world), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
