"""Uploads into the store: whole or nothing, identical repeats untouched, no leftovers."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gitlab_producer.artifact_store import ArtifactStore, Stored
from gitlab_producer.artifact_writes import (
    BATCH_BYTES,
    Conflict,
    DigestMismatch,
    TooLarge,
    is_temporary,
    listing,
    store_upload,
)

DATA = bytes(range(256)) * (BATCH_BYTES // 256 * 3 + 7)  # a few batches and a tail
SHA = "c" * 40
PID = 3


async def chunks(data: bytes, size: int = 65_536, fail_at: int | None = None,
                 seen: list[int] | None = None) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        if fail_at is not None and start >= fail_at:
            raise ConnectionResetError("client went away")
        if seen is not None:
            seen.append(start)
        await asyncio.sleep(0)
        yield data[start:start + size]


def upload(store: ArtifactStore, source: AsyncIterator[bytes], path: str = "dist/app.jar", *,
           max_bytes: int = 1 << 30, sha: str | None = None, overwrite: bool = False
           ) -> Stored:
    return asyncio.run(store_upload(store, PID, SHA, path, source, max_bytes, sha, overwrite,
                                    asyncio.Lock()))


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and is_temporary(str(p))]


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(f"file://{tmp_path}")


def test_a_stream_is_stored_byte_exact_and_listed(store: ArtifactStore, tmp_path: Path
                                                  ) -> None:
    stored = upload(store, chunks(DATA, 10_000))
    target = tmp_path / str(PID) / SHA / "dist" / "app.jar"
    assert target.read_bytes() == DATA
    assert (stored.size, stored.sha256, stored.skipped) == (
        len(DATA), hashlib.sha256(DATA).hexdigest(), False)
    assert not leftovers(tmp_path)
    assert asyncio.run(listing(store, PID, SHA)) == [
        {"path": "dist/app.jar", "size": len(DATA), "url": stored.url}]


def test_an_identical_repeat_rewrites_nothing_and_a_different_file_conflicts(
        store: ArtifactStore, tmp_path: Path) -> None:
    upload(store, chunks(DATA))
    target = tmp_path / str(PID) / SHA / "dist" / "app.jar"
    before = target.stat()
    assert upload(store, chunks(DATA, 4096)).skipped is True
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    different = DATA[:-1] + b"\x00"
    with pytest.raises(Conflict):
        upload(store, chunks(different))
    with pytest.raises(DigestMismatch):  # the digest is checked on a repeat too
        upload(store, chunks(DATA), sha="0" * 64)
    assert target.read_bytes() == DATA
    replaced = upload(store, chunks(different), overwrite=True)
    assert replaced.skipped is False and target.read_bytes() == different
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("refusal", ["too large", "digest", "interrupted", "cancelled"])
def test_a_refused_or_cut_upload_leaves_nothing(store: ArtifactStore, tmp_path: Path,
                                                refusal: str) -> None:
    seen: list[int] = []
    fail_at = len(DATA) // 2 if refusal == "interrupted" else None
    source = chunks(DATA, fail_at=fail_at, seen=seen)

    async def cancelled() -> None:
        task = asyncio.create_task(store_upload(store, PID, SHA, "app.jar", source, 1 << 30,
                                                None, False, asyncio.Lock()))
        while len(seen) < 40:  # two batches in
            await asyncio.sleep(0)
        assert leftovers(tmp_path)  # the temporary file exists by now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    if refusal == "cancelled":
        asyncio.run(cancelled())
    else:
        expected = {"too large": TooLarge, "digest": DigestMismatch,
                    "interrupted": ConnectionResetError}[refusal]
        with pytest.raises(expected):
            upload(store, source, "app.jar",
                   max_bytes=len(DATA) // 3 if refusal == "too large" else 1 << 30,
                   sha="0" * 64 if refusal == "digest" else None)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    if refusal == "too large":
        assert len(seen) * 65_536 < len(DATA) // 3 + 2 * 65_536  # stopped at the limit


def test_the_matching_digest_is_accepted(store: ArtifactStore) -> None:
    assert upload(store, chunks(DATA), sha=hashlib.sha256(DATA).hexdigest()).skipped is False


def test_other_backends_keep_what_is_there_and_leave_nothing() -> None:
    store = ArtifactStore(f"memory://bucket-{uuid.uuid4().hex}")
    first = upload(store, chunks(DATA))
    target = store.target(PID, SHA, "dist/app.jar")
    with pytest.raises(Conflict):  # hashed, never written over the stored file
        upload(store, chunks(DATA[::-1]))
    assert store.fs.cat_file(target) == DATA
    assert upload(store, chunks(DATA)).sha256 == first.sha256
    with pytest.raises(TooLarge):
        upload(store, chunks(DATA), "other.jar", max_bytes=1000)
    names = store.fs.find(store.root)
    assert [n for n in names if n.endswith("other.jar") or is_temporary(n)] == []
