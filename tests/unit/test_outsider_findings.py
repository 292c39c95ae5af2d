"""Defects an outsider found by attacking the running service (see tests/integration/
test_outsider.py for the attacks against the whole process)."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

import httpx
import orjson
from aiohttp import web

from gitlab_producer.gitlab.events import Event
from gitlab_producer.http.webhooks import WebhookConfig, WebhookReceiver, build_webhook_app
from gitlab_producer.metrics import Metrics
from gitlab_producer.simulator.server import free_port
from gitlab_producer.sinks.base import Message
from gitlab_producer.sinks.file import FileSink
from gitlab_producer.store.base import StoreError
from gitlab_producer.store.sqlite_store import SQLiteStore
from gitlab_producer.sync.delivery import Deliverer
from tests.unit.test_store_and_delivery import RecordingSink
from tests.unit.test_webhook_receiver import serving
from tests.waits import wait_until_async

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


async def test_a_compressed_hook_reserves_what_it_may_decompress_to(tmp_path: Path) -> None:
    """``WEBHOOK_MAX_INFLIGHT_BYTES`` bounds the hook bodies held at once. A gzip body of
    24 KiB decompresses to 24 MiB: reserving its declared (compressed) length let 40 such
    requests at once hold 1.2 GB (measured: VmHWM 66 MB -> 1,225 MB). It must reserve the
    most it may grow to, ``WEBHOOK_MAX_BODY``, as a body of unknown length does."""
    config = WebhookConfig("s3cret", "", 300, 3600, "gl.test", max_body=1024 * 1024,
                           body_timeout_s=5.0, max_inflight_bytes=3 * 1024 * 1024)
    store = SQLiteStore(tmp_path / "state.sqlite3")
    sink = FileSink(str(tmp_path / "hooks.jsonl"), "bus.hooks")
    receiver = WebhookReceiver(config, store, sink, Metrics())
    runner = web.AppRunner(build_webhook_app(receiver, config.max_body))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    packed = gzip.compress(b'{"object_kind": "push", "x": "' + b"a" * 900_000 + b'"}')
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Token: s3cret\r\n"
            b"X-Gitlab-Event: Push Hook\r\nContent-Encoding: gzip\r\n"
            + f"Content-Length: {len(packed)}\r\n\r\n".encode() + packed[:len(packed) // 2])
        await writer.drain()
        await wait_until_async(lambda: _used(receiver), 5, "the hook's reservation")
        assert receiver._budget.used >= config.max_body
    finally:
        writer.close()
        await runner.cleanup()
        await sink.close()
        await store.close()
    del reader


async def _used(receiver: WebhookReceiver) -> bool:
    return receiver._budget.used > 0


class _FlakyMarks(SQLiteStore):
    """A store whose first ``failures`` mark writes fail, as a Redis killed mid-page does."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    async def mark_sent(self, event_ids: list[int], ttl_s: int) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreError("redis: Connection refused")
        await super().mark_sent(event_ids, ttl_s)


async def test_marks_of_an_acknowledged_page_are_retried_not_dropped(tmp_path: Path) -> None:
    """Kafka acknowledged the page, then the store failed for a moment (Redis killed and
    restarted with AOF): giving up on the marks made the next round produce the page again
    (10 events doubled in the outsider's Redis-kill test). The marks are written once the
    store answers again, and the page counts as delivered."""
    store = _FlakyMarks(tmp_path / "state.sqlite3", failures=2)
    sink = RecordingSink()
    deliverer = Deliverer(store, sink, 3600, Metrics(), "gl.test")
    events = [Event(i, 1, 2, 1_700_000_000.0 + i, b'{"id": %d}' % i) for i in (1, 2, 3)]
    assert await deliverer.deliver(events) == 3
    assert await store.unseen([1, 2, 3]) == []
    assert await Deliverer(store, sink, 3600, Metrics(), "gl.test").deliver(events) == 0
    assert len(sink.sent) == 3
    await store.close()
