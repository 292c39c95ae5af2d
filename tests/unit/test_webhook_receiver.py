"""The webhook receiver on the embedded defaults: SQLite store and the JSON-lines file sink."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson

from gitlab_producer.http.webhooks import WebhookConfig, WebhookReceiver, build_webhook_app
from gitlab_producer.metrics import Metrics
from gitlab_producer.sinks.file import FileSink
from gitlab_producer.store.sqlite_store import SQLiteStore
from tests.local_http import listening


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, metrics: Metrics) -> AsyncIterator[tuple[str, WebhookReceiver]]:
    """A receiver on the embedded defaults, listening on a free loopback port."""
    store = SQLiteStore(tmp_path / "state.sqlite3")
    sink = FileSink(str(tmp_path / "hooks.jsonl"), "bus.hooks")
    receiver = WebhookReceiver(WebhookConfig("s3cret", "", 300, 3600, "gl.test"), store, sink,
                               metrics)
    try:
        async with listening(build_webhook_app(receiver, 4096)) as port:
            yield f"http://127.0.0.1:{port}/webhooks/gitlab", receiver
    finally:
        await sink.close()
        await store.close()


async def test_file_sink_and_sqlite_store(tmp_path: Path) -> None:
    metrics = Metrics()
    body = orjson.dumps({"object_kind": "merge_request", "project": {"id": 12}})
    headers = {"X-Gitlab-Token": "s3cret", "X-Gitlab-Event": "Merge Request Hook"}
    async with serving(tmp_path, metrics) as (url, _), httpx.AsyncClient(timeout=10) as client:
        first = await client.post(url, content=body, headers=headers)
        # Older GitLab: no Idempotency-Key; the byte-identical retry is still recognised.
        again = await client.post(url, content=body, headers=headers)
        other = await client.post(url, content=body + b" ", headers=headers)
        big = await client.post(url, content=b"[" + b"1," * 5000 + b"1]", headers=headers)
    assert [r.status_code for r in (first, again, other, big)] == [200, 200, 200, 413]
    assert again.json() == {"status": "duplicate"}
    lines = [orjson.loads(line) for line in (tmp_path / "hooks.jsonl").read_bytes().splitlines()]
    assert len(lines) == 2
    assert lines[0]["key"] == "12" and lines[0]["value"] == orjson.loads(body)
    assert lines[0]["headers"]["event"] == "Merge Request Hook"
    statuses = {(s.labels["kind"], s.labels["status"]): s.value
                for m in metrics.registry.collect() if m.name == "gitlab_producer_webhooks"
                for s in m.samples if s.name.endswith("_total")}
    assert statuses[("Merge Request Hook", "200")] == 3
    assert statuses[("Merge Request Hook", "413")] == 1


async def test_concurrent_repeats_produce_once(tmp_path: Path) -> None:
    """Retries racing the first delivery wait for it instead of producing again."""
    headers = {"X-Gitlab-Token": "s3cret", "X-Gitlab-Event": "Push Hook",
               "Idempotency-Key": "same-delivery"}
    body = orjson.dumps({"object_kind": "push", "project_id": 3})
    async with (serving(tmp_path, Metrics()) as (url, receiver),
                httpx.AsyncClient(timeout=10) as client):
        answers = await asyncio.gather(*(client.post(url, content=body, headers=headers)
                                         for _ in range(8)))
        await receiver.drain()
        later = await client.post(url, content=body, headers=headers)
    assert [a.status_code for a in answers] == [200] * 8
    assert sorted(a.json()["status"] for a in answers) == ["delivered"] + ["duplicate"] * 7
    assert later.json() == {"status": "duplicate"}
    assert len((tmp_path / "hooks.jsonl").read_bytes().splitlines()) == 1


async def test_signatures_are_checked_against_gitlabs_clock(tmp_path: Path) -> None:
    """GitLab signs with its own clock: 15 minutes off the host's, a signed hook is still
    accepted when the receiver is given GitLab's clock (the service passes the client's)."""
    import time

    from tests.unit.test_webhook_rules import sign

    gitlab_ts = str(int(time.time()) - 900)
    body = orjson.dumps({"object_kind": "push", "project_id": 4})
    headers = {"X-Gitlab-Token": "s3cret", "X-Gitlab-Event": "Push Hook", "webhook-id": "m1",
               "webhook-timestamp": gitlab_ts,
               "webhook-signature": sign(b"signing-key", "m1", gitlab_ts, body)}
    statuses = []
    for now in (lambda: time.time() - 900, time.time):
        store = SQLiteStore(tmp_path / f"state-{len(statuses)}.sqlite3")
        sink = FileSink(str(tmp_path / f"hooks-{len(statuses)}.jsonl"), "bus.hooks")
        receiver = WebhookReceiver(WebhookConfig("s3cret", "signing-key", 300, 3600, "gl"),
                                   store, sink, Metrics(), now=now)
        try:
            async with listening(build_webhook_app(receiver, 4096)) as port, \
                    httpx.AsyncClient(timeout=10) as client:
                answer = await client.post(f"http://127.0.0.1:{port}/webhooks/gitlab",
                                           content=body, headers=headers)
            statuses.append(answer.status_code)
        finally:
            await sink.close()
            await store.close()
    assert statuses == [200, 401]  # GitLab's clock: accepted; the host's: 15 min too old
