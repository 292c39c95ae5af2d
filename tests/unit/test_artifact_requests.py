"""What an upload request names and announces: paths, commits, digests; the upload settings."""

from __future__ import annotations

import base64
import hashlib

import pytest
from multidict import CIMultiDict

from gitlab_producer.config import ConfigError, load_settings
from gitlab_producer.http.artifacts import Refusal, expected_sha256, parse_target

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
