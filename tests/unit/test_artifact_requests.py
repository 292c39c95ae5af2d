"""What an upload request names and announces: paths, commits, digests; the upload settings."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from gitlab_producer.artifact_store import ArtifactStore
from gitlab_producer.capture import Capturer
from gitlab_producer.config import ConfigError, load_settings
from gitlab_producer.gitlab.client import GitLabClient, RetryPolicy
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.http.artifacts import (
    ArtifactUploads,
    Refusal,
    expected_sha256,
    parse_target,
)
from gitlab_producer.metrics import Metrics
from gitlab_producer.sinks.file import FileSink

SHA = "a" * 40
REQUIRED = {"gitlab_base_url": "https://gitlab.test/api/v4", "gitlab_private_token": "t0ken"}


def test_targets_are_decoded_segment_by_segment() -> None:
    target = parse_target(f"/artifacts/group1%2Fetl/{SHA.upper()}/dist/my%20app%2B1%25.jar"
                          "?overwrite=true", listing=False)
    assert (target.project, target.commit, target.path) == ("group1/etl", SHA,
                                                            "dist/my app+1%.jar")
    listed = parse_target(f"/artifacts/7/{SHA}/", listing=True)
    assert (listed.project, listed.commit, listed.path) == ("7", SHA, "")


@pytest.mark.parametrize("raw", [
    f"/artifacts/3/{SHA}/a/%2E%2E/%2E%2E/x", f"/artifacts/3/{SHA}/%2Fetc%2Fpasswd",
    f"/artifacts/3/{SHA}/a%5Cb", f"/artifacts/3/{SHA}/a%00b", f"/artifacts/3/{SHA}/a//b",
    f"/artifacts/3/{SHA}/", "/artifacts/3/abc123/x", f"/artifacts/3/{SHA}x/y",
    f"/artifacts//{SHA}/x", "/artifacts/3", f"/artifacts/3/{SHA}/dist/.0a1b.partial",
])
def test_unsafe_or_incomplete_targets_are_400(raw: str) -> None:
    with pytest.raises(Refusal) as caught:
        parse_target(raw, listing=False)
    assert caught.value.status == 400 and caught.value.reason


def test_digests_in_every_accepted_form() -> None:
    digest = hashlib.sha256(b"jar").digest()
    b64 = base64.b64encode(digest).decode()
    for headers in ({"Digest": f"sha-256={b64}"}, {"Digest": f"MD5=abc, SHA-256={b64}"},
                    {"Content-Digest": f"sha-256=:{b64}:"},
                    {"X-Checksum-Sha256": digest.hex().upper()}):
        assert expected_sha256(CIMultiDict(headers)) == digest.hex(), headers
    assert expected_sha256(CIMultiDict()) is None


@pytest.mark.parametrize("headers", [
    {"Digest": "md5=abc"}, {"Digest": "sha-256=not base64!"},
    {"Digest": "sha-256=" + base64.b64encode(b"short").decode()},
    {"X-Checksum-Sha256": "xyz"},
])
def test_unusable_digests_are_400(headers: dict[str, str]) -> None:
    with pytest.raises(Refusal) as caught:
        expected_sha256(CIMultiDict(headers))
    assert caught.value.status == 400


def test_upload_settings() -> None:
    default = load_settings(None, **REQUIRED)
    assert default.artifact_max_bytes == 2 * 1024**3
    assert default.artifact_upload_token.get_secret_value() == ""
    on = load_settings(None, **REQUIRED, webhook_port=8080, webhook_secret="s",
                       artifact_upload_token="u" * 16)
    assert on.redacted()["ARTIFACT_UPLOAD_TOKEN"] == "***"
    with pytest.raises(ConfigError, match=r"^ARTIFACT_UPLOAD_TOKEN: must be at least 16"):
        load_settings(None, **REQUIRED, webhook_port=8080, webhook_secret="s",
                      artifact_upload_token="short")
    with pytest.raises(ConfigError, match="ARTIFACT_MAX_BYTES"):
        load_settings(None, **REQUIRED, artifact_max_bytes=0)


async def test_gitlab_refusing_the_service_account_is_a_404_and_a_bad_token_a_502(
        tmp_path: Path) -> None:
    status = {"commit": 403}

    async def project(_: web.Request) -> web.Response:
        return web.json_response({"id": 5, "default_branch": "main"})

    async def commit(_: web.Request) -> web.Response:
        return web.json_response({"message": "403 Forbidden"}, status=status["commit"])

    gitlab = web.Application()
    gitlab.router.add_get("/api/v4/projects/5", project)
    gitlab.router.add_get("/api/v4/projects/5/repository/commits/{sha}", commit)
    async with TestServer(gitlab) as fake:
        client = GitLabClient(str(fake.make_url("/api/v4")), "t", RateLimiter(1000),
                              policy=RetryPolicy(max_retries=0))
        sink = FileSink(str(tmp_path / "out.jsonl"), "bus.artifacts")
        capturer = Capturer(client, ArtifactStore(f"file://{tmp_path / 'store'}"), sink, (),
                            "gl.test")
        app = web.Application()
        ArtifactUploads(capturer, "u" * 16, 1 << 20, 5.0, Metrics()).register(app)
        try:
            async with TestClient(TestServer(app)) as api:
                headers = {"Authorization": "Bearer " + "u" * 16}
                hidden = await api.put(f"/artifacts/5/{SHA}/a.jar", data=b"x", headers=headers)
                assert hidden.status == 404
                assert "Reporter" in (await hidden.json())["reason"]
                status["commit"] = 401
                broken = await api.put(f"/artifacts/5/{SHA}/a.jar", data=b"x", headers=headers)
                assert broken.status == 502
        finally:
            await client.aclose()
            await sink.close()
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []
