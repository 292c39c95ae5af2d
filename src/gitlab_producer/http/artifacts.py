"""Artifact hand-back (seed 003): build tools upload what they built for a commit.

``PUT /artifacts/<project>/<commit>/<path>`` on ``WEBHOOK_PORT``, with
``Authorization: Bearer <ARTIFACT_UPLOAD_TOKEN>``; ``<project>`` is an id or a URL-encoded
full path, ``<commit>`` a full commit id, ``<path>`` URL-encoded segments. Before any byte is
stored:

- the token matches (constant time), else 401; the path is safe, else 400; a declared
  ``Content-Length`` is within ``ARTIFACT_MAX_BYTES``, else 413;
- GitLab knows the project and the commit, and the service account can read them (404
  otherwise); with a capture rule for the project, the commit is on the rule's branch (the
  default branch when the rule names none);
- with ``X-Gitlab-User`` (or ``?as_user=``) that user is at least Developer in the project,
  and ``?overwrite=true`` needs a Maintainer (403);
- a declared length that differs from the file already at the path is a 409.

Then ``100 Continue`` (when the client asked for it) and the body is streamed into the store
(:mod:`gitlab_producer.artifact_writes`), hashed as it arrives: 413 once it passes the limit,
422 when ``Digest: sha-256=<base64>`` (or ``Content-Digest``, or ``X-Checksum-Sha256`` in hex)
does not match, 408 when nothing arrives for ``ARTIFACT_IDLE_TIMEOUT``, 409 for a different
file at the path, 200 for an identical one (nothing rewritten), 201 for a new one, announced
on ``KAFKA_ARTIFACT_TOPIC`` once complete (503, and the file removed again, when the broker
does not take the announcement). Every refusal answers ``{"error": <code>, "reason": <text>}``
and leaves nothing stored; so does an upload cut off midway or stopped by SIGTERM.

``GET /artifacts/<project>/<commit>/`` lists what is stored for a commit (same token; with a
user named, that user must be at least Reporter).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import re
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import ClientPayloadError, web

from gitlab_producer.artifact_paths import UnsafePathError, commit_sha, relative_path
from gitlab_producer.artifact_writes import (
    TEMP_SUFFIX,
    WriteRefused,
    is_temporary,
    listing,
    refuse_early,
    remove,
    store_upload,
)
from gitlab_producer.capture import REPORTER, Capturer, Stored
from gitlab_producer.gitlab.errors import ForbiddenError, GitLabError, NotFoundError
from gitlab_producer.logs import get_logger
from gitlab_producer.metrics import Metrics
from gitlab_producer.sinks.base import DeliveryError

log = get_logger(__name__)
DEVELOPER, MAINTAINER = 30, 40
PREFIX = "/artifacts/"
READ_BYTES = 256 * 1024
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class Refusal(Exception):
    """An upload or listing refused before anything was stored."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Target:
    """What a request names: the project as given, the commit and the artifact path."""

    project: str
    commit: str
    path: str


def parse_target(raw_path: str, listing: bool) -> Target:
    """``/artifacts/<project>/<commit>/<path>`` from the raw (still encoded) request path."""
    segments = raw_path.split("?", 1)[0].removeprefix(PREFIX).split("/")
    if listing:
        if len(segments) == 3 and segments[2] == "":
            segments.pop()
        if len(segments) != 2:
            raise Refusal(400, "bad_path", "expected /artifacts/<project>/<commit>/")
    elif len(segments) < 3:
        raise Refusal(400, "bad_path", "expected /artifacts/<project>/<commit>/<path>")
    project, commit = unquote(segments[0]), unquote(segments[1])
    try:
        commit = commit_sha(commit)
        path = "" if listing else relative_path("/".join(unquote(s) for s in segments[2:]))
    except UnsafePathError as exc:
        raise Refusal(400, "bad_path", str(exc)) from None
    if not project:
        raise Refusal(400, "bad_path", "the project is missing")
    if path and is_temporary(path):
        raise Refusal(400, "bad_path", f"names like '.*{TEMP_SUFFIX}' are the store's "
                                       "temporary files")
    return Target(project, commit, path)


def expected_sha256(headers: Any) -> str | None:
    """The SHA-256 the client announced, as hex; None when it announced none."""
    hex_value = headers.get("X-Checksum-Sha256")
    if hex_value is not None:
        if not _HEX_SHA256.fullmatch(hex_value.strip()):
            raise Refusal(400, "bad_digest", "X-Checksum-Sha256 must be 64 hex characters")
        return str(hex_value.strip().lower())
    for name in ("Content-Digest", "Digest"):
        value = headers.get(name)
        if value is None:
            continue
        for item in value.split(","):
            algorithm, _, encoded = item.strip().partition("=")
            if algorithm.strip().lower() != "sha-256":
                continue
            try:
                raw = base64.b64decode(encoded.strip().strip(":"), validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if len(raw) != 32:
                raise Refusal(400, "bad_digest", f"{name}: sha-256 must be 32 bytes in base64")
            return raw.hex()
        raise Refusal(400, "bad_digest", f"{name}: only sha-256 is checked; send sha-256=...")
    return None


class ArtifactUploads:
    """The hand-back API: checks against GitLab, then a streamed write into the store."""

    def __init__(self, capturer: Capturer, token: str, max_bytes: int, idle_timeout_s: float,
                 metrics: Metrics) -> None:
        self.capturer = capturer
        self.token = token.encode()
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.metrics = metrics
        # Uploads to one path take turns; an entry lives while an upload holds it.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary())

    def _lock_for(self, target: str) -> asyncio.Lock:
        lock = self._locks.get(target)
        if lock is None:
            lock = self._locks[target] = asyncio.Lock()
        return lock

    def register(self, app: web.Application) -> None:
        """Add the routes; the body is read by the handler only once everything is checked."""
        app.router.add_route("PUT", "/artifacts/{tail:.+}", self.upload,
                             expect_handler=_expect_later)
        app.router.add_get("/artifacts/{tail:.+}", self.list_commit)

    # -- answers ------------------------------------------------------------------------------
    def _refused(self, kind: str, refusal: Refusal) -> web.Response:
        self.metrics.artifact_requests.labels(kind, str(refusal.status)).inc()
        log.info("artifact_refused", kind=kind, status=refusal.status, reason=refusal.reason)
        return web.json_response({"error": refusal.code, "reason": refusal.reason},
                                 status=refusal.status)

    def _authorised(self, request: web.Request) -> None:
        scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(),
                                                                 self.token):
            raise Refusal(401, "unauthorized", "a valid 'Authorization: Bearer' token is needed")

    # -- GitLab checks ------------------------------------------------------------------------
    async def _project(self, project: str) -> dict[str, Any]:
        try:
            answer = await self.capturer.client.get(f"projects/{quote(project, safe='')}",
                                                    endpoint="projects/:id")
        except NotFoundError:
            raise Refusal(404, "not_found", f"project {project} not found (or the service "
                                            "account cannot see it)") from None
        body: dict[str, Any] = answer.body
        return body

    async def _commit(self, project: dict[str, Any], sha: str) -> None:
        pid = int(project["id"])
        try:
            answer = await self.capturer.client.get(
                f"projects/{pid}/repository/commits/{sha}", endpoint="projects/:id/commit")
        except NotFoundError:
            raise Refusal(404, "not_found", f"commit {sha} not found in project {pid}") from None
        except ForbiddenError:  # a 401 (the service's own token is wrong) stays a 502
            raise Refusal(404, "not_found", f"the service account cannot read the repository "
                                            f"of project {pid} (it needs Reporter)") from None
        if str(answer.body.get("id", "")).lower() != sha:
            raise Refusal(404, "not_found", f"commit {sha} not found in project {pid}")
        rule = await self.capturer.rule_for(pid)
        if rule is None:
            return
        branch = rule.branch or project.get("default_branch") or "main"
        async for page in self.capturer.client.pages(
                f"projects/{pid}/repository/commits/{sha}/refs", {"type": "branch",
                                                                  "per_page": 100},
                "projects/:id/commit/refs"):
            if any(ref.get("name") == branch for ref in page):
                return
        raise Refusal(404, "not_found", f"commit {sha} is not on branch {branch} of project "
                                        f"{pid} (CAPTURE_RULES)")

    async def _member(self, pid: int, user: str | None, needed: int, what: str) -> None:
        if user is None:
            return
        level = await self.capturer.access_level(pid, user)
        if level < needed:
            raise Refusal(403, "forbidden", f"{user} may not {what} in project {pid} "
                                            f"(access level {level}, needs {needed})")

    async def _checked(self, request: web.Request, target: Target, needed: int
                       ) -> tuple[dict[str, Any], str | None]:
        """GitLab's side: the project, the commit (uploads) and the user's access level."""
        user = request.headers.get("X-Gitlab-User") or request.query.get("as_user") or None
        project = await self._project(target.project)
        pid = int(project["id"])
        if target.path:
            await self._commit(project, target.commit)
        await self._member(pid, user, needed, "upload artifacts" if target.path
                           else "read artifacts")
        return project, user

    # -- PUT ----------------------------------------------------------------------------------
    async def upload(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._put(request)
        except Refusal as refusal:
            return self._refused("upload", refusal)
        except UnsafePathError as exc:  # the resolved path left the store's root
            return self._refused("upload", Refusal(400, "bad_path", str(exc)))
        except WriteRefused as exc:
            return self._refused("upload", Refusal(exc.status, exc.code, str(exc)))
        except GitLabError as exc:
            return self._refused("upload", Refusal(502, "gitlab_unavailable", str(exc)))

    async def _put(self, request: web.Request) -> web.Response:
        self._authorised(request)
        target = parse_target(request.raw_path, listing=False)
        declared = request.content_length
        if declared is not None and declared > self.max_bytes:
            raise Refusal(413, "too_large", f"the file is larger than {self.max_bytes} bytes")
        digest = expected_sha256(request.headers)
        overwrite = request.query.get("overwrite", "").lower() in ("1", "true", "yes")
        if overwrite and not (request.headers.get("X-Gitlab-User")
                              or request.query.get("as_user")):
            raise Refusal(403, "forbidden", "overwrite=true needs X-Gitlab-User naming a "
                                            "Maintainer of the project")
        project, user = await self._checked(request, target,
                                            MAINTAINER if overwrite else DEVELOPER)
        pid = int(project["id"])
        if not overwrite:
            await refuse_early(self.capturer.store, pid, target.commit, target.path, declared)
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            stored = await store_upload(
                self.capturer.store, pid, target.commit, target.path,
                _chunks(request, self.idle_timeout_s), self.max_bytes, digest, overwrite,
                self._lock_for(self.capturer.store.target(pid, target.commit, target.path)))
        except (ClientPayloadError, ConnectionError) as exc:
            log.warning("artifact_upload_interrupted", project=pid, commit=target.commit,
                        path=target.path, error=str(exc))
            raise Refusal(400, "interrupted", "the body ended before it was complete") from None
        except asyncio.CancelledError:
            log.warning("artifact_upload_cancelled", project=pid, commit=target.commit,
                        path=target.path, detail="the service is stopping")
            raise
        except TimeoutError:
            log.warning("artifact_upload_stalled", project=pid, commit=target.commit,
                        path=target.path, idle_s=self.idle_timeout_s)
            raise Refusal(408, "stalled", f"no data for {self.idle_timeout_s:g} s") from None
        if not stored.skipped:
            await self._announce(stored)
        status = 200 if stored.skipped else 201
        self.metrics.artifact_requests.labels("upload", str(status)).inc()
        if not stored.skipped:
            self.metrics.artifact_bytes.inc(stored.size)
        log.info("artifact_stored", project=pid, commit=target.commit, path=target.path,
                 size=stored.size, user=user, unchanged=stored.skipped)
        return web.json_response(_record(stored), status=status)

    async def _announce(self, stored: Stored) -> None:
        """On the artifact topic; when the broker does not take it, the file goes too, so a
        retry of the upload stores and announces it again (stored means announced)."""
        try:
            await self.capturer.announce([stored])
        except DeliveryError as exc:
            await remove(self.capturer.store, stored.project_id, stored.commit, stored.path)
            raise Refusal(503, "not_announced", f"stored but not announced ({exc}); the file "
                                                "was removed again, retry the upload") from None

    # -- GET ----------------------------------------------------------------------------------
    async def list_commit(self, request: web.Request) -> web.Response:
        try:
            self._authorised(request)
            target = parse_target(request.raw_path, listing=True)
            project, _ = await self._checked(request, target, REPORTER)
        except Refusal as refusal:
            return self._refused("list", refusal)
        except GitLabError as exc:
            return self._refused("list", Refusal(502, "gitlab_unavailable", str(exc)))
        pid = int(project["id"])
        found = await listing(self.capturer.store, pid, target.commit)
        self.metrics.artifact_requests.labels("list", "200").inc()
        return web.json_response({"project_id": pid, "commit": target.commit,
                                  "artifacts": found})


def _record(stored: Stored) -> dict[str, Any]:
    return {"project_id": stored.project_id, "commit": stored.commit, "path": stored.path,
            "size": stored.size, "sha256": stored.sha256, "url": stored.url}


async def _chunks(request: web.Request, idle_timeout_s: float) -> AsyncIterator[bytes]:
    """The body as it arrives; TimeoutError when nothing came for ``idle_timeout_s``."""
    while True:
        async with asyncio.timeout(idle_timeout_s):
            chunk = await request.content.read(READ_BYTES)
        if not chunk:
            return
        yield chunk


async def _expect_later(request: web.Request) -> None:
    """``Expect: 100-continue`` is answered by the handler once the checks passed, so a
    refused client never sends its (large) body."""
