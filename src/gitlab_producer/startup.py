"""Start-up checks shared by every command (``run``, ``backfill``, ``worker``, ``status``,
``instances``, ``capture``): what a bad configuration makes fail fails at once, before GitLab
is asked anything, as a :class:`ConfigError` naming the variable (the CLI: exit 2, one line).

- The listening ports (``METRICS_PORT``, ``LOG_PORT``, ``WEBHOOK_PORT``) are bound here and
  held until their servers start on them: one in use is an error naming its variable. A port
  is bound, not yet listening: until its server is ready, connections are refused (a client
  that sees the port open may use it). Two processes binding one port at the same instant
  may both pass (SO_REUSEADDR); the second to listen then fails with the same error.
- Redis is asked once (connect, ``AUTH``, ``SELECT``): a password it refuses
  (``REDIS_PASSWORD``) or a database it does not have (``REDIS_DB``) is an error; a Redis that
  does not answer is an outage, left to the caller (the service waits it out).

Kafka is not asked here: a broker that does not answer is an outage, not a setting (sends wait
up to ``KAFKA_DELIVERY_TIMEOUT``, then the round fails and is repeated; cursors and marks move
only after Kafka acknowledged, so nothing is lost), and ``/readyz`` names the sink meanwhile.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from gitlab_producer.config import ConfigError, Settings

REDIS_CHECK_TIMEOUT_S = 3.0  # one try; a Redis slower than that is treated as not answering


class Ports:
    """Listening sockets bound at start, by port, until :meth:`serve` hands them to a server
    (or :meth:`close` releases them)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._bound: dict[int, tuple[str, socket.socket]] = {}

    @classmethod
    def bind(cls, host: str, wanted: Sequence[tuple[str, int]]) -> Ports:
        """Bind each ``(variable, port)`` (0: off; a port twice: once); listening begins
        when :meth:`serve` hands its socket to a server."""
        ports = cls(host)
        try:
            for variable, port in wanted:
                if port and port not in ports._bound:
                    ports._bound[port] = (variable, _bind(host, port, variable))
        except ConfigError:
            ports.close()
            raise
        return ports

    async def serve(self, runner: web.AppRunner, port: int, variable: str) -> None:
        """Serve ``runner`` on ``port``: on its reserved socket, else bound now."""
        reserved = self._bound.pop(port, None)
        sock = reserved[1] if reserved is not None else _bind(self.host, port, variable)
        try:
            await web.SockSite(runner, sock).start()
        except OSError as exc:
            sock.close()
            raise ConfigError(_port_error(variable, port, exc)) from None

    def close(self) -> None:
        """Release the sockets no server took."""
        for _variable, sock in self._bound.values():
            sock.close()
        self._bound.clear()


def service_ports(settings: Settings, webhooks: bool) -> list[tuple[str, int]]:
    """The ``(variable, port)`` pairs a command listens on."""
    wanted = [("METRICS_PORT", settings.metrics_port), ("LOG_PORT", settings.log_port)]
    if webhooks:
        wanted.append(("WEBHOOK_PORT", settings.webhook_port))
    return wanted


def _port_error(variable: str, port: int, exc: OSError) -> str:
    reason = "is already in use" if exc.errno == errno.EADDRINUSE else (
        f"cannot be opened: {exc.strerror or exc}")
    return f"{variable}: port {port} {reason}"


def _bind(host: str, port: int, variable: str) -> socket.socket:
    # SO_REUSEADDR as asyncio's servers (a restart is not kept off by the last one's
    # TIME_WAIT connections); a port someone listens on still fails here. The settings keep
    # WEBHOOK_PORT apart from the other two, so no two sockets here share a port.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(_port_error(variable, port, exc)) from None
    sock.setblocking(False)
    return sock


def refused_password(settings: Settings) -> str:
    """The message for credentials Redis refuses (no secret in it)."""
    if settings.redis_endpoint[2]:
        return "REDIS_PASSWORD: the Redis server refuses it (WRONGPASS)"
    return "REDIS_PASSWORD: the Redis server requires a password and none is set (NOAUTH)"


def refused_database(settings: Settings) -> str:
    return (f"REDIS_DB: the Redis server refuses database {settings.redis_db} (see its "
            f"'databases' setting)")


def redis_refusal(settings: Settings, exc: BaseException) -> ConfigError | None:
    """The configuration error behind a Redis error, None for an outage."""
    if isinstance(exc, AuthenticationError) or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
        return ConfigError(refused_password(settings))
    if "DB index is out of range" in str(exc) or "invalid DB index" in str(exc):
        return ConfigError(refused_database(settings))
    return None


async def check_redis(settings: Settings) -> bool:
    """Connect to ``REDIS_ADDRESS`` once (``AUTH``, ``SELECT``, ``PING``): True when it
    answered, False when it did not (an outage); a refusal raises :class:`ConfigError`."""
    host, port, password = settings.redis_endpoint
    client = aioredis.Redis(host=host, port=port, password=password or None,
                            db=settings.redis_db, socket_timeout=REDIS_CHECK_TIMEOUT_S,
                            socket_connect_timeout=REDIS_CHECK_TIMEOUT_S,
                            retry=Retry(NoBackoff(), 0))
    try:
        await client.ping()
    except (ResponseError, AuthenticationError) as exc:
        refusal = redis_refusal(settings, exc)
        if refusal is not None:
            raise refusal from None
        return True  # it answered; what it said is the caller's to meet
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()
    return True


async def start_checks(settings: Settings, ports: Sequence[tuple[str, int]] = (),
                       host: str = "0.0.0.0", *, needs_redis: bool = False) -> Ports:
    """Every command's start: ``ports`` bound (returned, to serve on), Redis asked once.
    ``needs_redis``: the command cannot work without ``REDIS_ADDRESS``."""
    if needs_redis and not settings.redis_address:
        raise ConfigError("REDIS_ADDRESS: empty (this command works on a Redis)")
    bound = Ports.bind(host, ports)
    try:
        if settings.redis_address:
            await check_redis(settings)
    except BaseException:
        bound.close()
        raise
    return bound
