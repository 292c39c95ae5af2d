"""JSON logs (structlog) with a level that can be changed while the service runs.

Known secrets (every secret setting, the passwords inside configured URLs) are scrubbed from
every log line, however deeply nested (lists, dicts, exception texts), and credentials inside
any URL are masked: a last line of defence; code never logs them on purpose.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from gitlab_producer.redaction import mask_userinfo

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


class LogControl:
    """The current level and the secrets to scrub; shared by the logger and the HTTP API."""

    def __init__(self, level: str = "info") -> None:
        self.level = level
        self._secrets: list[str] = []

    @property
    def level(self) -> str:
        return self._level

    @level.setter
    def level(self, value: str) -> None:
        if value not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}")
        self._level = value
        self._threshold = LEVELS[value]

    def add_secret(self, secret: str) -> None:
        if secret and len(secret) >= 4 and secret not in self._secrets:
            self._secrets.append(secret)
            self._secrets.sort(key=len, reverse=True)  # a longer secret may contain a shorter

    def filter(self, _: Any, method: str, event: MutableMapping[str, Any]
               ) -> MutableMapping[str, Any]:
        if LEVELS.get(method, logging.INFO) < self._threshold:
            raise structlog.DropEvent
        return event

    def scrub(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event.items():
            event[key] = self._clean(value)
        return event

    def _clean(self, value: Any) -> Any:
        """``value`` without secrets or URL credentials, however deeply nested."""
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {self._clean(k): self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._clean(v) for v in value]
        text = value if isinstance(value, str) else str(value)  # exceptions, paths, ...
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return mask_userinfo(text)


CONTROL = LogControl()


class _LibraryLogs(logging.Handler):
    """Libraries' standard-library log records (SAQ, aiohttp, redis-py) as the service's own
    JSON lines, scrubbed like every other: without it Python's last-resort handler prints
    them as plain text with multi-line tracebacks."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            method = record.levelname.lower()
            log = structlog.get_logger(record.name)
            getattr(log, method if method in LEVELS else "error")(
                record.getMessage(), logger=record.name,
                exc_info=record.exc_info if record.exc_info else None)
        except Exception:  # a log line must never break the caller
            self.handleError(record)


def configure(level: str = "info") -> LogControl:
    """Set up JSON logging to stderr at ``level``."""
    CONTROL.level = level
    structlog.configure(
        processors=[
            CONTROL.filter,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            CONTROL.scrub,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    if not any(isinstance(h, _LibraryLogs) for h in root.handlers):
        root.addHandler(_LibraryLogs(logging.WARNING))
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    return CONTROL


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
