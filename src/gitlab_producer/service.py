"""The service: wires config, GitLab client, store, sink and HTTP endpoints, and runs rounds.

``run(once=True)`` is the burst mode: one complete round, then exit (0 when it completed, 1
when it failed, 128 + the signal's number when a signal stopped it first). SIGTERM/SIGINT stop
taking work, finish in-flight pages within ``SHUTDOWN_GRACE``, flush the producer, and exit (0
for rounds forever); during start-up they are honoured at once.

A store that cannot be reached (at start-up or at the start of a round) is retried with capped
exponential backoff while ``/readyz`` says so; the service recovers by itself when it answers.
A store that refuses the credentials (Redis ``WRONGPASS``/``NOAUTH``) or the database
(``REDIS_DB``) is bad config: exit 2 naming the variable. Those, and a port in use, are found by
the start-up checks (:mod:`gitlab_producer.startup`) before GitLab is asked anything; a Redis
that was not answering then is checked again by the first command it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

from gitlab_producer.capture import ArtifactStore, Capturer, capture_endpoint
from gitlab_producer.config import ConfigError, Settings
from gitlab_producer.gitlab.client import GitLabClient
from gitlab_producer.gitlab.connect import client_from_settings
from gitlab_producer.gitlab.errors import FatalGitLabError, GitLabError, RetriesExhaustedError
from gitlab_producer.http.artifacts import ArtifactUploads
from gitlab_producer.http.ops import OpsState, RoundWatch, reachability_checks, start_ops
from gitlab_producer.http.webhooks import (
    DRAIN_TIMEOUT_S,
    WebhookConfig,
    WebhookReceiver,
    WebhookRunner,
    build_webhook_app,
)
from gitlab_producer.instances import heartbeat, registry_for
from gitlab_producer.logs import CONTROL, get_logger
from gitlab_producer.metrics import Metrics
from gitlab_producer.objects.objsync import ObjectSync, object_sync_for
from gitlab_producer.sinks import Sink, open_sink
from gitlab_producer.startup import (
    Ports,
    redis_refusal,
    refused_password,
    service_ports,
    start_checks,
)
from gitlab_producer.store import Store, StoreError, open_store
from gitlab_producer.store.base import StoreAuthError
from gitlab_producer.store.retrying import retry_delay, until_the_store_answers
from gitlab_producer.sync.context import SINCE_KEY, sync_context
from gitlab_producer.sync.entities import SyncContext
from gitlab_producer.sync.round import LAST_ROUND_KEY, RoundResult, SyncRound
from gitlab_producer.sync.shared_rounds import SharedRounds, round_runner
from gitlab_producer.sync.windows import iso
from gitlab_producer.tasks import Stopped, unless_stopped

log = get_logger(__name__)
BURST_CLOCK_TRIES = 3  # a burst run (--once) gives GitLab this many tries to answer at start
T = TypeVar("T")


class Service:
    """One running gitlab-producer."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None,
                 ops_host: str = "0.0.0.0") -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.ops_host = ops_host
        self.stop = asyncio.Event()
        self.stop_signal: signal.Signals | None = None
        self.last_ok_round_started: float | None = None
        self.watch: RoundWatch | None = None
        self.stopping_at: float | None = None  # monotonic time of the stop signal
        self.receiver: WebhookReceiver | None = None
        self.object_sync: ObjectSync | None = None  # SYNC_OBJECTS: objects beside the events
        for secret in settings.secrets():
            CONTROL.add_secret(secret)

    def gitlab_client(self) -> GitLabClient:
        """A GitLab client with the settings' token, budget and retry policy."""
        s = self.settings
        return client_from_settings(s, self.metrics,
                                    max_connections=max(4, s.gitlab_concurrency * 2 + 2),
                                    rate_limit_retries=s.gitlab_rate_limit_retries)

    async def _since(self, store: Store, client: GitLabClient, once: bool) -> float | None:
        """The first round's start, fixed in the store so restarts do not move it; None when
        it is still to be fixed and GitLab did not answer a burst run (``once``)."""
        try:
            stored = await store.get_meta(SINCE_KEY)
        except StoreAuthError:  # a Redis that did not answer the start-up checks, then did
            raise ConfigError(refused_password(self.settings)) from None
        except StoreError as exc:
            refusal = redis_refusal(self.settings, exc)  # a database it lacks: retrying cannot help
            if refusal is not None:
                raise refusal from None
            raise
        if stored:
            return float(stored)
        now = await self._gitlab_now(client, BURST_CLOCK_TRIES if once else None)
        if now is None:
            return None
        since = self.settings.since(now)
        await store.set_meta(SINCE_KEY, repr(since))
        return since

    async def _gitlab_now(self, client: GitLabClient, tries: int | None) -> float | None:
        """GitLab's time for the default SYNC_SINCE (its day, not the host's): until GitLab has
        answered once (its ``Date`` header), ``GET /user`` is asked again with backoff, at
        most ``tries`` times (None: until it answers); None when it never did."""
        failures = 0
        while self.settings.sync_since is None and client.clock.skew_s is None:
            try:
                await client.get("user", endpoint="user")
                break  # answered, without a Date header: the host's clock is all there is
            except RetriesExhaustedError as exc:  # no answer (or one without a Date)
                failures += 1
                if tries is not None and failures >= tries:
                    log.error("gitlab_unreachable", error=str(exc), tries=failures,
                              detail="SYNC_SINCE's default needs GitLab's clock")
                    return None
                delay = retry_delay(failures)
                log.warning("gitlab_clock_unknown", error=str(exc), retry_in_s=delay,
                            detail="SYNC_SINCE's default waits for GitLab's clock")
                await asyncio.sleep(delay)
            except GitLabError:
                break
        return client.clock.now()

    def _ready_checks(self, client: GitLabClient, store: Store, sink: Sink) -> OpsState:
        self.watch = RoundWatch(3 * max(self.settings.scheduling_poll_interval, 10.0),
                                lambda: client.answered_at)
        checks = reachability_checks(lambda: client.reachable, store, sink)
        checks["rounds"] = self.watch
        return OpsState(self.metrics, CONTROL, checks,
                        self.settings.log_level_token.get_secret_value())

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("stopping", signal=sig.name)
        self.stop_signal = self.stop_signal or sig
        if self.stopping_at is None:
            self.stopping_at = time.monotonic()
        self.stop.set()

    async def _unless_stopped(self, work: Coroutine[Any, Any, T]) -> T | None:
        """``work``'s result, or None (``work`` cancelled) as soon as a stop signal comes."""
        try:
            return await unless_stopped(work, self.stop)
        except Stopped:
            return None

    async def _retrying(self, step: str, work: Callable[[], Awaitable[T]]) -> T:
        """``work()`` until the store answers it, backing off (the caller bounds it by stop)."""
        return await until_the_store_answers(step, work, self.metrics)

    async def _check_state(self, store: Store, since: float, client: GitLabClient) -> None:
        """Warn loudly when the store has lost what this process wrote into it (a Redis that
        restarted without persistence, a flush): every mark and cursor is gone, and events
        are sent again. What the process still knows (the base of the windows) is restored."""
        if await store.get_meta(SINCE_KEY) is not None:
            return
        self.metrics.store_state_lost.inc()
        log.error("store_state_lost",
                  detail="the store lost its marks and cursors (a Redis restarted without "
                         "persistence, or flushed?): events already delivered since SYNC_SINCE "
                         "will be delivered again; production Redis needs AOF or RDB "
                         "persistence", since=iso(since))
        await store.set_meta(SINCE_KEY, repr(since))
        if self.last_ok_round_started is not None:  # the round base is in GitLab's time
            base = client.clock.to_gitlab(self.last_ok_round_started)
            await store.set_meta(LAST_ROUND_KEY, repr(base))

    def capturer(self, client: GitLabClient) -> Capturer:
        s = self.settings
        return Capturer(client, ArtifactStore(s.artifact_store_url),
                        open_sink(s, s.artifact_topic), s.capture_rules, s.instance)

    async def _start_webhooks(self, client: GitLabClient, store: Store, ports: Ports
                              ) -> tuple[list[web.AppRunner], list[Sink]]:
        """The webhook receiver (and captures it triggers), when WEBHOOK_PORT is set."""
        s = self.settings
        if not s.webhook_port:
            if s.artifact_upload_token.get_secret_value():
                log.warning("artifact_uploads_off", detail="ARTIFACT_UPLOAD_TOKEN is set but "
                            "the API listens on WEBHOOK_PORT, which is 0")
            return [], []
        capturer = self.capturer(client)
        if s.capture_rules:
            await capturer.check_access()
        hook_sink = open_sink(s, s.webhook_topic, low_latency=True)
        receiver = self.receiver = WebhookReceiver(
            WebhookConfig(s.webhook_secret.get_secret_value(),
                          s.webhook_signing_token.get_secret_value(), s.webhook_max_skew,
                          s.cache_ttl * 60, s.instance, s.webhook_max_body,
                          s.webhook_body_timeout, s.webhook_max_inflight_bytes,
                          s.webhook_delivery_timeout),
            store, hook_sink, self.metrics,
            capturer.on_hook if s.capture_rules else None, client.clock.now)
        upload_token = s.artifact_upload_token.get_secret_value()
        uploads = ArtifactUploads(capturer, upload_token, s.artifact_max_bytes,
                                  s.artifact_idle_timeout, self.metrics)
        app = build_webhook_app(receiver, s.webhook_max_body,
                                capture_endpoint(capturer, s.webhook_secret.get_secret_value(),
                                                 s.webhook_body_timeout),
                                uploads.register if upload_token else None)
        await receiver.warm_up()
        # Uploads still running at SIGTERM get the grace period, then are cut (and cleaned up).
        runner = WebhookRunner(app, s.webhook_header_timeout, s.webhook_max_connections,
                               access_log=None, handle_signals=False,
                               shutdown_timeout=s.shutdown_grace)
        await runner.setup()
        try:
            await ports.serve(runner, s.webhook_port, "WEBHOOK_PORT")
        except ConfigError:
            await runner.cleanup()
            raise
        log.info("webhooks_listening", port=s.webhook_port, topic=s.webhook_topic,
                 artifact_uploads=bool(upload_token))
        return [runner], [hook_sink, capturer.sink]

    async def _start_up(self, client: GitLabClient, store: Store, sink: Sink, ports: Ports,
                        runners: list[web.AppRunner], sinks: list[Sink], once: bool
                        ) -> SyncContext | None:
        """Webhooks (when configured) and the sync's fixed state, retrying an unreachable
        store; appends what it starts to ``runners`` and ``sinks`` (closed on the way out).
        None: a burst run (``once``) whose GitLab did not answer (see :meth:`_since`)."""
        s = self.settings
        hook_runners, extra_sinks = await self._start_webhooks(client, store, ports)
        runners += hook_runners
        sinks += extra_sinks
        since = await self._retrying("since", lambda: self._since(store, client, once))
        if since is None:
            return None
        return sync_context(s, client, store, sink, self.metrics, since, self.stop)

    async def run(self, once: bool = False, max_rounds: int | None = None,
                  on_round: Callable[[RoundResult], Awaitable[None]] | None = None) -> int:
        """Run rounds until stopped (one with ``once``, at most ``max_rounds``); returns the
        exit code: with ``once``, 0 only when the round completed."""
        s = self.settings
        self._install_signals()
        # Bad settings fail here, before anything else is logged or GitLab is asked.
        ports = await self._unless_stopped(
            start_checks(s, service_ports(s, webhooks=True), self.ops_host))
        if ports is None:
            return self._stopped_code(once)
        try:
            store = open_store(s)
        except ConfigError:
            ports.close()
            raise
        try:
            sink = open_sink(s)
        except ConfigError:
            ports.close()
            await store.close()
            raise
        if not s.kafka_bootstrap_servers:
            log.warning("no_kafka", detail="KAFKA_BOOTSTRAP_SERVERS is empty: events go to "
                        "OUTPUT_FILE", output_file=s.output_file)
        client = self.gitlab_client()
        runners: list[web.AppRunner] = []
        sinks: list[Sink] = [sink]
        result: RoundResult | None = None
        try:
            runners += await start_ops(self._ready_checks(client, store, sink), ports,
                                       s.metrics_port, s.metrics_url, s.log_port)
            ctx: SyncContext | None = None
            accepted = await self._unless_stopped(self._token_accepted(client))
            if accepted is False:
                return 1
            if accepted:
                ctx = await self._unless_stopped(
                    self._start_up(client, store, sink, ports, runners, sinks, once))
            if ctx is not None and s.sync_objects:
                self.object_sync, object_sink = object_sync_for(s, client, store, self.stop)
                sinks.append(object_sink)
                ctx.deliverer.observers.append(self.object_sync.note_events)
                if self.receiver is not None:
                    self.receiver.observers.append(self.object_sync.note_hook)
            if ctx is not None:
                log.info("service_started", since=iso(ctx.since), once=once,
                         sink="kafka" if s.kafka_bootstrap_servers else "file",
                         store="redis" if s.redis_address else "sqlite")
                async with heartbeat(registry_for(store, s.redis_key_prefix, self.metrics,
                                                  s.operations_per_second), self.stop):
                    result = await self._rounds(ctx, store, once, max_rounds, on_round)
        finally:
            ports.close()
            await self._shutdown(client, store, sinks, runners)
        if once and (result is None or not result.ok):
            return self._stopped_code(once)
        return 0  # rounds forever, stopped by a signal: a clean stop

    def _stopped_code(self, once: bool) -> int:
        """The exit code of a run that ended without a completed round: 128 + the signal's
        number for a burst run a signal stopped, 1 for one that failed, 0 for rounds forever
        (a signal is a clean stop)."""
        if not once:
            return 0
        return 128 + self.stop_signal if self.stop_signal is not None else 1

    async def _token_accepted(self, client: GitLabClient) -> bool:
        """``GET /user`` once at start: a rejected token stops the service (exit 1) instead of
        failing every round. GitLab not answering is not the token's fault: rounds go on."""
        try:
            await client.check_token()
        except FatalGitLabError as exc:
            log.error("gitlab_token_rejected", error=str(exc))
            return False
        except GitLabError as exc:
            log.warning("gitlab_token_unchecked", error=str(exc))
        return True

    async def _rounds(self, ctx: SyncContext, store: Store, once: bool, max_rounds: int | None,
                      on_round: Callable[[RoundResult], Awaitable[None]] | None
                      ) -> RoundResult | None:
        """Rounds until stopped; the last one's result. A round that failed as a whole (store,
        broker or GitLab unreachable) is retried with capped exponential backoff."""
        async with round_runner(ctx, self.settings, once) as sync_round:
            return await self._rounds_of(sync_round, store, once, max_rounds, on_round)

    async def _rounds_of(self, sync_round: SyncRound | SharedRounds, store: Store, once: bool,
                         max_rounds: int | None,
                         on_round: Callable[[RoundResult], Awaitable[None]] | None
                         ) -> RoundResult | None:
        ctx = sync_round.ctx
        result: RoundResult | None = None
        rounds = failures = 0
        while not self.stop.is_set():
            result = await self._one_round(self._checked_round(sync_round, store, ctx.since))
            if self.object_sync is not None and not self.stop.is_set():
                await self._unless_stopped(self.object_sync.round())
            rounds += 1
            if on_round is not None:
                await on_round(result)
            if once or self.stop.is_set() or rounds == max_rounds:
                break
            interval = self.settings.scheduling_poll_interval
            # Clamped: a duration taken across a host clock stepped back must not stall polling.
            delay = min(interval, max(0.0, interval - result.duration_s))
            failures = failures + 1 if result.error else 0
            if failures:
                delay = max(delay, retry_delay(failures))
                log.info("round_retry", failures=failures, retry_in_s=round(delay, 3))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
        return result

    async def _checked_round(self, sync_round: SyncRound | SharedRounds, store: Store,
                             since: float
                             ) -> RoundResult:
        try:
            await self._check_state(store, since, sync_round.ctx.client)
        except StoreError as exc:
            return RoundResult(started=time.time(), ok=False, error=f"StoreError: {exc}")
        return await sync_round.run()

    async def _one_round(self, work: Coroutine[Any, Any, RoundResult]) -> RoundResult:
        assert self.watch is not None
        self.watch.round_started()
        task = asyncio.create_task(work)
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
        self.watch.round_ended(result.ok)
        outcome = "success" if result.ok else "failure"
        self.metrics.rounds.labels(outcome).inc()
        self.metrics.round_duration.labels(outcome).observe(result.duration_s)
        if result.ok:
            self.last_ok_round_started = result.started
            self.metrics.last_success.set(result.started)
        log.info("round_finished", ok=result.ok, produced=result.produced,
                 queued=result.queued, synced=result.synced, failed=result.failed,
                 skipped=result.skipped,
                 covered_by_users=result.covered,
                 duration_s=round(result.duration_s, 3), error=result.error or None)
        return result

    async def _shutdown(self, client: GitLabClient, store: Store, sinks: list[Sink],
                        runners: list[web.AppRunner]) -> None:
        # Let hook-triggered captures finish within what is left of SHUTDOWN_GRACE (the round
        # had the same window), stop answering, flush what was produced, release the rest.
        if self.receiver is not None:
            started = self.stopping_at or time.monotonic()
            left = started + self.settings.shutdown_grace - time.monotonic()
            await self.receiver.drain(max(DRAIN_TIMEOUT_S, left))
        for closer in (*(r.cleanup for r in runners), *(s.close for s in sinks),
                       client.aclose, store.close):
            try:
                await closer()
            except Exception as exc:  # keep closing the rest
                log.warning("shutdown_step_failed", error=str(exc))
        log.info("service_stopped")
