"""A library's standard-library log line (SAQ's "Failed to consume message" with a traceback,
logged hundreds of times while Redis restarts) is one JSON line, scrubbed like the service's."""

from __future__ import annotations

import json
import subprocess
import sys

# In a process of its own: configure() sets the process-wide logging.
SCRIPT = """
import logging
from gitlab_producer.logs import configure
configure("info").add_secret("hunter2-secret")
try:
    raise ConnectionError("Error 111 connecting with hunter2-secret")
except ConnectionError:
    logging.getLogger("saq.queue.redis").exception("Failed to consume message")
logging.getLogger("saq.worker").info("an info line of a library stays out")
"""


def test_a_library_log_line_is_one_scrubbed_json_line() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=30, check=True)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    line = json.loads(lines[0])
    assert line["event"] == "Failed to consume message" and line["level"] == "error"
    assert line["logger"] == "saq.queue.redis" and "ConnectionError" in line["exception"]
    assert "hunter2" not in lines[0]
