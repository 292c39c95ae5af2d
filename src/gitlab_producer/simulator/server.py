"""The simulator's HTTP server: GitLab's API under ``/api/v4`` and inspection under
``/_simulator`` (a prefix no GitLab path uses), plus an in-process runner for tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gitlab_producer.simulator import api, objects_api
from gitlab_producer.simulator.control import BARE_429_BODY, BARE_429_ROUTES, Control, Throttle
from gitlab_producer.simulator.objects_changes import ChangeError, Changer
from gitlab_producer.simulator.objects_changes import truth as objects_truth
from gitlab_producer.simulator.objects_store import ObjectWorld
from gitlab_producer.simulator.webhooks import HOOK_KINDS, deliver
from gitlab_producer.simulator.world import World, WorldSpec

API_PREFIX = "/api/v4/"
UNAUTHORIZED = orjson.dumps({"message": "401 Unauthorized"})
HTML_502 = (b"<!DOCTYPE html>\n<html><head><title>GitLab is not responding (502)</title></head>"
            b"<body><h1>502</h1><p>Whoops, GitLab is taking too much time to respond.</p>"
            b"</body></html>\n")

@dataclass
class Simulator:
    """A world, its switches, the accepted token and the live-mode rate."""

    world: World
    control: Control
    token: str = "sim-token"  # noqa: S105 - the simulator's documented default
    live_rate: float = 0.0
    _live_task: asyncio.Task[None] | None = field(default=None, repr=False)
    admin_token: str = "sim-admin-token"  # noqa: S105 - an administrator's token
    change_rate: float = 0.0  # live mode: object changes per second
    objects: ObjectWorld = field(init=False, repr=False)
    changer: Changer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.objects = ObjectWorld(self.world)
        self.changer = Changer(self.objects, self.world.spec.seed)

    @staticmethod
    def _token_of(request: web.Request) -> str | None:
        given = request.headers.get("PRIVATE-TOKEN")
        bearer = request.headers.get("Authorization", "")
        if given is None and bearer.startswith("Bearer "):
            given = bearer[7:]
        if given is None:
            given = request.query.get("private_token")
        return given

    def is_admin(self, request: web.Request) -> bool:
        """The request came with the administrator's token."""
        return self._token_of(request) == self.admin_token

    def authenticated(self, request: web.Request) -> tuple[bool, bool]:
        """(token accepted, token came in the query string)."""
        return (self._token_of(request) in (self.token, self.admin_token),
                "private_token" in request.query)

    async def live_loop(self) -> None:
        """Create ``live_rate`` events per second, in small batches, while live mode is on;
        and make ``change_rate`` object changes per second."""
        carry = 0.0
        changes = 0.0
        tick = 0.05
        while True:
            await asyncio.sleep(tick)
            if self.change_rate > 0:
                changes += self.change_rate * tick
                if changes >= 1:
                    self.changer.random(int(changes))
                    changes -= int(changes)
            if self.live_rate <= 0:
                carry = 0.0
                continue
            carry += self.live_rate * tick
            whole = int(carry)
            if whole:
                carry -= whole
                self.world.add_events(whole)


SIM_KEY = web.AppKey("simulator", Simulator)


def _throttled(route: str, throttle: Throttle) -> web.Response:
    if throttle.per_endpoint and route in BARE_429_ROUTES:
        # gitlab-org/gitlab#365728: no RateLimit-* headers, no Retry-After either.
        return web.Response(status=429, body=BARE_429_BODY, content_type="application/json")
    headers = {
        "Retry-After": str(throttle.retry_after_s),
        "RateLimit-Name": throttle.name,
        "RateLimit-Limit": str(throttle.limit),
        "RateLimit-Observed": str(throttle.observed),
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": str(throttle.reset_epoch),
        "RateLimit-ResetTime": time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                             time.gmtime(throttle.reset_epoch)),
    }
    return web.Response(status=429, text="Retry later", headers=headers)


async def _fault(request: web.Request, kind: str, sim: Simulator) -> web.StreamResponse | None:
    if kind == "html502":
        return web.Response(status=502, body=HTML_502, content_type="text/html")
    if kind == "error500":
        return web.Response(status=500, body=b'{"message":"500 Internal Server Error"}',
                            content_type="application/json")
    if kind == "drop":
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError
    if kind == "slow":
        await asyncio.sleep(sim.control.slow_s)
    return None


async def api_handler(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    sim.control.arrived()
    raw_path = request.rel_url.raw_path[len(API_PREFIX):].rstrip("/")
    ok, in_query = sim.authenticated(request)
    route_name = (objects_api.route(raw_path) or api.route(raw_path) or ("unknown",))[0]
    if not ok:
        sim.control.record(route_name, 401, in_query)
        return web.Response(status=401, body=UNAUTHORIZED, content_type="application/json")
    throttle = sim.control.throttle(route_name)
    if throttle is not None:
        sim.control.record(route_name, 429, in_query)
        return _throttled(route_name, throttle)
    fault = sim.control.pick_fault()
    if fault:
        try:
            early = await _fault(request, fault, sim)
        except asyncio.CancelledError:
            sim.control.record(route_name, 0, in_query)
            raise
        if early is not None:
            sim.control.record(route_name, early.status, in_query)
            return early
    if sim.control.redirect_to:
        sim.control.record(route_name, 302, in_query)
        return web.Response(status=302, headers={"Location": sim.control.redirect_to})
    base = sim.control.link_base or f"{request.scheme}://{request.host}/api/v4"
    answered = objects_api.handle(sim.world, sim.objects, raw_path, request.query, base)
    name, response = answered or api.handle(sim.world, raw_path, request.query, request.method,
                                            base, sim.control.entity_faults,
                                            admin=sim.is_admin(request))
    if sim.control.pad_bytes and isinstance(response, web.Response) and response.body and (
            response.content_type == "application/json"):
        response.body = bytes(response.body) + b" " * sim.control.pad_bytes  # type: ignore[arg-type]
    if fault == "truncated" and isinstance(response, web.Response) and response.body:
        body = bytes(response.body)  # type: ignore[arg-type]
        response = web.Response(body=body[: max(1, len(body) // 2)], status=response.status,
                                content_type="application/json", headers={
                                    k: v for k, v in response.headers.items()
                                    if k.lower() not in ("content-type", "content-length")})
    if (sim.control.object_storage.base_url and name == "artifacts"
            and response.status == 200 and isinstance(response, web.Response)):
        response = sim.control.object_storage.redirect(response)  # direct download
    sim.control.record(name, response.status, in_query)
    return response


# -- inspection -----------------------------------------------------------------------------
async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    data = orjson.loads(await request.read())
    return data if isinstance(data, dict) else {}


async def truth(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    since = int(request.query.get("since_id", 0))
    hidden = request.query.get("hidden") == "1"
    with sim.world.lock:
        rows: list[tuple[int, ...]] = list(sim.world.truth(since, hidden))  # type: ignore[arg-type]
        if request.query.get("times") == "1":
            rows = [(*row, sim.world.ev_time[row[0] - 1]) for row in rows]
    return web.Response(body=orjson.dumps({"events": rows, "count": len(rows)}),
                        content_type="application/json")


async def stats(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    with sim.control.lock:
        snapshot = sim.control.stats.snapshot()
    snapshot.update({"events": len(sim.world.ev_time), "projects": sim.world.project_count,
                     "users": sim.world.user_count, "start_ms": sim.world.start_ms,
                     "utc_offset_s": sim.world.spec.utc_offset_s,
                     "object_storage": {"served": sim.control.object_storage.served,
                                        "token_seen": sim.control.object_storage.token_seen}})
    return web.Response(body=orjson.dumps(snapshot), content_type="application/json")


async def reset_stats(request: web.Request) -> web.Response:
    request.app[SIM_KEY].control.reset_stats()
    return web.json_response({"ok": True})


async def settings(request: web.Request) -> web.Response:
    """Switch live mode, faults and rate limits at run time."""
    sim = request.app[SIM_KEY]
    body = await _json_body(request)
    control = sim.control
    with control.lock:
        if "live_rate" in body:
            sim.live_rate = float(body["live_rate"])
        if "fault_rate" in body:
            control.fault_rate = float(body["fault_rate"])
        if "fault_kinds" in body:
            control.fault_kinds = tuple(body["fault_kinds"])
        if "rate_limit" in body:
            control.rate_limit = float(body["rate_limit"])
        if "slow_s" in body:
            control.slow_s = float(body["slow_s"])
        if "link_base" in body:
            control.link_base = str(body["link_base"])
        if "redirect_to" in body:
            control.redirect_to = str(body["redirect_to"])
        if "pad_bytes" in body:
            control.pad_bytes = int(body["pad_bytes"])
        if "object_storage" in body:  # "http://host:port": artifact downloads redirect there
            control.object_storage.base_url = str(body["object_storage"]).rstrip("/")
        control.entity_faults = control.entity_faults.updated(body)
        if "change_rate" in body:
            sim.change_rate = float(body["change_rate"])
    return web.json_response({"live_rate": sim.live_rate, "change_rate": sim.change_rate,
                              "fault_rate": control.fault_rate,
                              "fault_kinds": list(control.fault_kinds),
                              "rate_limit": control.rate_limit,
                              **control.entity_faults.snapshot()})


async def add_events(request: web.Request) -> web.Response:
    body = await _json_body(request)
    ids = request.app[SIM_KEY].world.add_events(
        int(body.get("count", 1)), body.get("project_id"), body.get("author_id"))
    return web.json_response({"ids": ids})


async def changes(request: web.Request) -> web.Response:
    """Change objects: ``{"changes": [{"kind": "close_issue", "project_id": 3, "iid": 2}]}``,
    one change as the body itself, or ``{"random": 10}``."""
    sim = request.app[SIM_KEY]
    body = await _json_body(request)
    if "random" in body:
        return web.json_response({"changes": sim.changer.random(int(body["random"]))})
    try:
        done = [sim.changer.apply(change) for change in body.get("changes", [body])]
    except ChangeError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response({"changes": done})


async def objects(request: web.Request) -> web.Response:
    """Ground truth of the objects: ``?project_id=1&project_id=2`` (default: every project)."""
    sim = request.app[SIM_KEY]
    wanted = [int(p) for p in request.query.getall("project_id", []) if p.isdigit()]
    ids = wanted or list(range(1, sim.world.project_count + 1))
    return web.Response(body=orjson.dumps(objects_truth(sim.objects, ids)),
                        content_type="application/json")


async def send_webhooks(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    body = await _json_body(request)
    kinds = body.get("kinds") or list(HOOK_KINDS)
    results = await deliver(sim.world, body["url"], kinds, body.get("token", ""),
                            retries=int(body.get("retries", 3)),
                            retry_delay_s=float(body.get("retry_delay_s", 1.0)),
                            timeout_s=float(body.get("timeout_s", 10.0)),
                            repeat=int(body.get("repeat", 1)))
    return web.json_response({"deliveries": [
        {"kind": d.kind, "idempotency_key": d.idempotency_key, "attempts": d.attempts,
         "delivered": d.delivered} for d in results]})


def build_app(sim: Simulator) -> web.Application:
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[SIM_KEY] = sim
    app.router.add_get("/_simulator/truth", truth)
    app.router.add_get("/_simulator/stats", stats)
    app.router.add_post("/_simulator/stats/reset", reset_stats)
    app.router.add_post("/_simulator/settings", settings)
    app.router.add_post("/_simulator/events", add_events)
    app.router.add_post("/_simulator/webhooks", send_webhooks)
    app.router.add_post("/_simulator/changes", changes)
    app.router.add_get("/_simulator/objects", objects)
    app.router.add_get("/_object_storage/artifacts/{name}", sim.control.object_storage.handle)
    app.router.add_route("*", API_PREFIX + "{tail:.*}", api_handler)

    async def live(app: web.Application) -> Any:
        task = asyncio.create_task(sim.live_loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(live)
    return app


def free_port() -> int:
    """A loopback port nothing listens on (for tests and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 20.0) -> None:
    """Wait, bounded, until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


async def serve(sim: Simulator, host: str, port: int,
                shutdown_timeout: float = 60.0) -> web.AppRunner:
    """Start serving; the caller keeps the loop running and later calls ``runner.cleanup()``,
    which waits up to ``shutdown_timeout`` for requests in flight, then cancels them."""
    runner = web.AppRunner(build_app(sim), access_log=None, handle_signals=False,
                           shutdown_timeout=shutdown_timeout)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    sim.world.base_url = f"http://{host}:{port}"
    return runner


class SimulatorThread:
    """The simulator on a free loopback port in a background thread (for tests and the demo)."""

    def __init__(self, sim: Simulator, port: int | None = None) -> None:
        self.sim = sim
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="gitlab-simulator", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        # A slow fault still sleeping when the test is over is nobody's answer any more.
        runner = await serve(self.sim, "127.0.0.1", self.port, shutdown_timeout=0.5)
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def start(self) -> SimulatorThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("simulator did not start within 30 s")
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@contextlib.contextmanager
def running_simulator(spec: WorldSpec | None = None, **control: Any) -> Iterator[SimulatorThread]:
    """``with running_simulator(WorldSpec(...)) as sim: sim.url`` — stops on exit."""
    token = control.pop("token", "sim-token")
    live_rate = control.pop("live_rate", 0.0)
    sim = Simulator(World(spec or WorldSpec()), Control(**control), token, live_rate)
    thread = SimulatorThread(sim).start()
    try:
        yield thread
    finally:
        thread.stop()
