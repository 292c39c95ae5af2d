"""Uploads of unknown size into the artifact store (the hand-back API), whole or not at all.

:func:`store_upload` takes a stream of chunks and writes it through the store's atomic,
hashing writer (:meth:`~gitlab_producer.artifact_store.ArtifactStore.open_writer`), one
batch at a time while the next batch is being received, so memory stays at about two batches
whatever the size. On top of the writer it adds what a client-supplied file needs:

- a size limit counted as the bytes arrive (the declared length may be absent or wrong);
- the digest the client announced, compared before anything is published;
- artifacts of a commit are immutable: when a file is already at the path, the body is only
  hashed, never written, and an identical one answers "already there" while a different one
  is a :class:`Conflict`, unless ``overwrite``.

Uploads to the same path in one process take turns (the caller's ``lock``), so none of them
can slip between another's comparison and its publication. Nothing is left behind on a refusal,
an error or a cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any

from gitlab_producer.artifact_paths import commit_sha, project_segment
from gitlab_producer.artifact_store import ArtifactStore, Stored

BATCH_BYTES = 1024 * 1024  # handed to the writer at once
TEMP_SUFFIX = ".partial"  # the store writer's temporary names: ``.<hex>.partial``


class WriteRefused(Exception):
    """The file was not stored; ``status`` is the HTTP answer that explains why."""

    status = 400
    code = "refused"


class TooLarge(WriteRefused):
    status, code = 413, "too_large"


class DigestMismatch(WriteRefused):
    status, code = 422, "digest_mismatch"


class Conflict(WriteRefused):
    status, code = 409, "conflict"


def is_temporary(path: str) -> bool:
    """A name the store writes to before publishing (never listed as an artifact)."""
    name = path.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


async def store_upload(store: ArtifactStore, project_id: int, commit: str, path: str,
                       chunks: AsyncIterable[bytes], max_bytes: int,
                       expected_sha256: str | None, overwrite: bool,
                       lock: asyncio.Lock) -> Stored:
    """Store ``chunks`` at ``<project_id>/<commit>/<path>`` unless refused
    (:class:`WriteRefused`); ``skipped`` in the answer: the identical file was there."""
    store.target(project_id, commit, path)  # an unsafe path is refused before any wait
    async with lock:
        existing = None if overwrite else await store.find(project_id, commit, path)
        if existing is not None:
            digest = hashlib.sha256()
            size = await _drain(chunks, max_bytes, _in_thread(digest.update))
            _check_digest(digest.hexdigest(), expected_sha256)
            if (size, digest.hexdigest()) == (existing.size, existing.sha256):
                return existing
            raise Conflict("a different file is stored at this path (artifacts of a commit "
                           "are immutable)")
        writer = await store.open_writer(project_id, commit, path)
        try:
            await _drain(chunks, max_bytes, writer.write)
            _check_digest(writer.sha256, expected_sha256)
            return await writer.commit()
        except BaseException:
            # Shielded: a cancelled upload must still remove its temporary file.
            await asyncio.shield(writer.abort())
            raise


async def _drain(chunks: AsyncIterable[bytes], max_bytes: int,
                 consume: Callable[[bytes], Awaitable[None]]) -> int:
    """Feed ``chunks`` to ``consume`` in batches, one batch in flight while the next is
    received; the byte count. Raises :class:`TooLarge` past ``max_bytes``."""
    received = buffered = 0
    parts: list[bytes] = []
    pending: asyncio.Future[None] | None = None
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > max_bytes:
                raise TooLarge(f"the file is larger than {max_bytes} bytes")
            parts.append(chunk)
            buffered += len(chunk)
            if buffered >= BATCH_BYTES:
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(consume(b"".join(parts)))
                parts, buffered = [], 0
        if pending is not None:
            await pending
        pending = None
        if parts:
            await consume(b"".join(parts))
        return received
    finally:
        if pending is not None:  # done with the file before anyone removes it
            with contextlib.suppress(BaseException):
                await asyncio.shield(pending)


def _in_thread(work: Callable[[bytes], Any]) -> Callable[[bytes], Awaitable[None]]:
    async def run(data: bytes) -> None:
        await asyncio.to_thread(work, data)

    return run


def _check_digest(actual: str, expected: str | None) -> None:
    if expected is not None and expected != actual:
        raise DigestMismatch(f"the body's sha-256 is {actual}, the request announced {expected}")


async def refuse_early(store: ArtifactStore, project_id: int, commit: str, path: str,
                       declared: int | None) -> None:
    """Before the body is read: :class:`Conflict` when a file of another size is already
    at the path (the body could only be refused after it arrived)."""
    if declared is None:
        return
    target = store.target(project_id, commit, path)
    try:
        info = await asyncio.to_thread(store.fs.info, target)
    except FileNotFoundError:
        return
    if info.get("type") == "file" and int(info["size"]) != declared:
        raise Conflict(f"a different file ({info['size']} bytes) is stored at this path "
                       "(artifacts of a commit are immutable)")


async def remove(store: ArtifactStore, project_id: int, commit: str, path: str) -> None:
    """Delete one stored file (an upload whose announcement failed)."""
    await asyncio.to_thread(store.fs.rm_file, store.target(project_id, commit, path))


async def listing(store: ArtifactStore, project_id: int, commit: str) -> list[dict[str, Any]]:
    """What is stored for a commit: ``path``, ``size`` and ``url`` of each file."""
    base = f"{store.root}/{project_segment(project_id)}/{commit_sha(commit)}"
    found: dict[str, dict[str, Any]] = await asyncio.to_thread(store.fs.find, base,
                                                               detail=True)
    out = []
    for name, info in sorted(found.items()):
        relative = name[len(base) + 1:]
        if info.get("type") == "file" and relative and not is_temporary(relative):
            out.append({"path": relative, "size": int(info["size"]),
                        "url": store.url_of(project_id, commit, relative)})
    return out
