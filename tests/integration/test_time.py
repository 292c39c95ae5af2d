"""GitLab's time zone and clock, end to end: simulator -> service process -> Redis + broker.

The simulator runs as its own process with its clock moved by Debian's ``faketime``, so that
every test puts GitLab at the hour (and the skew) it needs, whatever the hour it runs at.
"""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import (
    Broker,
    ServiceRun,
    consume,
    simulator_process,
)

pytestmark = pytest.mark.integration

SIM_ARGS = ("--projects", "40", "--users", "10", "--events", "800", "--history-days", "1",
            "--seed", "23")
UTC_MINUS_8 = -8 * 3600


def configure(service_env: ServiceRun, sim_url: str, since_ms: int, broker: Broker,
              redis_address: str, prefix: str) -> str:
    topic = f"events-{uuid.uuid4().hex[:8]}"
    service_env.env.update({
        "GITLAB_BASE_URL": f"{sim_url}/api/v4", "GITLAB_PRIVATE_TOKEN": "sim-token",
        "SYNC_SINCE": datetime.fromtimestamp(since_ms / 1000, UTC).isoformat(),
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_TOPIC": topic,
        "REDIS_ADDRESS": redis_address, "REDIS_KEY_PREFIX": prefix,
        "USER_RESYNC_INTERVAL": "0",
    })
    return topic


def truth(url: str) -> list[list[int]]:
    """(id, project_id, author_id, created_ms) of every visible event."""
    rows: list[list[int]] = httpx.get(f"{url}/_simulator/truth", params={"times": 1},
                                      timeout=30).json()["events"]
    return rows


def event_ids(messages: list[object]) -> Counter[int]:
    return Counter(int(orjson.loads(m.value())["id"]) for m in messages)  # type: ignore[attr-defined]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def metric(service_env: ServiceRun, name: str) -> float | None:
    """The service's gauge ``name`` now (None while it is not up yet, or has no such gauge)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{service_env.env['METRICS_PORT']}/metrics",
                         timeout=10).text
    except httpx.TransportError:
        return None
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def live_run(service_env: ServiceRun, sim_url: str, topic: str, broker: Broker,
             live_until: Callable[[], bool], live_s: float = 90.0) -> tuple[set[int], Counter[int]]:
    """Run the service while the simulator creates live events until ``live_until()``;
    then stop them, let the service catch up, stop it. Returns (truth ids, delivered ids)."""
    proc = service_env.start("run")
    try:
        httpx.post(f"{sim_url}/_simulator/settings", json={"live_rate": 25}, timeout=10)
        wait_until(live_until, live_s, "live events")
        httpx.post(f"{sim_url}/_simulator/settings", json={"live_rate": 0}, timeout=10)
        expected = {row[0] for row in truth(sim_url)}
        # Every event arrives within a few rounds (poll interval 1 s), or the test fails.
        got = event_ids(consume(broker.bootstrap, topic, len(expected), timeout_s=60,
                                settle_s=3))
        assert proc.poll() is None, service_env.all_logs()[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    return expected, got


def assert_all_once(expected: set[int], got: Counter[int], service_env: ServiceRun) -> None:
    missing = sorted(expected - set(got))
    assert not missing, f"{len(missing)} of {len(expected)} events never arrived: " \
                        f"{missing[:20]} ...\n{service_env.all_logs()[-2000:]}"
    assert set(got) == expected
    assert max(got.values()) == 1


def gitlab_moved_back_to(hour: int, minute: int, second: int) -> tuple[datetime, float]:
    """The latest past instant at that UTC time of day, and how far back that is."""
    now = datetime.now(UTC)
    start = now.replace(hour=hour, minute=minute, second=second, microsecond=0)
    if start > now - timedelta(seconds=2):
        start -= timedelta(days=1)
    return start, (now - start).total_seconds()


# More users than projects in the evening: no round covers warm projects by reading every
# recent user, so events outside projects arrive only if the users' day rule is right.
EVENING_ARGS = ("--projects", "8", "--users", "30", "--events", "800", "--history-days", "1",
                "--seed", "31")


@pytest.mark.parametrize("utc_start,sim_args", [((7, 59, 35), SIM_ARGS),
                                                ((3, 0, 0), EVENING_ARGS)],
                         ids=["midnight", "evening"])
def test_server_at_utc_minus_8(
    service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str,
    tmp_path: Path, utc_start: tuple[int, int, int], sim_args: tuple[str, ...],
) -> None:
    # GitLab at UTC-8, its clock moved back to an hour when its date is the day before the UTC
    # date: to 23:59:35 there (07:59:35 UTC), so that its midnight falls inside the test with
    # live events on both sides of it (they start within a few seconds, 25 a second: some 500
    # before midnight, 150 after); or to 19:00 there (03:00 UTC), so that its date stays the
    # same all along while UTC's day has long begun, and users' days must not be taken as
    # ended. (The service keeps the real clock: it follows GitLab's, from the Date header.)
    start, back_s = gitlab_moved_back_to(*utc_start)
    local_midnight_ms = int((start.replace(hour=8, minute=0, second=0)).timestamp() * 1000)
    crossing = utc_start[0] == 7
    with simulator_process(tmp_path / "sim.log", *sim_args,
                           "--utc-offset=-08:00", clock_shift_s=-back_s) as sim:
        info = sim.get("/_simulator/stats")
        assert info["utc_offset_s"] == UTC_MINUS_8
        topic = configure(service_env, sim.url, info["start_ms"], broker, redis_address,
                          redis_prefix)
        first_live = int(info["events"])

        def live_enough() -> bool:
            if crossing:
                live_rows = [row for row in truth(sim.url) if row[0] > first_live]
                after = sum(1 for row in live_rows if row[3] >= local_midnight_ms)
                return after >= 150 and len(live_rows) >= 600
            return int(sim.get("/_simulator/stats")["events"]) >= first_live + 600

        expected, got = live_run(service_env, sim.url, topic, broker, live_enough)
        rows = truth(sim.url)
    live = [row for row in rows if row[0] > first_live]
    projectless = [row for row in live if row[1] is None]
    assert len(live) > 500 and len(projectless) > 10  # also events only users' lists show
    if crossing:  # live events on both sides of the server's midnight
        assert sum(1 for row in live if row[3] < local_midnight_ms) > 100
        assert sum(1 for row in live if row[3] >= local_midnight_ms) > 100
    assert_all_once(expected, got, service_env)


def test_service_clock_15_minutes_ahead_of_gitlab(
    service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str,
    tmp_path: Path,
) -> None:
    # GitLab's clock 15 minutes behind the service's (the service's is ahead).
    with simulator_process(tmp_path / "sim.log", *SIM_ARGS,
                           clock_shift_s=-900) as sim:
        info = sim.get("/_simulator/stats")
        topic = configure(service_env, sim.url, info["start_ms"], broker, redis_address,
                          redis_prefix)
        first_live = int(info["events"])
        seen: list[float] = []

        def enough_live() -> bool:
            skew = metric(service_env, "gitlab_producer_gitlab_clock_skew_seconds")
            if skew is not None:
                seen.append(skew)
            return int(sim.get("/_simulator/stats")["events"]) >= first_live + 400

        expected, got = live_run(service_env, sim.url, topic, broker, enough_live)
    assert len(expected) > 1100  # live events really happened
    assert_all_once(expected, got, service_env)
    assert seen and 895 <= seen[-1] <= 905
    logs = [orjson.loads(line) for line in service_env.all_logs().splitlines()
            if line.startswith("{")]
    warnings = [entry for entry in logs if entry.get("event") == "gitlab_clock_skew"]
    assert warnings and 895 <= warnings[0]["skew_s"] <= 905


def test_service_clock_behind_gitlab(
    service_env: ServiceRun, broker: Broker, redis_address: str, redis_prefix: str,
    tmp_path: Path,
) -> None:
    # GitLab's clock 15 minutes ahead of the service's.
    with simulator_process(tmp_path / "sim.log", *SIM_ARGS, clock_shift_s=900) as sim:
        info = sim.get("/_simulator/stats")
        topic = configure(service_env, sim.url, info["start_ms"], broker, redis_address,
                          redis_prefix)
        first_live = int(info["events"])
        seen: list[float] = []

        def enough_live() -> bool:
            skew = metric(service_env, "gitlab_producer_gitlab_clock_skew_seconds")
            if skew is not None:
                seen.append(skew)
            return int(sim.get("/_simulator/stats")["events"]) >= first_live + 400

        expected, got = live_run(service_env, sim.url, topic, broker, enough_live)
    assert len(expected) > 1100
    assert_all_once(expected, got, service_env)
    assert seen and -905 <= seen[-1] <= -895
