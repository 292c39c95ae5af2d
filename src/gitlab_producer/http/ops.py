"""Operations endpoints: Prometheus metrics, health, readiness and the run-time log level.

- ``GET  :METRICS_PORT/<METRICS_URL>``: Prometheus text format
- ``GET  :METRICS_PORT/healthz``: the process is alive
- ``GET  :METRICS_PORT/readyz``: GitLab, store and sink reachable, and the sync making progress
  (a recent successful round, or a round in progress that is moving)
- ``PUT  :LOG_PORT/log_level`` with form body ``level=debug|info|warning|error``; with
  ``LOG_LEVEL_TOKEN`` set, also the token (``Authorization: Bearer`` or a ``token`` field),
  else 401. The other endpoints stay open, as Prometheus and orchestrators expect.
- ``GET  :LOG_PORT/log_level``
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gitlab_producer.config import ConfigError
from gitlab_producer.logs import LEVELS, LogControl, get_logger
from gitlab_producer.metrics import Metrics
from gitlab_producer.startup import Ports

log = get_logger(__name__)
Check = Callable[[], Awaitable[str | None]]  # None when fine, else what is wrong


@dataclass
class OpsState:
    """What the endpoints read."""

    metrics: Metrics
    logs: LogControl
    checks: dict[str, Check]
    level_token: str = ""  # when set, PUT /log_level needs it


STATE_KEY = web.AppKey("ops", OpsState)


class Pingable(Protocol):
    async def ping(self) -> None: ...


def reachability_checks(gitlab_reachable: Callable[[], bool | None], store: Pingable,
                        sink: Pingable) -> dict[str, Check]:
    """The readiness checks every command serves: GitLab's last request did not fail (None:
    no answer yet, which is not a failure), and the store and the sink answer."""
    async def gitlab() -> str | None:
        return None if gitlab_reachable() is not False else "last GitLab request failed"

    async def store_ok() -> str | None:
        await store.ping()
        return None

    async def sink_ok() -> str | None:
        await sink.ping()
        return None

    return {"gitlab": gitlab, "store": store_ok, "sink": sink_ok}


class RoundWatch:
    """The ``rounds`` readiness check: the sync is making progress when a round succeeded
    within ``limit_s``, or when a round is in progress and ``progress`` (the monotonic time of
    its latest sign of life, e.g. a GitLab page answered) is that recent. A first catch-up can
    take hours; it is ready as long as it moves."""

    def __init__(self, limit_s: float, progress: Callable[[], float | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = limit_s
        self._progress = progress
        self._clock = clock
        self._since = clock()  # the process's start: nothing is due before limit_s
        self._last_success: float | None = None
        self._round_started: float | None = None

    def round_started(self) -> None:
        self._round_started = self._clock()

    def round_ended(self, ok: bool) -> None:
        self._round_started = None
        if ok:
            self._last_success = self._clock()

    async def __call__(self) -> str | None:
        now = self._clock()
        if self._last_success is not None and now - self._last_success <= self.limit_s:
            return None
        if self._round_started is not None:
            idle = now - max(self._round_started, self._progress() or 0.0)
            return None if idle <= self.limit_s else (
                f"round in progress for {now - self._round_started:.0f} s, "
                f"no progress for {idle:.0f} s")
        age = now - (self._last_success or self._since)
        return None if age <= self.limit_s else f"no successful round for {age:.0f} s"


async def metrics_view(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    checks = request.app[STATE_KEY].checks
    names = list(checks)
    results = await asyncio.gather(*(_bounded(checks[n]) for n in names))
    problems = {n: r for n, r in zip(names, results, strict=True) if r}
    status = 200 if not problems else 503
    return web.json_response({"ready": not problems, "problems": problems}, status=status)


async def _bounded(check: Check) -> str | None:
    try:
        async with asyncio.timeout(5):
            return await check()
    except TimeoutError:
        return "timed out"
    except Exception as exc:  # a failing check is a finding, not a crash
        return f"{type(exc).__name__}: {exc}"


async def get_level(request: web.Request) -> web.Response:
    return web.json_response({"level": request.app[STATE_KEY].logs.level})


def _token_given(request: web.Request, form: Mapping[str, object]) -> str:
    bearer = request.headers.get("Authorization", "")
    if bearer[:7].lower() == "bearer ":
        return bearer[7:].strip()
    return str(form.get("token", ""))


async def put_level(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    form = await request.post()
    if state.level_token and not hmac.compare_digest(
            _token_given(request, form).encode(), state.level_token.encode()):
        log.warning("log_level_refused", remote=request.remote)
        return web.json_response(
            {"error": "LOG_LEVEL_TOKEN required (Authorization: Bearer, or a token field)"},
            status=401, headers={"WWW-Authenticate": "Bearer"})
    level = str(form.get("level", "")).strip().lower()
    if level not in LEVELS:
        return web.json_response(
            {"error": f"level must be one of: {', '.join(LEVELS)}"}, status=400)
    request.app[STATE_KEY].logs.level = level
    log.warning("log_level_changed", level=level)
    return web.json_response({"level": level})


def build_ops_app(state: OpsState, metrics_url: str | None, log_level: bool) -> web.Application:
    """An app with the metrics/health routes (when ``metrics_url``) and/or the log level."""
    app = web.Application()
    app[STATE_KEY] = state
    if metrics_url is not None:
        app.router.add_get("/" + metrics_url.strip("/"), metrics_view)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
    if log_level:
        app.router.add_get("/log_level", get_level)
        app.router.add_put("/log_level", put_level)
    return app


async def start_ops(state: OpsState, ports: Ports, metrics_port: int, metrics_url: str,
                    log_port: int) -> list[web.AppRunner]:
    """Serve the endpoints on ``ports`` (bound at start); one server when both ports are the
    same. Port 0: disabled."""
    plans: list[tuple[int, str | None, bool]] = []
    if metrics_port and metrics_port == log_port:
        plans.append((metrics_port, metrics_url, True))
    else:
        if metrics_port:
            plans.append((metrics_port, metrics_url, False))
        if log_port:
            plans.append((log_port, None, True))
    runners = []
    for port, url, with_level in plans:
        runner = web.AppRunner(build_ops_app(state, url, with_level), access_log=None,
                               handle_signals=False)
        await runner.setup()
        runners.append(runner)
        try:
            await ports.serve(runner, port, "METRICS_PORT" if url is not None else "LOG_PORT")
        except ConfigError:
            for started in runners:
                await started.cleanup()
            raise
    return runners
