"""A redis-server of the engine tests' own, on a free loopback port (SAQ has no in-memory mode,
and these tests kill workers mid-job, so they must not share the machine's Redis)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from gitlab_producer.simulator.server import free_port, wait_for_port


@pytest.fixture(scope="module")
def own_redis() -> Iterator[str]:
    """``redis://127.0.0.1:<port>`` of a fresh redis-server, stopped after the module."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (make test installs it)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
