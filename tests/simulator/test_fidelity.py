"""The simulator behaves as GitLab's documentation says, seen through python-gitlab (a client
nobody here wrote) and through raw HTTP for every header and error."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import gitlab
import httpx
import pytest

from gitlab_producer.gitlab.pagination import parse_link
from gitlab_producer.simulator.repository import FILE_PATHS
from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.simulator.world import WorldSpec
from tests.waits import wait_until

SPEC = WorldSpec(projects=60, users=20, events=3000, seed=3, history_days=2.0,
                 hidden_share=0.2)
TOKEN = {"PRIVATE-TOKEN": "sim-token"}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    with running_simulator(SPEC) as running:
        yield running


@pytest.fixture
def api(sim: SimulatorThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{sim.url}/api/v4", headers=TOKEN, timeout=10) as client:
        yield client


@pytest.fixture
def gl(sim: SimulatorThread) -> gitlab.Gitlab:
    return gitlab.Gitlab(sim.url, private_token="sim-token", per_page=100)


# -- python-gitlab ----------------------------------------------------------------------------
def test_python_gitlab_lists_projects_with_keyset(gl: gitlab.Gitlab) -> None:
    projects = list(gl.projects.list(iterator=True, pagination="keyset", order_by="id",
                                     sort="asc", per_page=7))
    assert [p.id for p in projects] == list(range(1, SPEC.projects + 1))


def test_python_gitlab_pages_through_project_events(gl: gitlab.Gitlab,
                                                    sim: SimulatorThread) -> None:
    busiest = max(range(1, SPEC.projects + 1),
                  key=lambda p: len(sim.sim.world.project_events[p - 1]))
    events = list(gl.projects.get(busiest, lazy=True).events.list(iterator=True, per_page=20))
    world = sim.sim.world
    visible = [i + 1 for i in world.project_events[busiest - 1] if world.visible(i)]
    assert [e.id for e in events] == sorted(visible, reverse=True)
    assert len(visible) > 40  # several pages, some short because of hidden events


@pytest.mark.parametrize("path", FILE_PATHS)
def test_python_gitlab_fetches_awkward_file_paths(gl: gitlab.Gitlab, path: str) -> None:
    project = gl.projects.get(5, lazy=True)
    found = project.files.get(file_path=path, ref="feature/login-page")
    content = base64.b64decode(found.content)
    assert found.file_path == path
    assert content.startswith(f"{path} of project 5 at ".encode())
    assert project.files.raw(file_path=path, ref="feature/login-page") == content


def test_python_gitlab_sees_401_for_a_bad_token(sim: SimulatorThread) -> None:
    with pytest.raises(gitlab.exceptions.GitlabAuthenticationError):
        gitlab.Gitlab(sim.url, private_token="nope").auth()


# -- raw HTTP: offset pagination --------------------------------------------------------------
def test_offset_headers_and_links(api: httpx.Client) -> None:
    r = api.get("/projects", params={"per_page": 25, "page": 2, "order_by": "id", "sort": "asc"})
    assert r.status_code == 200
    h = r.headers
    assert (h["x-page"], h["x-per-page"], h["x-next-page"], h["x-prev-page"]) == (
        "2", "25", "3", "1")
    assert (h["x-total"], h["x-total-pages"]) == ("60", "3")
    assert set(parse_link(h["link"])) == {"prev", "next", "first", "last"}
    assert [p["id"] for p in r.json()] == list(range(26, 51))


def test_per_page_defaults_to_20_and_caps_at_100(api: httpx.Client) -> None:
    assert len(api.get("/projects").json()) == 20
    capped = api.get("/users/1/events", params={"per_page": 1000})
    assert capped.headers["x-per-page"] == "100"


def test_counts_are_left_out_above_10000_rows() -> None:
    with running_simulator(WorldSpec(projects=1, users=1, events=12_000, hidden_share=0.0,
                                     projectless_share=0.0)) as big, httpx.Client(
            base_url=f"{big.url}/api/v4", headers=TOKEN) as client:
        for path in ("/users/1/events", "/projects/1/events"):
            busy = client.get(path, params={"per_page": 100}).headers
            assert "x-total" not in busy and "x-total-pages" not in busy
            assert "last" not in parse_link(busy["link"]) and busy["x-next-page"] == "2"
        few = client.get("/projects/1/events", params={"per_page": 100, "action": "joined"})
        assert int(few.headers["x-total"]) < 10_000


def test_offset_past_50000_rows_is_refused_on_projects() -> None:
    with running_simulator(WorldSpec(projects=50_100, users=2, events=10)) as big:
        r = httpx.get(f"{big.url}/api/v4/projects", headers=TOKEN,
                      params={"page": 501, "per_page": 100})
        assert r.status_code == 405
        assert "maximum allowed offset of 50000" in r.json()["error"]
        assert "keyset" in r.json()["error"]
        keyset = httpx.get(f"{big.url}/api/v4/projects", headers=TOKEN, params={
            "pagination": "keyset", "order_by": "id", "sort": "asc", "per_page": 100,
            "id_after": 50_000})
        assert [p["id"] for p in keyset.json()] == list(range(50_001, 50_101))


# -- raw HTTP: keyset pagination --------------------------------------------------------------
def test_keyset_answers_carry_only_a_next_link(api: httpx.Client) -> None:
    params = {"pagination": "keyset", "order_by": "id", "sort": "asc", "per_page": 20}
    seen, url, pages = [], "/projects", 0
    query: dict[str, object] | None = params
    while url and pages < 10:
        r = api.get(url, params=query)
        pages += 1
        assert "x-total" not in r.headers and "x-per-page" not in r.headers
        seen += [p["id"] for p in r.json()]
        url, query = parse_link(r.headers.get("link")).get("next", ""), None
        if url:
            assert "id_after=" in url
    assert seen == list(range(1, SPEC.projects + 1))
    assert pages == 4  # 3 full pages, then an empty one with no Link


@pytest.mark.parametrize("order", ["id", "name", "username"])
def test_users_keyset_orders(api: httpx.Client, order: str) -> None:
    r = api.get("/users", params={"pagination": "keyset", "order_by": order, "sort": "asc",
                                  "per_page": 100})
    assert len(r.json()) == SPEC.users
    assert "link" not in r.headers


def test_keyset_refuses_other_orders_on_projects(api: httpx.Client) -> None:
    r = api.get("/projects", params={"pagination": "keyset", "order_by": "name"})
    assert r.status_code == 405


# -- raw HTTP: events -------------------------------------------------------------------------
def test_events_shape_and_order(api: httpx.Client) -> None:
    desc = api.get("/projects/1/events", params={"per_page": 100}).json()
    asc = api.get("/projects/1/events", params={"per_page": 100, "sort": "asc"}).json()
    ids = [e["id"] for e in desc]
    assert ids == sorted(ids, reverse=True)
    assert [e["id"] for e in asc] == sorted(e["id"] for e in asc)
    event = desc[0]
    for key in ("id", "title", "project_id", "action_name", "target_id", "target_iid",
                "target_type", "author_id", "target_title", "created_at", "author",
                "author_username"):
        assert key in event
    assert event["created_at"].endswith("Z") and len(event["created_at"]) == 24
    pushes = [e for e in desc if e["action_name"].startswith("pushed")]
    notes = [e for e in desc if e["target_type"] == "Note"]
    assert pushes and all("push_data" in e for e in pushes)
    assert notes and all(e["note"]["body"] for e in notes)


def test_after_and_before_are_exclusive_whole_days(api: httpx.Client,
                                                   sim: SimulatorThread) -> None:
    world = sim.sim.world
    today = datetime.fromtimestamp(world.ev_time[-1] / 1000, UTC).date()
    yesterday = today - timedelta(days=1)
    after = api.get("/users/2/events", params={"after": yesterday.isoformat(),
                                               "per_page": 100}).json()
    before = api.get("/users/2/events", params={"before": today.isoformat(),
                                                "per_page": 100}).json()
    assert after and all(e["created_at"][:10] == today.isoformat() for e in after)
    assert all(e["created_at"][:10] < today.isoformat() for e in before)


def test_filters_by_action_and_target_type(api: httpx.Client) -> None:
    pushed = api.get("/projects/1/events", params={"action": "pushed", "per_page": 100}).json()
    issues = api.get("/projects/1/events", params={"target_type": "issue",
                                                   "per_page": 100}).json()
    assert pushed and all(e["action_name"].startswith("pushed") for e in pushed)
    assert issues and all(e["target_type"] == "Issue" for e in issues)


def test_hidden_events_make_short_pages_that_are_not_the_last(api: httpx.Client) -> None:
    short_with_next = 0
    for pid in range(1, 11):
        page = 1
        while page and page < 50:
            r = api.get(f"/projects/{pid}/events", params={"per_page": 10, "page": page})
            if len(r.json()) < 10 and r.headers["x-next-page"]:
                short_with_next += 1
            page = int(r.headers["x-next-page"] or 0)
    assert short_with_next > 0


def test_projectless_events_only_in_user_lists(sim: SimulatorThread,
                                               api: httpx.Client) -> None:
    world = sim.sim.world
    projectless = [i for i in range(len(world.ev_time))
                   if world.ev_project[i] == 0 and world.visible(i)]
    assert projectless
    idx = projectless[0]
    author = world.ev_author[idx]
    ids = []
    url: str | None = f"/users/{author}/events"
    query: dict[str, object] | None = {"per_page": 100}
    for _ in range(30):
        if not url:
            break
        r = api.get(url, params=query)
        ids += [e["id"] for e in r.json()]
        url, query = parse_link(r.headers.get("link")).get("next"), None
    assert idx + 1 in ids


def test_last_activity_moves_at_most_once_per_interval() -> None:
    spec = WorldSpec(projects=1, users=1, events=0, activity_interval_s=3600)
    with running_simulator(spec) as s:
        world = s.sim.world
        base = int(time.time() * 1000)
        world.add_events(1, project_id=1, author_id=1, at_ms=base)
        first = world.project_last_activity_ms[0]
        world.add_events(1, project_id=1, author_id=1, at_ms=base + 1_800_000)
        assert world.project_last_activity_ms[0] == first == base
        world.add_events(1, project_id=1, author_id=1, at_ms=base + 3_700_000)
        assert world.project_last_activity_ms[0] == base + 3_700_000


# -- raw HTTP: auth, files, rate limits, faults -----------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"PRIVATE-TOKEN": "wrong"},
                                     {"Authorization": "Bearer wrong"}])
def test_bad_or_missing_tokens_get_401(sim: SimulatorThread, headers: dict[str, str]) -> None:
    r = httpx.get(f"{sim.url}/api/v4/projects", headers=headers)
    assert (r.status_code, r.json()) == (401, {"message": "401 Unauthorized"})


def test_bearer_and_query_tokens_work_and_query_use_is_counted(sim: SimulatorThread) -> None:
    before = httpx.get(f"{sim.url}/_simulator/stats").json()["token_in_query"]
    assert httpx.get(f"{sim.url}/api/v4/user",
                     headers={"Authorization": "Bearer sim-token"}).status_code == 200
    assert httpx.get(f"{sim.url}/api/v4/user?private_token=sim-token").status_code == 200
    after = httpx.get(f"{sim.url}/_simulator/stats").json()["token_in_query"]
    assert after == before + 1


def test_file_paths_must_be_encoded_exactly_once(api: httpx.Client) -> None:
    ok = api.get("/projects/2/repository/files/lib%2Fclass.rb", params={"ref": "main"})
    assert ok.status_code == 200 and ok.json()["file_path"] == "lib/class.rb"
    for bad in ("lib%252Fclass.rb", "lib/class.rb"):
        r = api.get(f"/projects/2/repository/files/{bad}", params={"ref": "main"})
        assert (r.status_code, r.json()) == (404, {"message": "404 File Not Found"})
    missing_ref = api.get("/projects/2/repository/files/README.md")
    assert missing_ref.status_code == 400


def test_file_head_gives_metadata_headers(api: httpx.Client) -> None:
    r = api.head("/projects/2/repository/files/src%2Fa%2Bb.py", params={"ref": "main"})
    assert r.status_code == 200
    assert r.headers["x-gitlab-file-path"] == "src/a+b.py"
    assert len(r.headers["x-gitlab-content-sha256"]) == 64


def test_job_artifacts_forms(api: httpx.Client) -> None:
    import io
    import zipfile

    latest = api.get("/projects/3/jobs/artifacts/feature%2Flogin-page/download",
                     params={"job": "build"})
    assert latest.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(latest.content)).namelist()
    assert "dist/app.jar" in names
    single = api.get("/projects/3/jobs/artifacts/main/raw/reports/junit.xml",
                     params={"job": "test"})
    assert single.status_code == 200 and b"reports/junit.xml" in single.content
    by_id = api.get("/projects/3/jobs/42/artifacts")
    assert by_id.headers["content-type"] == "application/zip"


def test_global_429_is_plain_text_with_headers_on_every_route() -> None:
    """Rack::Attack's authenticated limit; the bare per-endpoint 429s are in test_objects."""
    with running_simulator(SPEC, rate_limit=3) as s, httpx.Client(
            base_url=f"{s.url}/api/v4", headers=TOKEN) as client:
        def throttled(path: str) -> httpx.Response:
            for _ in range(20):
                r = client.get(path)
                if r.status_code == 429:
                    return r
            raise AssertionError("never throttled")

        for path in ("/projects/1/events", "/projects"):
            answer = throttled(path)
            assert answer.text == "Retry later"
            for name in ("retry-after", "ratelimit-limit", "ratelimit-name",
                         "ratelimit-observed", "ratelimit-remaining", "ratelimit-reset",
                         "ratelimit-resettime"):
                assert name in answer.headers


def test_route_budget_like_gitlab_com_listing_limit() -> None:
    from gitlab_producer.simulator.control import RouteBudget

    name, budget = RouteBudget.parse("projects_list=3/600")
    with running_simulator(SPEC, route_budgets={name: budget}) as s:
        codes = [httpx.get(f"{s.url}/api/v4/projects", headers=TOKEN).status_code
                 for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        assert httpx.get(f"{s.url}/api/v4/users", headers=TOKEN).status_code == 200


@pytest.mark.parametrize("kind,check", [
    ("html502", lambda r: r.status_code == 502 and "text/html" in r.headers["content-type"]),
    ("error500", lambda r: r.status_code == 500),
    ("truncated", lambda r: r.status_code == 200 and not r.text.rstrip().endswith("]")),
])
def test_fault_kinds(kind: str, check: object) -> None:
    with running_simulator(SPEC, fault_rate=1.0, fault_kinds=(kind,)) as s:
        r = httpx.get(f"{s.url}/api/v4/projects/1/events", headers=TOKEN)
        assert check(r)  # type: ignore[operator]


def test_dropped_connections() -> None:
    with running_simulator(SPEC, fault_rate=1.0, fault_kinds=("drop",)) as s, \
            pytest.raises(httpx.TransportError):
        httpx.get(f"{s.url}/api/v4/projects/1/events", headers=TOKEN)


def test_faults_are_reproducible_from_the_seed() -> None:
    def statuses() -> list[int]:
        with running_simulator(SPEC, fault_rate=0.5, fault_kinds=("error500",), seed=9) as s:
            return [httpx.get(f"{s.url}/api/v4/projects/1", headers=TOKEN).status_code
                    for _ in range(30)]

    assert statuses() == statuses()


def test_world_is_deterministic_from_the_seed() -> None:
    from gitlab_producer.simulator.world import World

    a, b = World(SPEC, now_ms=1_700_000_000_000), World(SPEC, now_ms=1_700_000_000_000)
    assert a.truth() == b.truth()
    assert [a.render(i) for i in range(50)] == [b.render(i) for i in range(50)]


def test_live_mode_adds_events(sim: SimulatorThread) -> None:
    start = len(sim.sim.world.ev_time)
    httpx.post(f"{sim.url}/_simulator/settings", json={"live_rate": 200})
    try:
        wait_until(lambda: len(sim.sim.world.ev_time) >= start + 50, 5, "50 live events",
                   interval_s=0.05)
    finally:
        httpx.post(f"{sim.url}/_simulator/settings", json={"live_rate": 0})


def test_stats_count_routes_and_busiest_second(sim: SimulatorThread) -> None:
    httpx.post(f"{sim.url}/_simulator/stats/reset")
    for _ in range(5):
        httpx.get(f"{sim.url}/api/v4/projects/1/events", headers=TOKEN)
    snap = httpx.get(f"{sim.url}/_simulator/stats").json()
    assert snap["by_route"]["project_events"]["200"] == 5
    assert 1 <= snap["max_per_second"] <= 5


def test_webhook_sender_retries_with_the_same_idempotency_key(sim: SimulatorThread) -> None:
    from aiohttp import web

    from gitlab_producer.simulator.server import free_port

    received: list[dict[str, str]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(dict(request.headers))
        return web.Response(status=503 if len(received) == 1 else 200)

    import asyncio
    import threading

    port = free_port()
    loop = asyncio.new_event_loop()

    async def serve() -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    runner = loop.run_until_complete(serve())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        r = httpx.post(f"{sim.url}/_simulator/webhooks", timeout=30, json={
            "url": f"http://127.0.0.1:{port}/hook", "kinds": ["push"], "token": "hook-secret",
            "retry_delay_s": 0.05})
        delivery = r.json()["deliveries"][0]
        assert delivery["attempts"] == [503, 200] and delivery["delivered"]
        first, second = received
        assert first["Idempotency-Key"] == second["Idempotency-Key"]
        assert first["X-Gitlab-Webhook-UUID"] != second["X-Gitlab-Webhook-UUID"]
        assert first["X-Gitlab-Event"] == "Push Hook"
        assert first["X-Gitlab-Token"] == "hook-secret"
        assert first["User-Agent"].startswith("GitLab/")
        assert urlparse(first["X-Gitlab-Instance"]).scheme == "https"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()
