"""GitLab-shaped webhook and system hook deliveries, with GitLab's headers and retries."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from gitlab_producer.simulator.catalog import author_json, namespace_json, project_json, sha_for
from gitlab_producer.simulator.repository import BRANCHES
from gitlab_producer.simulator.world import World

GITLAB_VERSION = "17.6.0"
HOOK_TIMEOUT_S = 10.0

# kind -> (X-Gitlab-Event header, object_kind or event_name)
HOOK_KINDS: dict[str, tuple[str, str]] = {
    "push": ("Push Hook", "push"),
    "tag_push": ("Tag Push Hook", "tag_push"),
    "issue": ("Issue Hook", "issue"),
    "note": ("Note Hook", "note"),
    "merge_request": ("Merge Request Hook", "merge_request"),
    "pipeline": ("Pipeline Hook", "pipeline"),
    "job": ("Job Hook", "build"),
    "wiki_page": ("Wiki Page Hook", "wiki_page"),
    "deployment": ("Deployment Hook", "deployment"),
    "release": ("Release Hook", "release"),
    "system_project_create": ("System Hook", "project_create"),
    "system_user_create": ("System Hook", "user_create"),
    "system_repository_update": ("System Hook", "repository_update"),
}


def _project_block(world: World, pid: int) -> dict[str, Any]:
    data = project_json(pid, world.render_time(world.project_created_ms[pid - 1]),
                        world.render_time(world.project_last_activity_ms[pid - 1]),
                        world.spec.host, True)
    return {"id": pid, "name": data["name"], "web_url": data["web_url"],
            "path_with_namespace": data["path_with_namespace"], "default_branch": "main",
            "namespace": data["namespace"]["name"], "git_http_url": data["http_url_to_repo"]}


def payload(world: World, kind: str, pid: int, uid: int, serial: int) -> dict[str, Any]:
    """A payload of ``kind`` for project ``pid`` by user ``uid``."""
    header, name = HOOK_KINDS[kind]
    user = author_json(uid, world.spec.host)
    at = world.render_time(world.start_ms)
    if header == "System Hook":
        return {"event_name": name, "created_at": at, "project_id": pid,
                "user_id": uid, "username": user["username"],
                "path_with_namespace": namespace_json(pid, world.spec.host)["full_path"]}
    body: dict[str, Any] = {"object_kind": name, "event_type": name, "user": user,
                            "project": _project_block(world, pid)}
    if name in ("push", "tag_push"):
        ref = f"refs/heads/{BRANCHES[0]}" if name == "push" else f"refs/tags/v{serial}"
        after = sha_for("branch", pid, BRANCHES[0]) if name == "push" else sha_for(pid, serial)
        commits = [{"id": sha_for(pid, serial, i), "message": f"Commit {i}",
                    "timestamp": at, "author": {"name": user["name"]}}
                   for i in range(min(3, 20))]
        body.update({"before": sha_for(pid, serial, "before"), "after": after, "ref": ref,
                     "checkout_sha": after, "user_id": uid, "user_username": user["username"],
                     "project_id": pid, "commits": commits, "total_commits_count": len(commits)})
    elif name == "build":
        body.update({"build_id": serial, "build_name": "build", "build_status": "success",
                     "project_id": pid, "ref": "main", "sha": sha_for("branch", pid, "main")})
    else:
        body["object_attributes"] = {"id": serial, "iid": serial % 500 + 1, "action": "open",
                                     "created_at": at}
    return body


@dataclass
class Delivery:
    """One delivery and what happened to its attempts."""

    kind: str
    idempotency_key: str
    attempts: list[int | str] = field(default_factory=list)

    @property
    def delivered(self) -> bool:
        return any(isinstance(a, int) and 200 <= a < 300 for a in self.attempts)


async def deliver(
    world: World,
    url: str,
    kinds: list[str],
    token: str,
    retries: int = 3,
    retry_delay_s: float = 1.0,
    timeout_s: float = HOOK_TIMEOUT_S,
    repeat: int = 1,
) -> list[Delivery]:
    """POST each kind ``repeat`` times; failed or timed-out attempts are retried with the
    same ``Idempotency-Key`` and a new ``X-Gitlab-Webhook-UUID``."""
    instance = f"https://{world.spec.host}"
    results: list[Delivery] = []
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        serial = 0
        for kind in kinds:
            for _ in range(repeat):
                serial += 1
                pid = 1 + serial % world.project_count
                uid = 1 + serial % world.user_count
                body = payload(world, kind, pid, uid, serial)
                delivery = Delivery(kind, str(uuid.uuid4()))
                event_uuid = str(uuid.uuid4())
                for attempt in range(retries + 1):
                    headers = {
                        "Content-Type": "application/json",
                        "User-Agent": f"GitLab/{GITLAB_VERSION}",
                        "X-Gitlab-Event": HOOK_KINDS[kind][0],
                        "X-Gitlab-Token": token,
                        "X-Gitlab-Instance": instance,
                        "X-Gitlab-Event-UUID": event_uuid,
                        "X-Gitlab-Webhook-UUID": str(uuid.uuid4()),
                        "Idempotency-Key": delivery.idempotency_key,
                    }
                    try:
                        response = await client.post(url, json=body, headers=headers)
                        delivery.attempts.append(response.status_code)
                        if response.status_code < 500 and response.status_code != 429:
                            break
                    except httpx.HTTPError as exc:
                        delivery.attempts.append(type(exc).__name__)
                    if attempt < retries:
                        await asyncio.sleep(retry_delay_s)
                results.append(delivery)
    return results
