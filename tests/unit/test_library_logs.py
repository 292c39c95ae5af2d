"""A library's standard-library log line (SAQ's "Failed to consume message" with a traceback,
logged hundreds of times while Redis restarts) is one JSON line, scrubbed like the service's."""

from __future__ import annotations

import json
import logging

import pytest

from gitlab_producer.logs import configure


def test_a_library_log_line_is_one_scrubbed_json_line(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    configure("info").add_secret("hunter2-secret")
    try:
        raise ConnectionError("Error 111 connecting with hunter2-secret")
    except ConnectionError:
        logging.getLogger("saq.queue.redis").exception("Failed to consume message")
    logging.getLogger("saq.worker").info("an info line of a library stays out")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    line = json.loads(lines[0])
    assert line["event"] == "Failed to consume message" and line["level"] == "error"
    assert line["logger"] == "saq.queue.redis" and "ConnectionError" in line["exception"]
    assert "hunter2" not in lines[0]
