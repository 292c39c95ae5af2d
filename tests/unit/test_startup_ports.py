"""The start-up port reservations: bound at once (one in use names its variable), refusing
connections until their server is ready."""

from __future__ import annotations

import socket

import pytest
from aiohttp import web

from gitlab_producer.config import ConfigError
from gitlab_producer.startup import Ports


def connects(port: int) -> bool:
    with socket.socket() as client:
        client.settimeout(2)
        return client.connect_ex(("127.0.0.1", port)) == 0


def test_a_port_in_use_names_its_variable() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"^LOG_PORT: port {port} is already in use$"):
            Ports.bind("127.0.0.1", [("METRICS_PORT", 0), ("LOG_PORT", port)])


async def test_a_reserved_port_is_served_only_once_its_server_starts() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ports = Ports.bind("127.0.0.1", [("WEBHOOK_PORT", port)])
    runner = web.AppRunner(web.Application())
    try:
        assert not connects(port)  # reserved, not yet open: a client sees it closed
        await runner.setup()
        await ports.serve(runner, port, "WEBHOOK_PORT")
        assert connects(port)
        with pytest.raises(ConfigError, match=f"^METRICS_PORT: port {port} is already in use"):
            Ports.bind("127.0.0.1", [("METRICS_PORT", port)])
    finally:
        await runner.cleanup()
        ports.close()
