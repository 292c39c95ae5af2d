"""Files and build artifacts captured at an exact commit (seed 003), stored under
``<ARTIFACT_STORE_URL>/<project_id>/<commit_sha>/<path>`` through fsspec.

- A push to a rule's branch captures the rule's files at the pushed commit (repository files
  API, the path URL-encoded exactly once: ``lib%2Fclass.rb``).
- A successful job named in a rule captures that job's artifacts archive, stored as
  ``<project_id>/<sha>/artifacts/<job>.zip``.
- Downloads stream into the store (:mod:`gitlab_producer.artifact_store`), whose writes are
  checked against path traversal and atomic; what is already stored is not fetched again.
  Commits must be full ids (40 or 64 hex). Each stored file is announced on
  ``KAFKA_ARTIFACT_TOPIC`` with project, commit, path, size, sha256 and URL.
- A capture on behalf of a GitLab user proceeds only if that user is a member of the project
  with at least Reporter access (the service account may see more than the user may).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import quote

import orjson
from aiohttp import web

from gitlab_producer.artifact_paths import UnsafePathError, commit_sha
from gitlab_producer.artifact_store import ArtifactStore, Stored
from gitlab_producer.config import CaptureRule
from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.errors import GitLabError
from gitlab_producer.logs import get_logger
from gitlab_producer.sinks.base import DeliveryError, Message, Sink

__all__ = ["ArtifactStore", "CaptureRefused", "Capturer", "Stored", "capture_endpoint",
           "file_url"]
log = get_logger(__name__)
REPORTER = 20
CaptureOutcome = Literal["captured", "ignored", "failed"]


class CaptureRefused(Exception):
    """The requesting user may not read the project."""


def file_url(project_id: int, path: str) -> str:
    """The repository files URL with the path encoded exactly once (``/`` -> ``%2F``)."""
    return f"projects/{project_id}/repository/files/{quote(path, safe='')}/raw"


class Capturer:
    """Runs captures for push and job hooks, the CLI and HTTP requests."""

    def __init__(self, client: GitLabClient, store: ArtifactStore, sink: Sink,
                 rules: tuple[CaptureRule, ...], instance: str) -> None:
        self.client = client
        self.store = store
        self.sink = sink
        self.rules = rules
        self.instance = instance
        self._ids: dict[str, int] = {}

    async def project_id(self, project: str) -> int:
        if project.isdigit():
            return int(project)
        if project not in self._ids:
            answer = await self.client.get(f"projects/{quote(project, safe='')}",
                                           endpoint="projects/:id")
            self._ids[project] = int(answer.body["id"])
        return self._ids[project]

    async def access_level(self, project_id: int, username: str | None = None) -> int:
        """``username``'s access level in the project (the service account's when None)."""
        if username is None:
            me = await self.client.get("user", endpoint="user")
            username = str(me.body["username"])
        async for page in self.client.pages(f"projects/{project_id}/members/all",
                                            {"per_page": 100}, "projects/:id/members/all"):
            for member in page:
                if member.get("username") == username:
                    return int(member.get("access_level", 0))
        return 0

    async def check_access(self) -> dict[str, bool]:
        """At start: can the service account read each configured project?"""
        result = {}
        for rule in self.rules:
            try:
                level = await self.access_level(await self.project_id(rule.project))
            except GitLabError as exc:
                log.error("capture_project_unreadable", project=rule.project, error=str(exc))
                result[rule.project] = False
                continue
            result[rule.project] = level >= REPORTER
            if level < REPORTER:
                log.error("capture_project_unreadable", project=rule.project,
                          detail="the service account needs Reporter or higher there")
        return result

    async def rule_for(self, project_id: int) -> CaptureRule | None:
        """The capture rule of a project, if any."""
        for rule in self.rules:
            if await self.project_id(rule.project) == project_id:
                return rule
        return None

    async def capture_files(self, project_id: int, commit: str, paths: tuple[str, ...],
                            as_user: str | None = None) -> list[Stored]:
        commit = commit_sha(commit)
        for path in paths:
            self.store.target(project_id, commit, path)  # refused before GitLab is asked
        if as_user is not None and await self.access_level(project_id, as_user) < REPORTER:
            log.warning("capture_refused", project=project_id, user=as_user)
            raise CaptureRefused(f"{as_user} is not a Reporter (or higher) of {project_id}")
        stored = [await self._fetch(project_id, commit, path, file_url(project_id, path),
                                    {"ref": commit}, "projects/:id/repository/files/:path/raw")
                  for path in paths]
        await self.announce(stored)
        return stored

    async def _fetch(self, project_id: int, commit: str, path: str, url: str,
                     params: dict[str, str] | None, endpoint: str) -> Stored:
        """Stream a GitLab download into the store, unless it is stored already."""
        found = await self.store.find(project_id, commit, path)
        if found is not None:
            return found
        writer = await self.client.download(
            url, params, endpoint, lambda: self.store.open_writer(project_id, commit, path))
        return await writer.commit()

    async def capture_artifacts(self, project_id: int, commit: str, job_id: int,
                                job_name: str) -> Stored:
        commit = commit_sha(commit)
        path = f"artifacts/{job_name}.zip"
        self.store.target(project_id, commit, path)  # refused before GitLab is asked
        stored = await self._fetch(project_id, commit, path,
                                   f"projects/{project_id}/jobs/{job_id}/artifacts", None,
                                   "projects/:id/jobs/:id/artifacts")
        await self.announce([stored])
        return stored

    async def announce(self, stored: list[Stored]) -> None:
        """Each newly stored file on ``KAFKA_ARTIFACT_TOPIC`` (skipped ones are not)."""
        fresh = [s for s in stored if not s.skipped]
        await self.sink.send([Message(
            str(s.project_id).encode(),
            orjson.dumps({"project_id": s.project_id, "commit": s.commit, "path": s.path,
                          "size": s.size, "sha256": s.sha256, "url": s.url}),
            (("source", self.instance.encode()),)) for s in fresh])

    async def capture(self, project: str, ref: str, as_user: str | None = None
                      ) -> list[Stored]:
        """The configured files of ``project`` at commit ``ref`` (CLI and HTTP)."""
        project_id = await self.project_id(project)
        rule = await self.rule_for(project_id)
        if rule is None:
            raise CaptureRefused(f"no capture rule for project {project}")
        return await self.capture_files(project_id, ref, rule.files, as_user)

    async def on_hook(self, payload: dict[str, Any]) -> CaptureOutcome:
        """Push to a rule's branch -> files at that commit; successful rule job -> artifacts.
        Returns what happened; a failure is logged with its reason (the hook was acknowledged
        already, so ``gitlab-producer capture`` is how to redo it)."""
        kind = payload.get("object_kind")
        project = payload.get("project")
        raw_id = payload.get("project_id") or (project.get("id") if isinstance(project, dict)
                                               else None)
        commit = payload.get("checkout_sha") or payload.get("sha")
        try:
            if kind not in ("push", "build") or raw_id is None:
                return "ignored"
            project_id = int(raw_id)
            rule = await self.rule_for(project_id)
            if rule is None:
                return "ignored"
            if kind == "push" and rule.files:
                branch = rule.branch or (project or {}).get("default_branch")
                if payload.get("ref") == f"refs/heads/{branch}" and payload.get("checkout_sha"):
                    await self.capture_files(project_id, payload["checkout_sha"], rule.files)
                    return "captured"
            elif (kind == "build" and payload.get("build_status") == "success"
                  and payload.get("build_name") in {a.job for a in rule.artifacts}):
                await self.capture_artifacts(project_id, payload["sha"],
                                             int(payload["build_id"]), payload["build_name"])
                return "captured"
            return "ignored"
        except UnsafePathError as exc:
            log.warning("capture_refused", project=raw_id, commit=commit, kind=kind,
                        reason=str(exc))
            return "failed"
        except (GitLabError, DeliveryError, CaptureRefused, OSError, ValueError, TypeError,
                AttributeError) as exc:
            log.warning("capture_failed", project=raw_id, commit=commit, kind=kind,
                        error=f"{type(exc).__name__}: {exc}")
            return "failed"


def capture_endpoint(capturer: Capturer, secret: str, body_timeout_s: float = 3.0
                     ) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``POST /capture`` ``{"project", "ref", "as_user"}``, authenticated like webhooks.

    Only projects with a capture rule, only the rule's files. ``as_user`` is asserted by the
    caller (who holds the webhook token, so is trusted like GitLab): when it is named, the
    capture proceeds only if that user is a Reporter (or higher) of the project; when it is
    absent the capture runs with the service account's access."""

    async def handle(request: web.Request) -> web.Response:
        token = request.headers.get("X-Gitlab-Token", "").encode("utf-8", "surrogateescape")
        if not secret or not hmac.compare_digest(token, secret.encode()):
            return web.json_response({"error": "bad token"}, status=401)
        try:
            async with asyncio.timeout(body_timeout_s):
                raw = await request.read()
        except TimeoutError:
            return web.json_response({"error": "body not received in time"}, status=408)
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": "body too large"}, status=413)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        fields = body if isinstance(body, dict) else {}
        project, ref, as_user = fields.get("project"), fields.get("ref"), fields.get("as_user")
        if isinstance(project, int) and not isinstance(project, bool):
            project = str(project)
        if not (isinstance(project, str) and project and isinstance(ref, str) and ref):
            return web.json_response({"error": "expected a JSON object with project and ref"},
                                     status=400)
        if as_user is not None and not (isinstance(as_user, str) and as_user):
            return web.json_response({"error": "as_user must be a username"}, status=400)
        try:
            stored = await capturer.capture(project, ref, as_user)
        except UnsafePathError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except CaptureRefused as exc:
            return web.json_response({"error": str(exc)}, status=403)
        except (GitLabError, DeliveryError) as exc:
            return web.json_response({"error": str(exc)}, status=502)
        return web.json_response({"stored": [s.__dict__ for s in stored]})

    return handle
