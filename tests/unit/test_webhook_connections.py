"""What one client can hold on the webhook port: headers sent byte by byte (slowloris) are cut
at the header timeout, also on a kept-alive connection, and connections beyond the cap are
refused at once. Raw TCP, as such a client would speak."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

from gitlab_producer.http.webhooks import (
    WebhookConfig,
    WebhookReceiver,
    WebhookRunner,
    build_webhook_app,
)
from gitlab_producer.metrics import Metrics
from gitlab_producer.simulator.server import free_port
from gitlab_producer.sinks.file import FileSink
from gitlab_producer.store.sqlite_store import SQLiteStore

HEAD = b"GET /nothing HTTP/1.1\r\nHost: hooks.test\r\n\r\n"  # answered 404, kept alive
TIMEOUT_S = 0.5


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, max_connections: int = 100) -> AsyncIterator[int]:
    store = SQLiteStore(tmp_path / "state.sqlite3")
    sink = FileSink(str(tmp_path / "hooks.jsonl"), "bus.hooks")
    receiver = WebhookReceiver(WebhookConfig("s3cret", "", 300, 3600, "gl.test"), store, sink,
                               Metrics())
    runner = WebhookRunner(build_webhook_app(receiver, 4096), header_timeout_s=TIMEOUT_S,
                           max_connections=max_connections)
    await runner.setup()
    port = free_port()
    try:
        from aiohttp import web

        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield port
    finally:
        await runner.cleanup()
        await sink.close()
        await store.close()


def dribble(sock: socket.socket) -> bytes:
    """Send a request head a byte every 50 ms (3 s at most); what the server answered."""
    sock.settimeout(3)
    with contextlib.suppress(OSError):  # the server hung up
        for byte in b"POST /webhooks/gitlab HTTP/1.1\r\nHost: hooks.test\r\nX-Gitlab-Token: s3c":
            sock.send(bytes([byte]))
            time.sleep(0.05)
    answer = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(4096):
            answer += chunk
    return answer


async def test_headers_sent_byte_by_byte_are_cut_at_the_header_timeout(tmp_path: Path) -> None:
    async with serving(tmp_path) as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            started = time.monotonic()
            answer = await asyncio.to_thread(dribble, sock)
            assert answer.startswith(b"HTTP/1.1 408") and b"headers not received" in answer
            assert time.monotonic() - started < TIMEOUT_S + 1.0

        # A connection that sends nothing at all: the same time.
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            assert (await asyncio.to_thread(sock.recv, 4096)).startswith(b"HTTP/1.1 408")

        # Kept alive after a first request: the next head has the same time.
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            assert (await asyncio.to_thread(answered_then_dribble, sock)).startswith(
                b"HTTP/1.1 408")


def answered_then_dribble(sock: socket.socket) -> bytes:
    sock.sendall(HEAD)
    first = b""
    while b"\r\n\r\n" not in first:
        first += sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 404")
    time.sleep(TIMEOUT_S + 0.2)  # idle is keep-alive's business, not the header timer's
    return dribble(sock)


async def test_connections_beyond_the_cap_are_refused(tmp_path: Path) -> None:
    async with serving(tmp_path, max_connections=2) as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await asyncio.wait_for(reader.read(), 2)
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
        writer.close()
        for _, held_writer in held:
            held_writer.close()
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # room again
        writer.write(HEAD)
        assert (await asyncio.wait_for(reader.readline(), 2)).startswith(b"HTTP/1.1 404")
        writer.close()
