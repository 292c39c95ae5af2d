"""The README's first command: the demo runs end to end and checks itself."""

from __future__ import annotations

import pytest

from tests.conftest import ServiceRun

pytestmark = pytest.mark.integration


def test_demo_delivers_everything_once(service_env: ServiceRun) -> None:
    done = service_env.run("demo", "--rounds", "2", "--out", str(service_env.cwd / "demo"),
                           timeout_s=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "missing 0; duplicates 0" in done.stdout
    assert "of 21 kinds from 10 projects" in done.stdout  # the backfill part: every kind
    assert "missing 0; doubled 0" in done.stdout
    assert done.stdout.count("| complete") == 3  # two rounds and the catch-up round
    assert (service_env.cwd / "demo" / "events.jsonl").stat().st_size > 0
