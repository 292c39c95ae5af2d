"""GitLab webhook and system hook receiver: ``POST /webhooks/gitlab`` on ``WEBHOOK_PORT``.

An answer of 200 means Kafka acknowledged the payload; anything else makes GitLab retry
(GitLab gives up after 10 s and disables hooks that keep failing, so this stays fast).

- ``X-Gitlab-Token`` must equal ``WEBHOOK_SECRET`` (constant-time compare): else 401.
- With ``WEBHOOK_SIGNING_TOKEN``, GitLab's ``webhook-signature`` (HMAC-SHA256 over
  ``"{webhook-id}.{webhook-timestamp}.{body}"``, ``v1,<base64>``) must match and the timestamp
  must be within ``WEBHOOK_MAX_SKEW``: else 401.
- Headers that are not valid UTF-8 get 400 (a token that is not: 401); bodies over
  ``WEBHOOK_MAX_BODY`` get 413 (at once when ``Content-Length`` says so), bodies that do not
  arrive within ``WEBHOOK_BODY_TIMEOUT`` 408, malformed JSON 400; nothing is produced for them.
  Every answer, also to a request aiohttp's parser refuses, is JSON with a reason that never
  echoes the request.
- A request's headers must arrive within ``WEBHOOK_HEADER_TIMEOUT`` of the connection's
  opening (or of the next request's first byte): else 408 and the connection is closed, so a
  client sending them byte by byte (slowloris) holds nothing for long. Connections beyond
  ``WEBHOOK_MAX_CONNECTIONS`` get 503 with ``Retry-After`` and are closed at once.
- Bodies being handled hold their size in a shared budget (``WEBHOOK_MAX_INFLIGHT_BYTES``); a
  request waits for room until its body deadline, then gets 503 with ``Retry-After``.
- Retries carry the same ``Idempotency-Key`` (GitLab 17.4+; ``X-Gitlab-Webhook-UUID`` is new on
  every request): a repeat is acknowledged without producing again. Older GitLab sends no key;
  then the key is the SHA-256 of the event header and body, so a byte-identical retry is still
  recognised (two genuinely identical payloads within ``CACHE_TTL`` would count as one).
  A signed delivery is keyed by its ``webhook-id`` instead (GitLab sets it to the
  ``Idempotency-Key``, and it is covered by the signature, which the key is not), remembered
  for at least twice ``WEBHOOK_MAX_SKEW``: a replay with a fresh ``Idempotency-Key`` is
  acknowledged as a duplicate and not produced. The key is claimed in the store before it is
  produced (atomically, so across instances); a repeat meeting that claim gets 503.
- Kafka gets ``WEBHOOK_DELIVERY_TIMEOUT`` to acknowledge (503 after it), so GitLab's 10 s hold;
  a message Kafka can never take (``MSG_SIZE_TOO_LARGE``) is a 413, not a 503 retried for ever.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from gitlab_producer.http.inflight import ByteBudget
from gitlab_producer.logs import get_logger
from gitlab_producer.metrics import Metrics
from gitlab_producer.sinks.base import DeliveryError, Message, MessageTooLarge, Sink
from gitlab_producer.store.base import Store, StoreError
from gitlab_producer.store.claims import Claim, Claims

log = get_logger(__name__)
HOOK_NAMESPACE = "hook"
DRAIN_TIMEOUT_S = 1.0  # marks take milliseconds; SIGTERM must still end within 10 s

# X-Gitlab-Event values GitLab documents; anything else is forwarded flagged as unknown.
KNOWN_EVENTS = frozenset({
    "Push Hook", "Tag Push Hook", "Issue Hook", "Confidential Issue Hook", "Note Hook",
    "Confidential Note Hook", "Merge Request Hook", "Wiki Page Hook", "Pipeline Hook",
    "Job Hook", "Deployment Hook", "Feature Flag Hook", "Release Hook", "Emoji Hook",
    "Resource Access Token Hook", "Member Hook", "Subgroup Hook", "Project Hook",
    "Vulnerability Hook", "System Hook", "Work Item Hook",
})

OnPush = Callable[[dict[str, Any]], Coroutine[Any, Any, str]]  # -> the capture's outcome
RETRY_AFTER_S = "5"
# Above this, the connection is closed after the answer: measured, each idle keep-alive
# connection held on to its last body (20 connections after 24 MiB hooks: +480 MiB RSS).
KEEP_ALIVE_MAX_BODY = 1024 * 1024


@dataclass
class WebhookConfig:
    """What the receiver needs from the settings."""

    secret: str
    signing_token: str
    max_skew_s: float
    ttl_s: int
    instance: str
    max_body: int = 25 * 1024 * 1024
    body_timeout_s: float = 3.0
    max_inflight_bytes: int = 64 * 1024 * 1024
    delivery_timeout_s: float = 5.0


def _utf8_headers(request: web.BaseRequest) -> bool:
    """Whether every header name and value is valid UTF-8 (aiohttp hands over undecodable
    bytes as surrogates, which blow up at the first ``encode``)."""
    try:
        for name, value in request.raw_headers:
            name.decode()
            value.decode()
    except UnicodeDecodeError:
        return False
    return True


def _owner(payload: dict[str, Any]) -> str:
    """Partition key: project id, else group id, else user id."""
    for path in (("project_id",), ("project", "id"), ("group", "group_id"), ("group_id",),
                 ("user_id",), ("user", "id")):
        value: Any = payload
        for step in path:
            value = value.get(step) if isinstance(value, dict) else None
        if value is not None:
            return str(value)
    return "none"


def verify_signature(token: str, webhook_id: str, timestamp: str, body: bytes,
                     signature_header: str, max_skew_s: float, now: float) -> bool:
    """GitLab's signed webhooks (the Standard Webhooks scheme)."""
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    if abs(now - sent_at) > max_skew_s:
        return False
    key = token.removeprefix("whsec_")
    try:
        secret = base64.b64decode(key) if token.startswith("whsec_") else key.encode()
    except ValueError:
        return False
    expected = base64.b64encode(hmac.new(
        secret, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()).decode()
    candidates = [part.split(",", 1)[1] for part in signature_header.split()
                  if part.startswith("v1,")]
    return any(hmac.compare_digest(expected, c) for c in candidates)


class WebhookReceiver:
    """Checks, deduplicates and produces webhook deliveries."""

    def __init__(self, config: WebhookConfig, store: Store, sink: Sink, metrics: Metrics,
                 on_hook: OnPush | None = None, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self._now = now  # GitLab's clock: signature timestamps are GitLab's
        self.store = store
        self.sink = sink
        self.on_hook = on_hook
        # Told of every hook produced (the object sync marks what it names).
        self.observers: list[Callable[[dict[str, Any]], None]] = []
        self.metrics = metrics
        self._claims: Claims[str] = Claims()
        self._budget = ByteBudget(config.max_inflight_bytes)
        self._background: set[asyncio.Task[None]] = set()
        self._captures: dict[asyncio.Task[None], str] = {}

    async def warm_up(self) -> None:
        """Connect to the broker and the store before the port opens, so the first
        deliveries do not wait for connections (or get a 503 GitLab would count as a failure).
        An unreachable one is only logged: hooks then get 503 until it answers."""
        for name, check in (("kafka", self.sink.ping), ("store", self.store.ping)):
            try:
                await check()
            except (DeliveryError, StoreError) as exc:
                log.warning("webhook_warm_up_failed", target=name, error=str(exc))

    def _answer(self, kind: str, status: int, text: str, close: bool = False) -> web.Response:
        """The JSON answer; ``close`` for one sent before the body was read whole, so the
        connection is not kept waiting for the rest of it."""
        self.metrics.webhooks.labels(kind, str(status)).inc()
        response = web.json_response({"status": text}, status=status)
        if status == 503:
            response.headers["Retry-After"] = RETRY_AFTER_S
        if close:
            response.force_close()
        return response

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            return await self._handle(request)
        finally:
            self.metrics.webhook_duration.observe(time.perf_counter() - started)

    async def _handle(self, request: web.Request) -> web.Response:
        event = request.headers.get("X-Gitlab-Event", "")
        kind = event if event in KNOWN_EVENTS else "unknown"
        token = request.headers.get("X-Gitlab-Token", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(token, self.config.secret.encode()):
            return self._answer(kind, 401, "bad token", close=True)
        if not _utf8_headers(request):
            return self._answer(kind, 400, "headers must be UTF-8", close=True)
        limit = min(self.config.max_body, self.config.max_inflight_bytes)
        declared = request.content_length
        if declared is not None and declared > limit:
            return self._answer(kind, 413, "body too large", close=True)
        # A compressed body is decompressed as it is read: its declared length says nothing
        # of what it holds in memory (24 KiB of gzip are 24 MiB), so it reserves the most.
        encoded = request.headers.get("Content-Encoding", "identity").lower() != "identity"
        reserved = limit if declared is None or encoded else declared
        deadline = asyncio.get_running_loop().time() + self.config.body_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                await self._budget.acquire(reserved)
        except TimeoutError:
            log.warning("webhook_busy", kind=kind, inflight_bytes=self._budget.used)
            return self._answer(kind, 503, "busy, retry", close=True)
        self.metrics.webhook_inflight_bytes.set(self._budget.used)
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    body = await request.read()
            except TimeoutError:
                return self._answer(kind, 408, "body not received in time", close=True)
            except web.HTTPRequestEntityTooLarge:
                return self._answer(kind, 413, "body too large", close=True)
            except web.RequestPayloadError:
                # The body does not decode (a Content-Encoding it is not in, broken chunks):
                # the sender's mistake, not the receiver's.
                return self._answer(kind, 400, "malformed body", close=True)
            response = await self._accept(request, event, kind, body)
            if len(body) > KEEP_ALIVE_MAX_BODY:
                response.force_close()  # an idle aiohttp connection keeps its last body
            return response
        finally:
            self._budget.release(reserved)
            self.metrics.webhook_inflight_bytes.set(self._budget.used)

    async def _accept(self, request: web.Request, event: str, kind: str, body: bytes
                      ) -> web.Response:
        """Check the signature and the JSON of a body read whole, then produce it once."""
        webhook_id = request.headers.get("webhook-id", "")
        if self.config.signing_token and not verify_signature(
                self.config.signing_token, webhook_id,
                request.headers.get("webhook-timestamp", ""), body,
                request.headers.get("webhook-signature", ""), self.config.max_skew_s,
                self._now()):
            return self._answer(kind, 401, "bad signature")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._answer(kind, 400, "malformed JSON")
        if not isinstance(payload, dict):
            return self._answer(kind, 400, "expected a JSON object")
        header_key = request.headers.get("Idempotency-Key")
        # Signed: the signed webhook-id, so a replay with a fresh Idempotency-Key is known.
        key = (webhook_id if self.config.signing_token else header_key) or hashlib.sha256(
            event.encode() + b"\n" + body).hexdigest()
        message = self._message(request, event, kind, header_key or key, payload, body)
        try:
            # librdkafka gives up at the delivery timeout; this bounds the store's part too.
            async with asyncio.timeout(self.config.delivery_timeout_s + 0.5):
                produced = await self._deliver_once(key, message)
        except MessageTooLarge as exc:
            log.warning("webhook_too_large_for_kafka", kind=kind, size=len(body),
                        error=str(exc))
            return self._answer(kind, 413, "larger than Kafka accepts")
        except (DeliveryError, StoreError, TimeoutError) as exc:
            log.warning("webhook_not_delivered", kind=kind,
                        error=str(exc) or "no answer within WEBHOOK_DELIVERY_TIMEOUT")
            return self._answer(kind, 503, "not delivered, retry")
        if produced:
            for observer in self.observers:
                observer(payload)
        if produced and self.on_hook is not None:
            self._capture(payload)
        return self._answer(kind, 200, "delivered" if produced else "duplicate")

    def _message(self, request: web.Request, event: str, kind: str, key: str,
                 payload: dict[str, Any], body: bytes) -> Message:
        name = payload.get("object_kind") or payload.get("event_name") or ""
        headers = [("event", event.encode()), ("object_kind", str(name).encode()),
                   ("idempotency_key", key.encode()), ("source", self.config.instance.encode())]
        for header, field in (("X-Gitlab-Webhook-UUID", "hook_uuid"),
                              ("X-Gitlab-Event-UUID", "event_uuid"),
                              ("X-Gitlab-Instance", "gitlab_instance")):
            if header in request.headers:
                headers.append((field, request.headers[header].encode()))
        if kind == "unknown":
            headers.append(("unknown", b"1"))
        return Message(_owner(payload).encode(), body, tuple(headers))

    async def _deliver_once(self, key: str, message: Message) -> bool:
        """Produce unless this key was delivered before; True when this call produced.

        Concurrent repeats in this process wait for the first one (a claim taken before the
        store is asked). In the store, the key is claimed atomically (``SET NX``, for a little
        longer than a delivery may take), so a repeat reaching another instance, or this one
        after a restart, while the first is being produced gets 503 instead of producing it
        again; a failed delivery drops its claim. The store's mark is written after the 200,
        off the hook's critical path; the in-process claim is held until it is written. A mark
        that fails lets a later retry produce again, exactly as when it failed before the
        answer (GitLab got a 503 and retried), so answering first gives up nothing."""
        claim = self._claims.take([key])
        if not claim.mine:
            await claim.wait_for_others()
            return False
        try:
            state = await self.store.claim_key(HOOK_NAMESPACE, key,
                                               self.config.delivery_timeout_s + 2.0)
            if state == "done":
                claim.release()
                return False
            if state == "pending":
                raise DeliveryError("the same delivery is being produced by another instance")
            try:
                await self.sink.send([message])
            except BaseException:
                self._spawn(self._release(key))
                raise
        except BaseException as exc:
            claim.release(exc)
            raise
        self._spawn(self._mark(key, claim))
        return True

    async def _release(self, key: str) -> None:
        try:
            await self.store.release_key(HOOK_NAMESPACE, key)
        except StoreError as exc:  # the claim then expires on its own
            log.warning("webhook_release_failed", error=str(exc))

    async def _mark(self, key: str, claim: Claim[str]) -> None:
        # A webhook-id must outlive every timestamp its signature could still pass with.
        ttl_s = max(self.config.ttl_s, int(2 * self.config.max_skew_s) + 1)
        try:
            await self.store.mark_keys(HOOK_NAMESPACE, [key], ttl_s)
        except StoreError as exc:
            log.warning("webhook_mark_failed", error=str(exc))
        finally:
            claim.release()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _capture(self, payload: dict[str, Any]) -> None:
        """Run the hook's capture in the background, counted by outcome."""
        assert self.on_hook is not None
        on_hook = self.on_hook

        async def run() -> None:
            try:
                outcome = await on_hook(payload)
            except Exception as exc:  # a bug must still be counted and seen, not lost
                log.warning("capture_failed", error=f"{type(exc).__name__}: {exc}")
                outcome = "failed"
            self.metrics.captures.labels(outcome).inc()

        task = self._spawn(run())
        self._captures[task] = _describe(payload)
        self.metrics.captures_pending.set(len(self._captures))

        def done(finished: asyncio.Task[None]) -> None:
            self._captures.pop(finished, None)
            self.metrics.captures_pending.set(len(self._captures))

        task.add_done_callback(done)

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """At shutdown, give the marks and captures still running ``timeout_s`` to finish;
        captures still running then are cancelled, counted as ``abandoned`` and logged by
        project and commit (``gitlab-producer capture`` can redo them)."""
        if not self._background:
            return
        _, pending = await asyncio.wait(list(self._background), timeout=timeout_s)
        abandoned = [self._captures[t] for t in pending if t in self._captures]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        self.metrics.captures.labels("abandoned").inc(len(abandoned))
        if pending:
            log.warning("webhook_work_abandoned", captures=len(abandoned),
                        marks=len(pending) - len(abandoned), abandoned=abandoned)
        else:
            log.info("webhook_work_finished")


def _describe(payload: dict[str, Any]) -> str:
    """``project@commit`` of a hook that triggers a capture, for the shutdown report."""
    project = _owner(payload)
    commit = payload.get("checkout_sha") or payload.get("sha") or "?"
    return f"{project}@{commit}"


def _raw_answer(status: int, reason: str, detail: str, *extra: str) -> bytes:
    """A whole JSON answer, for a connection with no request to answer through aiohttp."""
    body = orjson.dumps({"status": detail})
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class JsonErrorHandler(web.RequestHandler):
    """aiohttp's connection handler, answering requests its parser refuses (bad header bytes,
    oversized lines) with a JSON 400 that does not echo the request: aiohttp's own text answer
    and log line quote the offending header, which may be ``X-Gitlab-Token``.

    It also bounds what aiohttp leaves open: the time a request's headers may take (aiohttp
    has no such timeout; its keep-alive timer does not run before the first request) and the
    number of connections (its server has no limit)."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._manager
        assert isinstance(server, JsonErrorServer)
        if len(server.connections) > server.max_connections:
            log.warning("webhook_connection_refused", reason="too many connections",
                        limit=server.max_connections)
            self._answer_and_close(_raw_answer(503, "Service Unavailable", "too many connections",
                                               "Retry-After: 1"))
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        idle = self._waiter is not None and not self._waiter.done() and not self._messages
        if idle and self._header_timer is None:  # the first byte of the next request
            self._arm_header_timer()
        before = self._request_count
        super().data_received(data)
        if self._request_count != before and self._header_timer is not None:
            self._header_timer.cancel()  # the headers are complete
            self._header_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        server = self._manager
        assert isinstance(server, JsonErrorServer)
        self._header_timer = self._loop.call_later(server.header_timeout_s,
                                                   self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        log.warning("webhook_request_refused", status=408, error="headers not received in time")
        self._answer_and_close(_raw_answer(408, "Request Timeout",
                                           "headers not received in time"))

    def _answer_and_close(self, answer: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer)
        self.force_close()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        # The parser's message quotes the request; a handler's error (500) does not.
        error = None if exc is None else type(exc).__name__
        if status >= 500 and exc is not None:
            error = f"{error}: {exc}"
        log.warning("webhook_request_refused", status=status, error=error)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        reason = "internal error" if status >= 500 else "malformed request"
        response = web.json_response({"status": reason}, status=status)
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """An aiohttp server whose connections use :class:`JsonErrorHandler`."""

    header_timeout_s = 10.0
    max_connections = 1024

    def __call__(self) -> web.RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class WebhookRunner(web.AppRunner):
    """``AppRunner`` for the webhook app: JSON answers to malformed requests too, and a
    connection whose body was not read (an early 401, 408, 413) is closed after the answer
    instead of aiohttp's 10 s of reading and discarding the rest. Headers get
    ``header_timeout_s``; at most ``max_connections`` connections are served at once."""

    def __init__(self, app: web.Application, header_timeout_s: float = 10.0,
                 max_connections: int = 1024, **kwargs: Any) -> None:
        super().__init__(app, **{"lingering_time": 0, **kwargs})
        self._header_timeout_s = header_timeout_s
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = JsonErrorServer  # same state, its connections get JSON errors
        assert isinstance(server, JsonErrorServer)
        server.header_timeout_s = self._header_timeout_s
        server.max_connections = self._max_connections
        return server


def build_webhook_app(receiver: WebhookReceiver, max_body: int,
                      capture: Callable[[web.Request], Awaitable[web.Response]] | None = None,
                      more_routes: Callable[[web.Application], None] | None = None
                      ) -> web.Application:
    """The receiver's app; ``more_routes`` adds others (the artifact hand-back, whose
    streamed bodies ``max_body`` does not cap)."""
    app = web.Application(client_max_size=max_body)

    async def drain(_app: web.Application) -> None:
        await receiver.drain()

    app.on_cleanup.append(drain)
    app.router.add_post("/webhooks/gitlab", receiver.handle)
    if capture is not None:
        app.router.add_post("/capture", capture)
    if more_routes is not None:
        more_routes(app)
    return app
