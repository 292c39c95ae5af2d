"""Defects an outsider found by attacking the running service (see tests/integration/
test_outsider.py for the attacks against the whole process)."""

from __future__ import annotations

import gzip
from pathlib import Path

import httpx
import orjson

from gitlab_producer.metrics import Metrics
from gitlab_producer.sinks.base import Message
from gitlab_producer.sinks.file import FileSink
from tests.unit.test_webhook_receiver import serving

HEADERS = {"X-Gitlab-Token": "s3cret", "X-Gitlab-Event": "Push Hook"}


async def test_file_sink_keeps_one_record_per_line_when_the_json_has_line_breaks(
        tmp_path: Path) -> None:
    """A hook body (or an event page) that is valid JSON with line breaks between its tokens
    (a trailing newline, a pretty-printing proxy) must still be one line of the JSON-lines
    file: a reader that splits on lines lost the record before."""
    sink = FileSink(str(tmp_path / "out.jsonl"), "bus")
    pretty = b'{\n  "object_kind": "push",\r\n  "note": "a\\nb"\n}\n'
    await sink.send([Message(b"1", pretty, (("kind", b"project"),))])
    await sink.close()
    lines = (tmp_path / "out.jsonl").read_bytes().splitlines()
    assert len(lines) == 1
    assert orjson.loads(lines[0])["value"] == {"object_kind": "push", "note": "a\nb"}


async def test_webhook_with_a_body_that_does_not_decode_is_a_400_not_a_500(
        tmp_path: Path) -> None:
    """``Content-Encoding: gzip`` over a body that is not gzip is the sender's mistake: 400
    (a 500 invites GitLab to retry it, and counts as the receiver's failure)."""
    body = orjson.dumps({"object_kind": "push", "project": {"id": 1}})
    async with serving(tmp_path, Metrics()) as (url, _), httpx.AsyncClient(timeout=10) as c:
        bad = await c.post(url, content=body, headers={**HEADERS, "Content-Encoding": "gzip"})
        good = await c.post(url, content=gzip.compress(body),
                            headers={**HEADERS, "Content-Encoding": "gzip"})
    assert bad.status_code == 400, bad.text
    assert good.status_code == 200, good.text
