"""Streamed, atomic writes into the artifact store: files of any size, whole or not at all.

A :class:`PendingFile` takes a file chunk by chunk, hashing it as it goes, into
``.<random>.partial`` beside the target (never listed as an artifact), and then either
publishes it in one step or removes it:

- local file system: ``os.replace``, atomic within a directory;
- other fsspec backends: the backend's ``mv`` (a rename on HDFS; a server-side copy on object
  stores, whose objects appear whole). ``autocommit=False`` is not relied on: several
  backends (the memory one among them) publish at once regardless.

:func:`write_stream` drives one from an async iterator of chunks: writes and hashing run in a
worker thread, one batch at a time, while the next batch is being received, so memory stays
at about two batches whatever the file's size. The existing file at the target is compared by
its SHA-256, read in chunks too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

BATCH_BYTES = 1024 * 1024  # handed to the writer thread at once
READ_BYTES = 1024 * 1024  # when hashing a stored file
TEMP_SUFFIX = ".partial"


class WriteRefused(Exception):
    """The file was not stored; ``status`` is the HTTP answer that explains why."""

    status = 400
    code = "refused"


class TooLarge(WriteRefused):
    status = 413
    code = "too_large"


class DigestMismatch(WriteRefused):
    status = 422
    code = "digest_mismatch"


class Conflict(WriteRefused):
    status = 409
    code = "conflict"


@dataclass(frozen=True)
class Written:
    """The outcome of a write: ``created`` is False when an identical file was there."""

    size: int
    sha256: str
    created: bool


def is_temporary(path: str) -> bool:
    """A name :class:`PendingFile` writes to (never listed as an artifact)."""
    name = path.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


class PendingFile:
    """A file being written to ``target``; blocking methods, meant for a worker thread."""

    def __init__(self, fs: AbstractFileSystem, target: str) -> None:
        self.fs = fs
        self.target = target
        self.local = isinstance(fs, LocalFileSystem)
        self.parent = target.rsplit("/", 1)[0]
        self.temp = f"{self.parent}/.{uuid.uuid4().hex}{TEMP_SUFFIX}"
        self.size = 0
        self._hash = hashlib.sha256()
        self._file: Any = None

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def open(self) -> None:
        try:
            self.fs.makedirs(self.parent, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise Conflict("a file of the commit is stored where this path needs a "
                           "directory") from exc
        if self.local:
            self._file = open(self.temp, "wb")  # noqa: SIM115 -- closed by commit or discard
        else:
            self._file = self.fs.open(self.temp, "wb")

    def write(self, data: bytes | bytearray) -> None:
        self._hash.update(data)
        self._file.write(data)
        self.size += len(data)

    def commit(self) -> None:
        """Publish the file at ``target`` (replacing what is there)."""
        self._file.close()
        if self.local:
            try:
                os.replace(self.temp, self.target)
            except IsADirectoryError as exc:
                os.remove(self.temp)
                raise Conflict("a directory of the commit is stored at this path") from exc
        else:
            self.fs.mv(self.temp, self.target)
        self._file = None

    def discard(self) -> None:
        """Leave nothing behind; safe to call after a failure at any point."""
        if self._file is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._file.close()
        with contextlib.suppress(OSError):
            if self.local:
                os.remove(self.temp)
            else:
                self.fs.rm_file(self.temp)
        self._file = None


def sha256_of(fs: AbstractFileSystem, path: str) -> str:
    """The SHA-256 of a stored file, read in chunks."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as stored:
        while block := stored.read(READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def stored_size(fs: AbstractFileSystem, path: str) -> int | None:
    """The size of the file at ``path``; None when there is none."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return int(info["size"]) if info.get("type") == "file" else None


async def write_stream(fs: AbstractFileSystem, target: str, chunks: AsyncIterable[bytes],
                       max_bytes: int, expected_sha256: str | None, overwrite: bool,
                       lock: asyncio.Lock) -> Written:
    """Store ``chunks`` at ``target`` unless refused (:class:`WriteRefused`); an identical
    file already there is left as it is. ``lock`` serialises the final compare-and-publish
    of writers to the same target. Nothing stays behind on any error or cancellation."""
    pending = PendingFile(fs, target)
    await asyncio.to_thread(pending.open)
    writing: asyncio.Future[None] | None = None
    try:
        batch = bytearray()
        received = 0
        async for chunk in chunks:
            received += len(chunk)
            if received > max_bytes:
                raise TooLarge(f"the file is larger than {max_bytes} bytes")
            batch += chunk
            if len(batch) >= BATCH_BYTES:
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(asyncio.to_thread(pending.write, batch))
                batch = bytearray()
        if writing is not None:
            await writing
        writing = None
        if batch:
            await asyncio.to_thread(pending.write, batch)
        if expected_sha256 is not None and expected_sha256 != pending.sha256:
            raise DigestMismatch(f"the body's sha-256 is {pending.sha256}, the request "
                                 f"announced {expected_sha256}")
        async with lock:
            return await asyncio.to_thread(_publish, pending, overwrite)
    finally:
        # Shielded: a cancelled upload must still remove its temporary file.
        await asyncio.shield(_settle(pending, writing))


def _publish(pending: PendingFile, overwrite: bool) -> Written:
    size = stored_size(pending.fs, pending.target)
    if size is not None:
        same = size == pending.size and sha256_of(pending.fs, pending.target) == pending.sha256
        if same:
            pending.discard()
            return Written(pending.size, pending.sha256, created=False)
        if not overwrite:
            pending.discard()
            raise Conflict("a different file is stored at this path (artifacts of a commit "
                           "are immutable)")
    pending.commit()
    return Written(pending.size, pending.sha256, created=True)


async def _settle(pending: PendingFile, writing: asyncio.Future[None] | None) -> None:
    if writing is not None:
        with contextlib.suppress(Exception):
            await writing  # the thread must be done with the file before it is removed
    await asyncio.to_thread(pending.discard)
