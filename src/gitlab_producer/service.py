"""The service: wires config, GitLab client, store, sink and HTTP endpoints, and runs rounds.

``run(once=True)`` is the burst mode: one complete round, then exit (0 when it completed).
SIGTERM/SIGINT stop taking work, finish in-flight pages within ``SHUTDOWN_GRACE``, flush the
producer, and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gitlab_producer.capture import ArtifactStore, Capturer, capture_endpoint
from gitlab_producer.config import Settings
from gitlab_producer.gitlab.client import GitLabClient, RetryPolicy
from gitlab_producer.gitlab.ratelimit import RateLimiter
from gitlab_producer.http.ops import OpsState, start_ops
from gitlab_producer.http.webhooks import WebhookConfig, WebhookReceiver, build_webhook_app
from gitlab_producer.logs import CONTROL, get_logger
from gitlab_producer.metrics import Metrics
from gitlab_producer.sinks import Sink, open_sink
from gitlab_producer.store import Store, open_store
from gitlab_producer.sync.delivery import Deliverer
from gitlab_producer.sync.entities import SyncContext
from gitlab_producer.sync.round import RoundResult, SyncRound
from gitlab_producer.sync.windows import WindowRules, iso

log = get_logger(__name__)
SINCE_KEY = "since"


class Service:
    """One running gitlab-producer."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None,
                 ops_host: str = "0.0.0.0") -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.ops_host = ops_host
        self.stop = asyncio.Event()
        self.last_success_end: float | None = None
        self.started = time.time()
        CONTROL.add_secret(settings.gitlab_private_token.get_secret_value())
        CONTROL.add_secret(settings.kafka_password.get_secret_value())
        CONTROL.add_secret(settings.redis_password.get_secret_value())

    def gitlab_client(self) -> GitLabClient:
        """A GitLab client with the settings' token, budget and retry policy."""
        s = self.settings
        return GitLabClient(
            s.gitlab_base_url, s.gitlab_private_token.get_secret_value(),
            RateLimiter(s.operations_per_second), self.metrics, s.gitlab_timeout,
            RetryPolicy(max_retries=s.gitlab_max_retries,
                        rate_limit_retries=s.gitlab_rate_limit_retries),
            max_connections=max(4, s.gitlab_concurrency * 2 + 2))

    async def _since(self, store: Store, client: GitLabClient) -> float:
        """The first round's start, fixed in the store so restarts do not move it."""
        stored = await store.get_meta(SINCE_KEY)
        if stored:
            return float(stored)
        since = self.settings.since(client.clock.now())
        await store.set_meta(SINCE_KEY, repr(since))
        return since

    def _ready_checks(self, client: GitLabClient, store: Store, sink: Sink) -> OpsState:
        async def gitlab() -> str | None:
            return None if client.reachable is not False else "last GitLab request failed"

        async def store_ok() -> str | None:
            await store.ping()
            return None

        async def sink_ok() -> str | None:
            await sink.ping()
            return None

        async def fresh() -> str | None:
            limit = 3 * max(self.settings.scheduling_poll_interval, 10.0)
            last = self.last_success_end or self.started
            age = time.time() - last
            return None if age <= limit else f"no successful round for {age:.0f} s"

        return OpsState(self.metrics, CONTROL, {"gitlab": gitlab, "store": store_ok,
                                               "sink": sink_ok, "rounds": fresh})

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("stopping", signal=sig.name)
        self.stop.set()

    def capturer(self, client: GitLabClient) -> Capturer:
        s = self.settings
        return Capturer(client, ArtifactStore(s.artifact_store_url),
                        open_sink(s, s.artifact_topic), s.capture_rules, s.instance)

    async def _start_webhooks(self, client: GitLabClient, store: Store
                              ) -> tuple[list[web.AppRunner], list[Sink]]:
        """The webhook receiver (and captures it triggers), when WEBHOOK_PORT is set."""
        s = self.settings
        if not s.webhook_port:
            return [], []
        capturer = self.capturer(client)
        if s.capture_rules:
            await capturer.check_access()
        hook_sink = open_sink(s, s.webhook_topic, low_latency=True)
        receiver = WebhookReceiver(
            WebhookConfig(s.webhook_secret.get_secret_value(),
                          s.webhook_signing_token.get_secret_value(), s.webhook_max_skew,
                          s.cache_ttl * 60, s.instance),
            store, hook_sink, self.metrics,
            capturer.on_hook if s.capture_rules else None, client.clock.now)
        app = build_webhook_app(receiver, s.webhook_max_body,
                                capture_endpoint(capturer, s.webhook_secret.get_secret_value()))
        await receiver.warm_up()
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, self.ops_host, s.webhook_port).start()
        log.info("webhooks_listening", port=s.webhook_port, topic=s.webhook_topic)
        return [runner], [hook_sink, capturer.sink]

    async def run(self, once: bool = False, max_rounds: int | None = None,
                  on_round: Callable[[RoundResult], Awaitable[None]] | None = None) -> int:
        """Run rounds until stopped (one with ``once``, at most ``max_rounds``); returns the
        exit code: with ``once``, 0 only when the round completed."""
        s = self.settings
        self._install_signals()
        store = open_store(s)
        sink = open_sink(s)
        client = self.gitlab_client()
        runners: list[web.AppRunner] = []
        extra_sinks: list[Sink] = []
        result: RoundResult | None = None
        try:
            runners = await start_ops(self._ready_checks(client, store, sink), self.ops_host,
                                      s.metrics_port, s.metrics_url, s.log_port)
            hook_runners, extra_sinks = await self._start_webhooks(client, store)
            runners += hook_runners
            since = await self._since(store, client)
            ctx = SyncContext(
                client, store, Deliverer(store, sink, s.cache_ttl * 60, self.metrics, s.instance,
                                         client.clock.now),
                self.metrics, WindowRules(s.sync_overlap, s.project_activity_lag,
                                          s.user_resync_interval),
                s.gitlab_per_page_pagination, since, self.stop)
            log.info("service_started", since=iso(since), once=once,
                     sink="kafka" if s.kafka_bootstrap_servers else "file",
                     store="redis" if s.redis_address else "sqlite")
            sync_round = SyncRound(ctx, s.gitlab_concurrency, s.sync_users)
            rounds = 0
            while not self.stop.is_set():
                result = await self._one_round(sync_round)
                rounds += 1
                if on_round is not None:
                    await on_round(result)
                if once or self.stop.is_set() or rounds == max_rounds:
                    break
                delay = max(0.0, s.scheduling_poll_interval - result.duration_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
        finally:
            await self._shutdown(client, store, [sink, *extra_sinks], runners)
        if once and not self.stop.is_set():
            return 0 if result is not None and result.ok else 1
        return 0  # stopped by a signal: a clean stop

    async def _one_round(self, sync_round: SyncRound) -> RoundResult:
        task = asyncio.create_task(sync_round.run())
        stop_wait = asyncio.create_task(self.stop.wait())
        await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            # Stopping: give in-flight pages the grace period, then cut the round short.
            done, _ = await asyncio.wait({task}, timeout=self.settings.shutdown_grace)
            if not done:
                task.cancel()
        stop_wait.cancel()
        try:
            result = await task
        except asyncio.CancelledError:
            result = RoundResult(started=time.time(), ok=False, error="cancelled at shutdown")
        outcome = "success" if result.ok else "failure"
        self.metrics.rounds.labels(outcome).inc()
        self.metrics.round_duration.labels(outcome).observe(result.duration_s)
        if result.ok:
            self.last_success_end = time.time()
            self.metrics.last_success.set(result.started)
        log.info("round_finished", ok=result.ok, produced=result.produced,
                 queued=result.queued, synced=result.synced, failed=result.failed,
                 covered_by_users=result.covered,
                 duration_s=round(result.duration_s, 3), error=result.error or None)
        return result

    async def _shutdown(self, client: GitLabClient, store: Store, sinks: list[Sink],
                        runners: list[web.AppRunner]) -> None:
        # Stop answering first, then flush what was produced, then release the rest.
        for closer in (*(r.cleanup for r in runners), *(s.close for s in sinks),
                       client.aclose, store.close):
            try:
                await closer()
            except Exception as exc:  # keep closing the rest
                log.warning("shutdown_step_failed", error=str(exc))
        log.info("service_stopped")
