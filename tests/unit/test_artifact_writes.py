"""Streamed atomic writes: whole or nothing, identical repeats untouched, no leftovers."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import fsspec
import pytest
from fsspec import AbstractFileSystem

from gitlab_producer.artifact_writes import (
    BATCH_BYTES,
    Conflict,
    DigestMismatch,
    TooLarge,
    is_temporary,
    write_stream,
)

DATA = bytes(range(256)) * (BATCH_BYTES // 256 * 3 + 7)  # a few batches and a tail


async def chunks(data: bytes, size: int = 65_536, fail_at: int | None = None,
                 seen: list[int] | None = None) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        if fail_at is not None and start >= fail_at:
            raise ConnectionResetError("client went away")
        if seen is not None:
            seen.append(start)
        await asyncio.sleep(0)
        yield data[start:start + size]


def write(fs: AbstractFileSystem, target: str, source: AsyncIterator[bytes], *,
          max_bytes: int = 1 << 30, sha: str | None = None, overwrite: bool = False) -> bool:
    written = asyncio.run(write_stream(fs, target, source, max_bytes, sha, overwrite,
                                       asyncio.Lock()))
    assert written.sha256 == hashlib.sha256(Path(target).read_bytes()
                                            if isinstance(fs, fsspec.implementations.local
                                                          .LocalFileSystem)
                                            else fs.cat_file(target)).hexdigest()
    return written.created


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and is_temporary(str(p))]


@pytest.fixture
def local(tmp_path: Path) -> tuple[AbstractFileSystem, Path]:
    return fsspec.filesystem("file"), tmp_path


def test_a_stream_is_stored_byte_exact(local: tuple[AbstractFileSystem, Path]) -> None:
    fs, root = local
    target = root / "3" / ("a" * 40) / "dist" / "app.jar"
    assert write(fs, str(target), chunks(DATA, 10_000)) is True
    assert target.read_bytes() == DATA
    assert not leftovers(root)


def test_an_identical_repeat_rewrites_nothing_and_a_different_file_conflicts(
        local: tuple[AbstractFileSystem, Path]) -> None:
    fs, root = local
    target = root / "app.jar"
    write(fs, str(target), chunks(DATA))
    before = target.stat()
    assert write(fs, str(target), chunks(DATA, 4096)) is False
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    different = DATA[:-1] + b"\x00"
    with pytest.raises(Conflict):
        write(fs, str(target), chunks(different))
    assert target.read_bytes() == DATA
    assert write(fs, str(target), chunks(different), overwrite=True) is True
    assert target.read_bytes() == different
    assert not leftovers(root)


@pytest.mark.parametrize("refusal", ["too large", "digest", "interrupted", "cancelled"])
def test_a_refused_or_cut_write_leaves_nothing(local: tuple[AbstractFileSystem, Path],
                                               refusal: str) -> None:
    fs, root = local
    target = root / "3" / "app.jar"
    seen: list[int] = []
    fail_at = len(DATA) // 2 if refusal == "interrupted" else None
    source = chunks(DATA, fail_at=fail_at, seen=seen)

    async def cancelled() -> None:
        task = asyncio.create_task(write_stream(fs, str(target), source, 1 << 30, None,
                                                False, asyncio.Lock()))
        while len(seen) < 20:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    if refusal == "cancelled":
        asyncio.run(cancelled())
    else:
        expected = {"too large": TooLarge, "digest": DigestMismatch,
                    "interrupted": ConnectionResetError}[refusal]
        with pytest.raises(expected):
            write(fs, str(target), source, max_bytes=len(DATA) // 3 if refusal == "too large"
                  else 1 << 30, sha="0" * 64 if refusal == "digest" else None)
    assert not target.exists()
    assert not leftovers(root)
    if refusal == "too large":
        assert len(seen) * 65_536 < len(DATA) // 3 + 2 * 65_536  # stopped at the limit


def test_the_matching_digest_is_accepted(local: tuple[AbstractFileSystem, Path]) -> None:
    fs, root = local
    assert write(fs, str(root / "x.bin"), chunks(DATA),
                 sha=hashlib.sha256(DATA).hexdigest()) is True


def test_other_backends_publish_whole_by_a_move() -> None:
    fs = fsspec.filesystem("memory")
    target = f"/bucket-{uuid.uuid4().hex}/3/app.jar"
    visible: list[bool] = []

    async def watched() -> AsyncIterator[bytes]:
        async for chunk in chunks(DATA):
            visible.append(fs.exists(target))
            yield chunk

    async def run() -> bool:
        written = await write_stream(fs, target, watched(), 1 << 30, None, False,
                                     asyncio.Lock())
        return written.created

    assert asyncio.run(run()) is True
    assert fs.cat_file(target) == DATA
    assert visible and not any(visible)  # nobody saw a partial object
    with pytest.raises(TooLarge):
        asyncio.run(write_stream(fs, target + ".2", chunks(DATA), 1000, None, False,
                                 asyncio.Lock()))
    assert not fs.exists(target + ".2")
    assert [p for p in fs.find(target.rsplit("/", 2)[0]) if is_temporary(p)] == []
