"""Nothing from a hook, a rule or a request may name a place outside the artifact store."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from gitlab_producer.artifact_paths import (
    UnsafePathError,
    commit_sha,
    object_key,
    relative_path,
)
from gitlab_producer.capture import ArtifactStore

SHA1 = "a" * 40
SHA256 = "0123456789abcdef" * 4
BAD_COMMITS = ["../../../escaped", "a" * 39, "a" * 41, "g" * 40, "main", "", f"{SHA1}/..",
               f"../{SHA1[3:]}", "A" * 63, None, 40]
BAD_PATHS = ["../x", "a/../../x", "/etc/passwd", "a//b", "a/", "./a", "a/./b", "..", "a\\b",
             "..\\x", "a\x00b", "a\nb", "", "x" * 5000, None]


def test_commits_are_40_or_64_hex() -> None:
    assert commit_sha(SHA1) == SHA1
    assert commit_sha(SHA256) == SHA256
    assert commit_sha(SHA1.upper()) == SHA1  # one spelling, one place


@pytest.mark.parametrize("commit", BAD_COMMITS)
def test_anything_else_is_not_a_commit(commit: object) -> None:
    with pytest.raises(UnsafePathError):
        commit_sha(commit)


@pytest.mark.parametrize("path", BAD_PATHS)
def test_paths_that_could_leave_the_store_are_refused(path: object) -> None:
    with pytest.raises(UnsafePathError):
        relative_path(path)


@pytest.mark.parametrize("path", ["lib/class.rb", "docs/ü ñ/file with spaces.md", "a..b/c..",
                                  ".gitlab-ci.yml", "C#/x.cs"])
def test_ordinary_paths_pass_unchanged(path: str) -> None:
    assert relative_path(path) == path


@pytest.mark.parametrize("project_id", [0, -1, True])
def test_project_ids_are_positive(project_id: int) -> None:
    with pytest.raises(UnsafePathError):
        object_key(project_id, SHA1, "a")


@pytest.mark.parametrize("url", ["file://{tmp}/store", "memory://store-{name}"])
def test_the_store_resolves_every_write_under_its_root(url: str, tmp_path: Path) -> None:
    store = ArtifactStore(url.format(tmp=tmp_path, name=tmp_path.name))
    inside = store.target(3, SHA1, "lib/class.rb")
    assert inside.startswith(store.root + "/") and inside.endswith(f"/3/{SHA1}/lib/class.rb")
    for commit, path in (("../../../escaped", "f"), (SHA1, "../../../../x"), (SHA1, "/abs")):
        with pytest.raises(UnsafePathError):
            store.target(3, commit, path)
        with pytest.raises(UnsafePathError):
            asyncio.run(store.put(3, commit, path, b"data"))


def test_a_symbolic_link_inside_the_store_does_not_lead_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "store" / "3").mkdir(parents=True)
    os.symlink(outside, tmp_path / "store" / "3" / SHA1)
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    with pytest.raises(UnsafePathError, match="outside"):
        asyncio.run(store.put(3, SHA1, "lib/class.rb", b"data"))
    assert not any(outside.iterdir())


def test_rules_with_unsafe_paths_are_a_config_error() -> None:
    from gitlab_producer.config import ConfigError, load_settings

    required = {"gitlab_base_url": "https://g.test/api/v4", "gitlab_private_token": "t0ken"}
    for rule in ({"project": "1", "files": ["../../etc/passwd"]},
                 {"project": "1", "artifacts": [{"job": "../../x"}]}):
        with pytest.raises(ConfigError, match="CAPTURE_RULES"):
            load_settings(None, **required, capture_rules=[rule])


@pytest.mark.parametrize(("secret", "name"), [
    ("0" * 32, "../x"), ("0" * 32, "a/b"), ("0" * 32, ".."), ("0" * 31, "a.png"),
    ("G" * 32, "a.png"), ("0" * 32, "a\x00.png"), ("0" * 32, "")])
def test_upload_keys_refuse_what_could_leave_the_store(secret: str, name: str) -> None:
    from gitlab_producer.artifact_paths import upload_key

    with pytest.raises(UnsafePathError):
        upload_key(7, secret, name)


def test_upload_key_shape() -> None:
    from gitlab_producer.artifact_paths import upload_key

    assert upload_key(7, "ab" * 16, "log #1.txt") == f"7/uploads/{'ab' * 16}/log #1.txt"
