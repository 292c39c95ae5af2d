"""GitLab webhook and system hook receiver: ``POST /webhooks/gitlab`` on ``WEBHOOK_PORT``.

An answer of 200 means Kafka acknowledged the payload; anything else makes GitLab retry
(GitLab gives up after 10 s and disables hooks that keep failing, so this stays fast).

- ``X-Gitlab-Token`` must equal ``WEBHOOK_SECRET`` (constant-time compare): else 401.
- With ``WEBHOOK_SIGNING_TOKEN``, GitLab's ``webhook-signature`` (HMAC-SHA256 over
  ``"{webhook-id}.{webhook-timestamp}.{body}"``, ``v1,<base64>``) must match and the timestamp
  must be within ``WEBHOOK_MAX_SKEW``: else 401.
- Bodies over ``WEBHOOK_MAX_BODY`` get 413, malformed JSON 400; nothing is produced for them.
- Retries carry the same ``Idempotency-Key`` (GitLab 17.4+; ``X-Gitlab-Webhook-UUID`` is new on
  every request): a repeat is acknowledged without producing again. Older GitLab sends no key;
  then the key is the SHA-256 of the event header and body, so a byte-identical retry is still
  recognised (two genuinely identical payloads within ``CACHE_TTL`` would count as one).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from gitlab_producer.logs import get_logger
from gitlab_producer.metrics import Metrics
from gitlab_producer.sinks.base import DeliveryError, Message, Sink
from gitlab_producer.store.base import Store, StoreError
from gitlab_producer.store.claims import Claim, Claims
from gitlab_producer.store.redis_claims import RedisClaims

log = get_logger(__name__)
HOOK_NAMESPACE = "hook"
DRAIN_TIMEOUT_S = 1.0  # marks take milliseconds; SIGTERM must still end within 10 s
HELD_WAIT_S = 5.0  # a repeat another receiver is producing; GitLab's own timeout is 10 s

# X-Gitlab-Event values GitLab documents; anything else is forwarded flagged as unknown.
KNOWN_EVENTS = frozenset({
    "Push Hook", "Tag Push Hook", "Issue Hook", "Confidential Issue Hook", "Note Hook",
    "Confidential Note Hook", "Merge Request Hook", "Wiki Page Hook", "Pipeline Hook",
    "Job Hook", "Deployment Hook", "Feature Flag Hook", "Release Hook", "Emoji Hook",
    "Resource Access Token Hook", "Member Hook", "Subgroup Hook", "Project Hook",
    "Vulnerability Hook", "System Hook", "Work Item Hook",
})

OnPush = Callable[[dict[str, Any]], Coroutine[Any, Any, None]]


@dataclass
class WebhookConfig:
    """What the receiver needs from the settings."""

    secret: str
    signing_token: str
    max_skew_s: float
    ttl_s: int
    instance: str


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
                 on_hook: OnPush | None = None, shared: RedisClaims | None = None) -> None:
        self.config = config
        self.shared = shared  # claims across receivers (Redis store)
        self.store = store
        self.sink = sink
        self.on_hook = on_hook
        self.metrics = metrics
        self._claims: Claims[str] = Claims()
        self._background: set[asyncio.Task[None]] = set()

    async def warm_up(self) -> None:
        """Connect to the broker and the store before the port opens, so the first
        deliveries do not wait for connections (or get a 503 GitLab would count as a failure).
        An unreachable one is only logged: hooks then get 503 until it answers."""
        for name, check in (("kafka", self.sink.ping), ("store", self.store.ping)):
            try:
                await check()
            except (DeliveryError, StoreError) as exc:
                log.warning("webhook_warm_up_failed", target=name, error=str(exc))

    def _answer(self, kind: str, status: int, text: str) -> web.Response:
        self.metrics.webhooks.labels(kind, str(status)).inc()
        return web.json_response({"status": text}, status=status)

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            return await self._handle(request)
        finally:
            self.metrics.webhook_duration.observe(time.perf_counter() - started)

    async def _handle(self, request: web.Request) -> web.Response:
        event = request.headers.get("X-Gitlab-Event", "")
        kind = event if event in KNOWN_EVENTS else "unknown"
        token = request.headers.get("X-Gitlab-Token", "")
        if not hmac.compare_digest(token.encode(), self.config.secret.encode()):
            return self._answer(kind, 401, "bad token")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._answer(kind, 413, "body too large")
        if self.config.signing_token and not verify_signature(
                self.config.signing_token, request.headers.get("webhook-id", ""),
                request.headers.get("webhook-timestamp", ""), body,
                request.headers.get("webhook-signature", ""), self.config.max_skew_s,
                time.time()):
            return self._answer(kind, 401, "bad signature")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._answer(kind, 400, "malformed JSON")
        if not isinstance(payload, dict):
            return self._answer(kind, 400, "expected a JSON object")
        key = request.headers.get("Idempotency-Key") or hashlib.sha256(
            event.encode() + b"\n" + body).hexdigest()
        try:
            produced = await self._deliver_once(key, self._message(request, event, kind, key,
                                                                   payload, body))
        except (DeliveryError, StoreError) as exc:
            log.warning("webhook_not_delivered", kind=kind, error=str(exc))
            return self._answer(kind, 503, "not delivered, retry")
        if produced and self.on_hook is not None:
            self._spawn(self.on_hook(payload))
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

        Concurrent repeats wait for the first one (a claim taken before the lookup). The
        store's mark is written after the 200, off the hook's critical path; the claim is
        held until it is written. A mark that fails lets a later retry produce again, exactly
        as when it failed before the answer (GitLab got a 503 and retried), so answering first
        gives up nothing."""
        claim = self._claims.take([key])
        if not claim.mine:
            await claim.wait_for_others()
            return False
        shared_key = (self.shared.store.namespaced_keys(HOOK_NAMESPACE, [key])
                      if self.shared is not None else [])
        owned = False
        try:
            if self.shared is not None:
                owned = await self.shared.claim_waiting(shared_key[0], HELD_WAIT_S)
            if not owned and not await self._unseen(key):
                claim.release()
                return False
            async with (self.shared.renewed(shared_key) if owned and self.shared is not None
                        else contextlib.nullcontext()):
                await self.sink.send([message])
        except BaseException as exc:
            if self.shared is not None and owned:
                self.shared.release_soon(shared_key)
            claim.release(exc)
            raise
        self._spawn(self._mark(key, claim))
        return True

    async def _unseen(self, key: str) -> bool:
        """Not delivered yet (the embedded store: this process's claim is the only one)."""
        return self.shared is None and bool(await self.store.unseen_keys(HOOK_NAMESPACE,
                                                                          [key]))

    async def _mark(self, key: str, claim: Claim[str]) -> None:
        try:
            await self.store.mark_keys(HOOK_NAMESPACE, [key], self.config.ttl_s)
        except StoreError as exc:
            log.warning("webhook_mark_failed", error=str(exc))
        finally:
            claim.release()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Give the marks and hook callbacks still running a moment to finish (at shutdown);
        what is still running after that (a long capture) is abandoned, and logged."""
        if self._background:
            _, pending = await asyncio.wait(list(self._background), timeout=timeout_s)
            if pending:
                log.warning("webhook_work_abandoned", tasks=len(pending))


def build_webhook_app(receiver: WebhookReceiver, max_body: int,
                      capture: Callable[[web.Request], Awaitable[web.Response]] | None = None
                      ) -> web.Application:
    app = web.Application(client_max_size=max_body)

    async def drain(_app: web.Application) -> None:
        await receiver.drain()

    app.on_cleanup.append(drain)
    app.router.add_post("/webhooks/gitlab", receiver.handle)
    if capture is not None:
        app.router.add_post("/capture", capture)
    return app
