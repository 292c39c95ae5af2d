"""The artifact store: files under ``<ARTIFACT_STORE_URL>/<project_id>/<commit_sha>/<path>``
through fsspec (``file://``, ``s3://``, ``memory://``, ...).

- Every key is checked (:mod:`gitlab_producer.artifact_paths`) and then resolved: the final
  path must lie under the store's root, symbolic links included on the local file system.
- Writes stream in chunks (:meth:`ArtifactStore.open_writer`) and are atomic: on the local
  file system a temporary name next to the target, then a rename; elsewhere an uncommitted
  object, published whole by ``commit()`` or dropped by ``discard()``. An aborted write
  leaves nothing behind.
- What is already stored is kept (content at a commit never changes): :meth:`find`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from gitlab_producer.artifact_paths import UnsafePathError, object_key
from gitlab_producer.redaction import mask_userinfo

READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Stored:
    """One file in the artifact store."""

    project_id: int
    commit: str
    path: str
    size: int
    sha256: str
    url: str
    skipped: bool


class ArtifactStore:
    """Checked, atomic, idempotent writes under a base URL."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.base_url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = self._resolve(root.rstrip("/") or "/").rstrip("/")

    def _resolve(self, path: str) -> str:
        if self.local:
            return os.path.realpath(path)
        return posixpath.normpath(str(self.fs._strip_protocol(path)))

    def target(self, project_id: int, commit: str, path: str) -> str:
        """The backend path of ``<project_id>/<commit>/<path>``; raises
        :class:`UnsafePathError` for a bad part or a result outside the root."""
        resolved = self._resolve(f"{self.root}/{object_key(project_id, commit, path)}")
        if not resolved.startswith(self.root + "/"):
            raise UnsafePathError("path resolves outside the artifact store")
        return resolved

    def url_of(self, project_id: int, commit: str, path: str) -> str:
        """The file's URL as announced (credentials in the base URL masked)."""
        return mask_userinfo(f"{self.base_url}/{object_key(project_id, commit, path)}")

    async def find(self, project_id: int, commit: str, path: str) -> Stored | None:
        """The stored file (``skipped``: nothing new written), or None when absent."""
        target = self.target(project_id, commit, path)
        found = await asyncio.to_thread(self._digest, target)
        if found is None:
            return None
        size, digest = found
        return Stored(project_id, commit, path, size, digest,
                      self.url_of(project_id, commit, path), True)

    def _digest(self, target: str) -> tuple[int, str] | None:
        if not self.fs.exists(target):
            return None
        sha, size = hashlib.sha256(), 0
        with self.fs.open(target, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                sha.update(chunk)
                size += len(chunk)
        return size, sha.hexdigest()

    async def open_writer(self, project_id: int, commit: str, path: str) -> StoreWriter:
        """A writer for one file; nothing is visible until :meth:`StoreWriter.commit`."""
        target = self.target(project_id, commit, path)
        writer = StoreWriter(self, project_id, commit, path, target)
        await asyncio.to_thread(writer.open)
        return writer

    async def put(self, project_id: int, commit: str, path: str, data: bytes) -> Stored:
        """Store ``data`` unless the file is there already."""
        found = await self.find(project_id, commit, path)
        if found is not None:
            return found
        writer = await self.open_writer(project_id, commit, path)
        try:
            await writer.write(data)
        except BaseException:
            await writer.abort()
            raise
        return await writer.commit()


class StoreWriter:
    """One file being written in chunks: :meth:`write`, then :meth:`commit` or
    :meth:`abort`. Counts the size and the SHA-256 on the way."""

    def __init__(self, store: ArtifactStore, project_id: int, commit: str, path: str,
                 target: str) -> None:
        self.store = store
        self.project_id, self.commit_sha, self.path = project_id, commit, path
        self.target = target
        self.size = 0
        self._sha = hashlib.sha256()
        self._file: Any = None
        self._temp: str | None = None
        self._transaction = False
        self._published_early = False

    def open(self) -> None:
        fs = self.store.fs
        parent = self.target.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        if self.store.local:
            self._temp = f"{parent}/.{uuid.uuid4().hex}.partial"
            self._file = fs.open(self._temp, "wb")
            return
        existed = fs.exists(self.target)  # an overwrite: abort() must leave it alone
        try:  # object stores: published by commit(), never half
            self._file = fs.open(self.target, "wb", autocommit=False)
            self._transaction = True
        except (NotImplementedError, TypeError, ValueError):
            self._file = fs.open(self.target, "wb")
        # Some backends (memory://) publish at once, whatever autocommit says.
        self._published_early = not self._transaction or (
            not existed and fs.exists(self.target))

    @property
    def sha256(self) -> str:
        """The SHA-256 of what was written so far."""
        return self._sha.hexdigest()

    async def write(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        self.size += len(chunk)
        await asyncio.to_thread(self._file.write, chunk)

    async def commit(self) -> Stored:
        await asyncio.to_thread(self._commit)
        s = self.store
        return Stored(self.project_id, self.commit_sha, self.path, self.size,
                      self._sha.hexdigest(), s.url_of(self.project_id, self.commit_sha,
                                                      self.path), False)

    def _commit(self) -> None:
        self._file.close()
        if self._temp is not None:
            self.store.fs.mv(self._temp, self.target)
        elif self._transaction:
            self._file.commit()

    async def abort(self) -> None:
        """Drop what was written (best effort: the store may be what failed)."""
        await asyncio.to_thread(self._abort)

    def _abort(self) -> None:
        fs = self.store.fs
        with contextlib.suppress(Exception):
            if self._temp is not None:
                self._file.close()
                fs.rm(self._temp)
            else:
                self._file.discard()
        with contextlib.suppress(Exception):
            if self._temp is None and self._published_early and fs.exists(self.target):
                fs.rm(self.target)  # what the backend made visible before commit()
