"""Webhook signatures (GitLab's Standard Webhooks scheme), partition keys, config rules."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from gitlab_producer.capture import file_url
from gitlab_producer.config import ConfigError, load_settings
from gitlab_producer.http.webhooks import _owner, verify_signature

BODY = b'{"object_kind":"push"}'


def sign(secret: bytes, webhook_id: str, ts: str, body: bytes) -> str:
    digest = hmac.new(secret, f"{webhook_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def test_valid_signature_is_accepted() -> None:
    header = sign(b"signing-key", "msg_1", "1700000000", BODY)
    assert verify_signature("signing-key", "msg_1", "1700000000", BODY, header, 300,
                            1_700_000_100)


def test_whsec_tokens_are_base64_keys() -> None:
    key = b"\x01\x02secret-bytes"
    token = "whsec_" + base64.b64encode(key).decode()
    header = "v1,bogus " + sign(key, "m", "1700000000", BODY)  # any listed signature may match
    assert verify_signature(token, "m", "1700000000", BODY, header, 300, 1_700_000_000)


@pytest.mark.parametrize("change", ["body", "id", "stale", "future", "key", "scheme", "ts"])
def test_tampered_or_stale_signatures_are_refused(change: str) -> None:
    body, wid, ts, now, key = BODY, "msg_1", "1700000000", 1_700_000_000.0, "signing-key"
    header = sign(key.encode(), wid, ts, body)
    if change == "body":
        body = BODY + b" "
    elif change == "id":
        wid = "msg_2"
    elif change == "stale":
        now += 301
    elif change == "future":
        now -= 301
    elif change == "key":
        key = "other-key"
    elif change == "scheme":
        header = header.replace("v1,", "v2,")
    elif change == "ts":
        ts = "yesterday"
    assert not verify_signature(key, wid, ts, body, header, 300, now)


@pytest.mark.parametrize("payload,key", [
    ({"project_id": 5, "user_id": 9}, "5"), ({"project": {"id": 6}}, "6"),
    ({"group": {"group_id": 7}}, "7"), ({"event_name": "user_create", "user_id": 8}, "8"),
    ({"object_kind": "x"}, "none"),
])
def test_partition_key_prefers_project_then_group_then_user(payload: dict[str, object],
                                                             key: str) -> None:
    assert _owner(payload) == key


def test_file_paths_are_encoded_exactly_once() -> None:
    assert file_url(3, "lib/class.rb") == "projects/3/repository/files/lib%2Fclass.rb/raw"
    assert file_url(3, "docs/user guide.md").endswith("docs%2Fuser%20guide.md/raw")
    assert file_url(3, "src/a+b.py").endswith("src%2Fa%2Bb.py/raw")
    assert file_url(3, "data/100%.txt").endswith("data%2F100%25.txt/raw")
    assert "%25" not in file_url(3, "lib/class.rb")


def test_webhook_port_needs_a_secret() -> None:
    required = {"gitlab_base_url": "https://g.test/api/v4", "gitlab_private_token": "tok1"}
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET"):
        load_settings(None, **required, webhook_port=8003)
    settings = load_settings(None, **required, webhook_port=8003, webhook_secret="s3cret",
                             kafka_topic="bus")
    assert (settings.webhook_topic, settings.artifact_topic) == ("bus.hooks", "bus.artifacts")
    assert settings.redacted()["WEBHOOK_SECRET"] == "***"


def test_capture_rules_are_validated() -> None:
    required = {"gitlab_base_url": "https://g.test/api/v4", "gitlab_private_token": "tok1"}
    with pytest.raises(ConfigError, match="CAPTURE_RULES"):
        load_settings(None, **required, capture_rules=[{"files": ["a"]}])
    ok = load_settings(None, **required, capture_rules=[
        {"project": "group1/project-1", "files": ["lib/class.rb"], "artifacts": [{"job": "b"}]}])
    assert ok.capture_rules[0].artifacts[0].job == "b"
