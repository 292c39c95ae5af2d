"""Repository files, project members and job artifacts of the simulated projects."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import zipfile
from dataclasses import dataclass
from typing import Any

from gitlab_producer.simulator.catalog import sha_for

# Awkward on purpose: spaces, '+', '%', non-ASCII and nested folders.
FILE_PATHS: tuple[str, ...] = (
    "README.md",
    "lib/class.rb",
    "docs/user guide.md",
    "src/a+b.py",
    "data/100%.txt",
    "docs/résumé.md",
    "deep/nested/folder/file.txt",
    "build/app.jar",
)
BRANCHES: tuple[str, ...] = ("main", "feature/login-page")
JOB_NAMES: tuple[str, ...] = ("build", "test")
ARTIFACT_PATHS: tuple[str, ...] = ("dist/app.jar", "reports/junit.xml")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")

GUEST, REPORTER, DEVELOPER, MAINTAINER, OWNER = 10, 20, 30, 40, 50


@dataclass(frozen=True)
class Blob:
    """A file at a commit."""

    path: str
    ref: str
    commit_id: str
    content: bytes

    @property
    def blob_id(self) -> str:
        return hashlib.sha1(b"blob " + self.content, usedforsecurity=False).hexdigest()

    def json(self) -> dict[str, Any]:
        return {
            "file_name": self.path.rsplit("/", 1)[-1],
            "file_path": self.path,
            "size": len(self.content),
            "encoding": "base64",
            "content_sha256": hashlib.sha256(self.content).hexdigest(),
            "ref": self.ref,
            "blob_id": self.blob_id,
            "commit_id": self.commit_id,
            "last_commit_id": self.commit_id,
            "execute_filemode": False,
            "content": base64.b64encode(self.content).decode(),
        }

    def headers(self) -> dict[str, str]:
        meta = self.json()
        meta.pop("content")
        return {f"X-Gitlab-{k.replace('_', '-').title()}": str(v).lower()
                if isinstance(v, bool) else str(v) for k, v in meta.items()}


def resolve_ref(project_id: int, ref: str) -> str | None:
    """The commit a ref names: a branch, or a 40-hex commit id (any is taken to exist)."""
    if ref in BRANCHES:
        return sha_for("branch", project_id, ref)
    return ref if SHA_RE.match(ref) else None


# Each branch has a short linear history ending at its head (``resolve_ref``); other
# branches fork from the default branch after its first FORK_AT commits.
COMMITS_PER_BRANCH = 20
FORK_AT = 10


def branch_commits(project_id: int, branch: str) -> list[str]:
    """The commit ids of ``branch``, oldest first (the last is the branch head)."""
    own = [sha_for("commit", project_id, branch, n) for n in range(COMMITS_PER_BRANCH - 1)]
    own.append(sha_for("branch", project_id, branch))
    if branch == BRANCHES[0]:
        return own
    return branch_commits(project_id, BRANCHES[0])[:FORK_AT] + own[FORK_AT:]


def file_content(project_id: int, path: str, commit_id: str) -> bytes:
    text = f"{path} of project {project_id} at {commit_id}\nünïcødé ✓\n"
    if path.endswith(".jar"):
        return text.encode() + bytes(range(256)) * 4
    return text.encode()


def get_blob(project_id: int, path: str, ref: str) -> Blob | None:
    commit = resolve_ref(project_id, ref)
    if commit is None or path not in FILE_PATHS:
        return None
    return Blob(path, ref, commit, file_content(project_id, path, commit))


def members(project_id: int, user_count: int) -> list[tuple[int, int]]:
    """(user id, access level) of the project's members, including inherited ones.

    User 1 is the service account: a Reporter everywhere except in every tenth project.
    """
    found: dict[int, int] = {}
    if project_id % 10:
        found[1] = REPORTER
    for offset, level in ((0, OWNER), (1, MAINTAINER), (2, DEVELOPER), (3, REPORTER), (4, GUEST)):
        user = (project_id * 7 + offset * 13) % max(user_count, 1) + 1
        if user != 1:
            found.setdefault(user, level)
    return sorted(found.items())


def job_id_for(project_id: int, ref: str, job: str) -> int:
    return int(sha_for("job", project_id, ref, job)[:7], 16)


def artifact_files(project_id: int, job_id: int) -> dict[str, bytes]:
    return {path: f"{path} of job {job_id} in project {project_id}\n".encode() * 3
            for path in ARTIFACT_PATHS}


def artifacts_zip(project_id: int, job_id: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in artifact_files(project_id, job_id).items():
            archive.writestr(path, data)
    return buffer.getvalue()
