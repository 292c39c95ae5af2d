"""The simulator as a GitLab whose ``time_zone`` is not UTC: timestamps with their offset,
``after``/``before`` as the server's days, ``last_activity_on`` as the server's date."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone

import httpx
import pytest

from gitlab_producer.simulator.server import SimulatorThread, running_simulator
from gitlab_producer.simulator.world import World, WorldSpec, iso_ms, parse_utc_offset

OFFSET_S = -8 * 3600
SERVER_ZONE = timezone(timedelta(seconds=OFFSET_S))
SPEC = WorldSpec(projects=10, users=4, events=3000, seed=5, history_days=3.0,
                 hidden_share=0.0, utc_offset_s=OFFSET_S)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    with running_simulator(SPEC) as running:
        yield running


def get(sim: SimulatorThread, path: str, **params: object) -> httpx.Response:
    return httpx.get(f"{sim.url}/api/v4{path}", params=params,  # type: ignore[arg-type]
                     headers={"PRIVATE-TOKEN": "sim-token"}, timeout=10)


def all_events(sim: SimulatorThread, user: int, **params: object) -> list[dict[str, object]]:
    found, page = [], 1
    while True:
        response = get(sim, f"/users/{user}/events", per_page=100, page=page, **params)
        found += response.json()
        if not response.headers.get("x-next-page"):
            return found
        page = int(response.headers["x-next-page"])


def test_timestamps_carry_the_servers_offset(sim: SimulatorThread) -> None:
    events = all_events(sim, 1)
    assert events and all(str(e["created_at"]).endswith("-08:00") for e in events)
    truth = {i + 1: t for i, t in enumerate(sim.sim.world.ev_time)}
    for event in events[:50]:
        parsed = datetime.fromisoformat(str(event["created_at"]))
        assert parsed.timestamp() * 1000 == truth[int(str(event["id"]))]
    project = get(sim, "/projects/1").json()
    assert project["last_activity_at"].endswith("-08:00")


def test_after_and_before_are_the_servers_days(sim: SimulatorThread) -> None:
    every = all_events(sim, 2)
    local_days = sorted({datetime.fromisoformat(str(e["created_at"])).astimezone(SERVER_ZONE)
                         .date() for e in every})
    day = local_days[len(local_days) // 2]
    after = all_events(sim, 2, after=day.isoformat())
    before = all_events(sim, 2, before=day.isoformat())
    local = {int(str(e["id"])): datetime.fromisoformat(str(e["created_at"])).astimezone(
        SERVER_ZONE).date() for e in every}
    assert {int(str(e["id"])) for e in after} == {i for i, d in local.items() if d > day}
    assert {int(str(e["id"])) for e in before} == {i for i, d in local.items() if d < day}
    # The UTC reading of the same dates would differ: the test tells the two apart.
    utc = {int(str(e["id"])): datetime.fromisoformat(str(e["created_at"])).astimezone(UTC)
           .date() for e in every}
    assert {i for i, d in utc.items() if d > day} != {int(str(e["id"])) for e in after}


def test_last_activity_on_is_the_servers_date(sim: SimulatorThread) -> None:
    world = sim.sim.world
    for user in get(sim, "/users", per_page=100).json():
        uid = int(user["id"])
        newest = max(world.ev_time[i] for i in world.user_events[uid - 1])
        expected = datetime.fromtimestamp(newest / 1000, SERVER_ZONE).date()
        assert date.fromisoformat(user["last_activity_on"]) == expected


def test_a_server_day_crossing_moves_last_activity_on() -> None:
    # 23:59 at UTC-8 is 07:59 UTC: an event a minute later is on the next server day.
    world = World(WorldSpec(projects=1, users=1, events=0, utc_offset_s=OFFSET_S))
    midnight = int(datetime(2026, 3, 11, 8, 0, tzinfo=UTC).timestamp() * 1000)
    world.add_events(1, 1, 1, at_ms=midnight - 60_000)
    assert world.render_date(world.user_last_activity_ms[0]) == "2026-03-10"
    world.add_events(1, 1, 1, at_ms=midnight)
    assert world.render_date(world.user_last_activity_ms[0]) == "2026-03-11"


def test_offsets_render_and_parse() -> None:
    at = int(datetime(2026, 12, 1, 5, 43, 19, 667_000, tzinfo=UTC).timestamp() * 1000)
    assert iso_ms(at) == "2026-12-01T05:43:19.667Z"
    assert iso_ms(at, 3 * 3600) == "2026-12-01T08:43:19.667+03:00"
    assert iso_ms(at, -8 * 3600) == "2026-11-30T21:43:19.667-08:00"
    assert iso_ms(at, 5 * 3600 + 45 * 60) == "2026-12-01T11:28:19.667+05:45"
    assert [parse_utc_offset(t) for t in ("Z", "+03:00", "-08:00", "+0545", "+14:00")] == [
        0, 10_800, -28_800, 20_700, 50_400]
    for bad in ("+15:00", "-13:00", "8", "+03:75"):
        with pytest.raises(ValueError):
            parse_utc_offset(bad)
