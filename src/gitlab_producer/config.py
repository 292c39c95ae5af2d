"""Configuration: ``configs/conf.yaml`` overridden by environment variables of the same names.

Every setting is read from the environment under its upper-case name (seed 000's table:
``SCHEDULING_POLL_INTERVAL``, ``GITLAB_BASE_URL``, ...). In the YAML file the same names are
used, in either case. A bad value raises :class:`ConfigError` naming the variable.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import unquote, urlparse

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from gitlab_producer.artifact_paths import relative_path
from gitlab_producer.gitlab.calendar import utc_day_start
from gitlab_producer.gitlab.pagination import DEFAULT_MAX_PAGES
from gitlab_producer.redaction import host_port, mask_userinfo, url_passwords

DEFAULT_CONFIG_PATH = Path("configs/conf.yaml")
MIN_UPLOAD_TOKEN_CHARS = 16
LogLevel = Literal["debug", "info", "warning", "error"]
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_TOPIC_RE = re.compile(r"[a-zA-Z0-9._-]{1,239}")
_OBJECT_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{1,223}")
_PATH_RE = re.compile(r"[A-Za-z0-9._/-]{1,200}")
_HOST_RE = re.compile(r"[A-Za-z0-9._-]{1,253}")
_NAMED_RE = re.compile(r"[A-Z][A-Z0-9_]*: ")  # a message that names its variable itself
DAY_S = 86_400
MIB = 1024 * 1024
MAX_REDIS_DB = 1023  # Redis has 16 by default (its "databases" setting)


class ArtifactRule(BaseModel):
    """Artifacts of a job to keep when that job succeeds at a captured commit."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    job: str = Field(min_length=1)

    @field_validator("job")
    @classmethod
    def _stored_safely(cls, value: str) -> str:
        relative_path(f"artifacts/{value}.zip")  # where its archive is stored
        return value


class CaptureRule(BaseModel):
    """Files and artifacts to capture when someone pushes to ``branch`` of ``project``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    project: str = Field(min_length=1, description="numeric id or full path")
    branch: str | None = Field(None, description="default: the project's default branch")
    files: tuple[str, ...] = ()
    artifacts: tuple[ArtifactRule, ...] = ()

    @field_validator("files")
    @classmethod
    def _relative(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for path in value:
            relative_path(path)
        return value


class ConfigError(Exception):
    """An invalid or missing setting; the message is one line naming the variable."""


class Settings(BaseSettings):
    """Typed, frozen settings. Units are in the names' docs: seconds unless said otherwise."""

    model_config = SettingsConfigDict(frozen=True, case_sensitive=False, extra="forbid",
                                      allow_inf_nan=False)

    # -- seed 000's variables (names kept exactly) ------------------------------------------
    scheduling_poll_interval: float = Field(30.0, ge=0, le=DAY_S,
                                            description="seconds between rounds")
    gitlab_base_url: str = Field(description="GitLab API URL, e.g. https://gitlab.example.com/api/v4")
    gitlab_private_token: SecretStr = Field(description="token sent in the PRIVATE-TOKEN header")
    gitlab_per_page_pagination: int = Field(100, ge=1, le=100)
    kafka_bootstrap_servers: str = Field("", description="empty: events go to OUTPUT_FILE")
    kafka_topic: str = Field("data-bus.gitlab.events", min_length=1)
    kafka_login: str = ""
    kafka_password: SecretStr = SecretStr("")
    cache_ttl: int = Field(1440, ge=1, le=366 * 24 * 60,
                           description="minutes an event id stays marked as sent")
    operations_per_second: float = Field(10.0, ge=0.01, le=10_000,
                                         description="GitLab requests per second")
    metrics_port: int = Field(9000, ge=0, le=65535)
    metrics_url: str = "metrics"
    redis_address: str = Field("", description="host:port; empty: embedded SQLite store")
    redis_password: SecretStr = SecretStr("")
    log_port: int = Field(8002, ge=0, le=65535)
    log_level: LogLevel = "info"
    log_level_token: SecretStr = Field(SecretStr(""), description="required by PUT /log_level")

    # -- additions, same style ---------------------------------------------------------------
    sync_since: datetime | None = Field(None, description="where the very first round starts")
    sync_users: bool = True
    sync_overlap: float = Field(300.0, ge=0, le=DAY_S,
                                description="seconds re-read behind each cursor")
    project_activity_lag: float = Field(3600.0, ge=0, le=7 * DAY_S,
                                        description="GitLab's last_activity_at lag")
    user_resync_interval: float = Field(600.0, ge=0, le=DAY_S,
                                        description="re-read of users active today")
    gitlab_concurrency: int = Field(8, ge=1, le=64, description="entities synced at once")
    gitlab_timeout: float = Field(30.0, ge=0.1, le=600, description="seconds per GitLab request")
    gitlab_max_retries: int = Field(6, ge=0, le=20)
    gitlab_rate_limit_retries: int = Field(30, ge=0, le=1000,
                                           description="429s tolerated per request")
    gitlab_max_body: int = Field(16 * MIB, ge=64 * 1024, le=1024 * MIB,
                                 description="bytes of one GitLab answer held in memory")
    gitlab_max_pages: int = Field(DEFAULT_MAX_PAGES, ge=1, le=1_000_000,
                                  description="pages per list at most")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_security_protocol: Literal["", "PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = ""
    kafka_delivery_timeout: float = Field(300.0, ge=1, le=DAY_S,
                                          description="seconds before a send fails")
    kafka_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    kafka_message_max_bytes: int = Field(
        1_000_000, ge=1000, le=1_000_000_000,
        description="bytes of one record at most (librdkafka's message.max.bytes)")
    redis_db: int = Field(0, ge=0, le=MAX_REDIS_DB)
    redis_key_prefix: str = "gitlab-producer:"
    state_path: Path = Path("var/state.sqlite3")
    output_file: str = Field("-", description="file sink path when no Kafka; '-' is stdout")
    source_instance: str = Field("", description="instance name in message headers")
    shutdown_grace: float = Field(8.0, ge=0, le=300,
                                  description="seconds to finish in-flight work")

    # -- real-time path: webhooks and captured files ------------------------------------------
    webhook_port: int = Field(0, ge=0, le=65535, description="0: no webhook receiver")
    webhook_secret: SecretStr = SecretStr("")
    webhook_signing_token: SecretStr = SecretStr("")
    webhook_max_body: int = Field(25 * MIB, ge=1024, le=256 * MIB)
    webhook_max_skew: float = Field(300.0, ge=1, le=DAY_S,
                                    description="seconds a signature stays valid")
    webhook_body_timeout: float = Field(3.0, ge=0.1, le=600,
                                        description="seconds a body may take: 408")
    webhook_header_timeout: float = Field(10.0, ge=0.1, le=600,
                                          description="seconds a request's headers may take")
    webhook_max_connections: int = Field(1024, ge=1, le=100_000,
                                         description="connections to WEBHOOK_PORT at once")
    webhook_max_inflight_bytes: int = Field(
        64 * MIB, ge=1024, le=64 * 1024 * MIB,
        description="bytes of hook bodies held at once, all requests")
    webhook_delivery_timeout: float = Field(
        5.0, ge=0.1, le=600,
        description="seconds Kafka may take to acknowledge a hook before a 503")
    kafka_webhook_topic: str = Field("", description="default: <KAFKA_TOPIC>.hooks")
    kafka_artifact_topic: str = Field("", description="default: <KAFKA_TOPIC>.artifacts")
    artifact_store_url: str = "file://var/artifacts"
    artifact_upload_token: SecretStr = SecretStr("")
    artifact_max_bytes: int = Field(2 * 1024 * MIB, ge=1, le=1024**4,
                                    description="largest upload, in bytes")
    artifact_idle_timeout: float = Field(60.0, ge=0.1, le=3600,
                                         description="seconds an upload may send nothing")
    capture_rules: tuple[CaptureRule, ...] = ()

    # -- full-history object import (gitlab-producer backfill / worker / status) --------------
    backfill_projects: str = Field("", description="ids, paths or group paths; empty: all")
    backfill_kinds: str = Field("", description="kinds to import (comma-separated); empty: all")
    kafka_object_topic_prefix: str = Field("data-bus.gitlab", min_length=1,
                                           description="objects go to <prefix>.<kind>")
    backfill_attachments: bool = Field(False, description="stage 9: store markdown uploads")
    backfill_concurrency: int = Field(8, ge=1, le=256, description="jobs run at once per process")
    backfill_job_timeout: int = Field(3600, ge=10, le=7 * DAY_S,
                                      description="seconds one job may run")
    backfill_job_heartbeat: int = Field(60, ge=2, le=3600,
                                        description="seconds before a silent job is swept")
    backfill_job_attempts: int = Field(3, ge=1, le=20,
                                       description="tries of a job before it counts as failed")
    backfill_waiter_interval: float = Field(1.0, ge=0.05, le=600,
                                            description="seconds between a waiter's looks")
    object_version_ttl: int = Field(90 * DAY_S, ge=3600, le=3660 * DAY_S,
                                    description="seconds a produced version stays marked")
    user_cache_ttl: int = Field(DAY_S, ge=60, le=30 * DAY_S,
                                description="seconds a user lookup stays cached")
    sync_objects: bool = Field(False, description="run: backfill, then keep objects current")
    object_sweep_interval: int = Field(DAY_S, ge=0, le=366 * DAY_S,
                                       description="seconds between full reconciliations")

    @field_validator("gitlab_base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("must be an http(s) URL such as https://gitlab.example.com/api/v4")
        try:
            port = parsed.port
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError("has a port outside 1-65535")
        if parsed.query:
            raise ValueError("must not carry a query string (the token goes in a header)")
        if parsed.fragment or value.endswith("#"):
            raise ValueError("must not carry a #fragment")
        return value.rstrip("/")

    @field_validator("artifact_store_url")
    @classmethod
    def _store(cls, value: str) -> str:
        import fsspec  # here: a start-up without an artifact store need not import it

        # Chained URLs (simplecache::s3://...) name one backend per link.
        for link in value.split("::"):
            protocol = fsspec.core.split_protocol(link)[0] or "file"
            try:
                fs_class = fsspec.get_filesystem_class(protocol)
            except ValueError:
                raise ValueError(f"unknown storage protocol {protocol}://") from None
            except ImportError as exc:
                raise ValueError(f"the {protocol}:// backend is not installed "
                                 f"({str(exc).splitlines()[0]})") from None
            if getattr(fs_class, "read_only", False) or protocol in ("http", "https"):
                raise ValueError(f"{protocol}:// is read-only; the store needs writes")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _text(cls, value: Any) -> Any:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("must be valid UTF-8") from None
            if _CONTROL_RE.search(text):
                raise ValueError("must not contain control characters (line breaks, NUL)")
        return value

    @field_validator("backfill_kinds")
    @classmethod
    def _kinds(cls, value: str) -> str:
        from gitlab_producer.objects.streams import KINDS

        unknown = sorted(set(split_list(value)) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown kind {unknown[0]!r}; kinds: {', '.join(KINDS)}")
        return value

    @property
    def object_kinds(self) -> frozenset[str]:
        """BACKFILL_KINDS as a set (every kind when empty)."""
        from gitlab_producer.objects.streams import KINDS

        return frozenset(split_list(self.backfill_kinds) or KINDS)

    @field_validator("gitlab_private_token")
    @classmethod
    def _token(cls, value: SecretStr) -> SecretStr:
        token = value.get_secret_value()
        if not token.strip():
            raise ValueError("must not be empty")
        if token != token.strip() or " " in token:
            raise ValueError("must not contain spaces (it travels in an HTTP header)")
        return value

    @field_validator("kafka_topic", "kafka_webhook_topic", "kafka_artifact_topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        # Kafka's own rule for topic names (the derived .hooks/.artifacts add 10 characters).
        if value and not _TOPIC_RE.fullmatch(value):
            raise ValueError("must be a Kafka topic name: 1-239 of a-z A-Z 0-9 . _ -")
        return value

    @field_validator("kafka_object_topic_prefix")
    @classmethod
    def _object_topic_prefix(cls, value: str) -> str:
        # <prefix>.<kind> must be a Kafka topic name (249 characters at most, the longest
        # kind ".resource_milestone_events" adding 26).
        if not _OBJECT_PREFIX_RE.fullmatch(value):
            raise ValueError("must make Kafka topic names <prefix>.<kind>: 1-223 of "
                             "a-z A-Z 0-9 . _ -")
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _brokers(cls, value: str) -> str:
        for broker in filter(None, (b.strip() for b in value.split(","))):
            host, sep, port = broker.rpartition(":")
            if "@" in broker or "/" in broker:
                raise ValueError("must list host:port pairs (credentials go in KAFKA_LOGIN and "
                                 "KAFKA_PASSWORD)")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"must list host:port pairs with a port in 1-65535, not "
                                 f"{broker!r}")
        return value

    @field_validator("metrics_url")
    @classmethod
    def _metrics_path(cls, value: str) -> str:
        if not _PATH_RE.fullmatch(value.strip("/")):
            raise ValueError("must be a URL path of letters, digits and - _ . / (e.g. metrics)")
        if ".." in value.split("/"):
            raise ValueError("must not contain '..'")
        return value

    @field_validator("sync_since", mode="before")
    @classmethod
    def _since(cls, value: Any) -> Any:
        if isinstance(value, date) and not isinstance(value, datetime):
            return datetime.combine(value, time(), UTC)
        if isinstance(value, str) and len(value.strip()) == 10:
            return datetime.combine(date.fromisoformat(value.strip()), time(), UTC)
        return value or None

    @field_validator("sync_since")
    @classmethod
    def _since_utc(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @field_validator("redis_address")
    @classmethod
    def _redis(cls, value: str) -> str:
        if value:
            if "://" in value and not value.startswith("redis://"):
                raise ValueError("must be host:port or redis://host:port")
            parsed = urlparse(value if "://" in value else f"redis://{value}")
            try:
                port = parsed.port
            except ValueError:
                port = 0
            if not parsed.hostname or not port or parsed.path.strip("/"):
                raise ValueError("must be host:port, e.g. redis:6379, with a port in 1-65535")
            if not _HOST_RE.fullmatch(parsed.hostname) and not _ipv6(parsed.hostname):
                raise ValueError("must be host:port with a host name or IP address, e.g. "
                                 "redis:6379")
        return value

    @field_validator("log_level", "kafka_compression", "kafka_sasl_mechanism",
                     "kafka_security_protocol", mode="before")
    @classmethod
    def _choice_any_case(cls, value: Any, info: ValidationInfo) -> Any:
        # LOG_LEVEL=DEBUG or KAFKA_SASL_MECHANISM=plain mean the one choice there is; any
        # other value is refused naming the choices.
        if isinstance(value, str):
            for choice in get_args(cls.model_fields[info.field_name or ""].annotation):
                if value.strip().lower() == choice.lower():
                    return choice
        return value

    @property
    def redis_endpoint(self) -> tuple[str, int, str]:
        """(host, port, password) of REDIS_ADDRESS; REDIS_PASSWORD wins over one in the URL."""
        value = self.redis_address
        parsed = urlparse(value if "://" in value else f"redis://{value}")
        password = self.redis_password.get_secret_value() or unquote(parsed.password or "")
        return parsed.hostname or "", parsed.port or 6379, password

    @model_validator(mode="after")
    def _ttl_covers_overlap(self) -> Settings:
        if self.cache_ttl * 60 <= self.sync_overlap:
            raise ValueError("CACHE_TTL: must be longer than SYNC_OVERLAP, or re-read events "
                             "would be sent twice")
        return self

    @model_validator(mode="after")
    def _marks_cover_the_sweep(self) -> Settings:
        if self.object_version_ttl < self.object_sweep_interval:
            raise ValueError("OBJECT_VERSION_TTL: must be at least OBJECT_SWEEP_INTERVAL, or a "
                             "sweep would produce unchanged objects again")
        return self

    @model_validator(mode="after")
    def _webhooks_need_a_secret(self) -> Settings:
        if self.webhook_port and not self.webhook_secret.get_secret_value():
            raise ValueError("WEBHOOK_SECRET: must be set when WEBHOOK_PORT is, or anyone "
                             "could post events")
        return self

    @model_validator(mode="after")
    def _webhook_port_of_its_own(self) -> Settings:
        for name in ("metrics_port", "log_port"):
            if self.webhook_port and self.webhook_port == getattr(self, name):
                raise ValueError(f"WEBHOOK_PORT: must differ from {name.upper()} (both are "
                                 f"{self.webhook_port})")
        return self

    @model_validator(mode="after")
    def _upload_token_long_enough(self) -> Settings:
        token = self.artifact_upload_token.get_secret_value()
        if token and len(token) < MIN_UPLOAD_TOKEN_CHARS:
            raise ValueError(f"ARTIFACT_UPLOAD_TOKEN: must be at least {MIN_UPLOAD_TOKEN_CHARS} "
                             "characters")
        return self

    @property
    def webhook_topic(self) -> str:
        return self.kafka_webhook_topic or f"{self.kafka_topic}.hooks"

    @property
    def artifact_topic(self) -> str:
        return self.kafka_artifact_topic or f"{self.kafka_topic}.artifacts"

    @property
    def instance(self) -> str:
        return self.source_instance or host_port(self.gitlab_base_url)

    def since(self, now: float) -> float:
        """Start of the very first round: SYNC_SINCE, else the start of today (UTC) at ``now``
        (GitLab's time)."""
        return self.sync_since.timestamp() if self.sync_since else utc_day_start(now)

    def redacted(self) -> dict[str, Any]:
        """The effective settings with secrets masked, under their variable names."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump(mode="json", exclude={"capture_rules"}).items():
            secret = isinstance(getattr(self, name), SecretStr)
            if secret:
                value = "***" if value else ""
            elif isinstance(value, str):
                value = mask_userinfo(value)
            out[name.upper()] = value
        out["CAPTURE_RULES"] = [rule.model_dump(mode="json") for rule in self.capture_rules]
        return out

    def secrets(self) -> list[str]:
        """Every secret value: the secret settings and the credentials inside URLs."""
        found = [getattr(self, name).get_secret_value() for name in type(self).model_fields
                 if isinstance(getattr(self, name), SecretStr)]
        for name, value in self.model_dump(mode="json").items():
            if isinstance(value, str) and name != "source_instance":
                found.extend(url_passwords(value))
        return [s for s in found if s]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the YAML file, which arrives as init arguments.
        return env_settings, init_settings


def _ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def split_list(value: str) -> list[str]:
    """A comma- or space-separated setting as its items."""
    return [part for part in re.split(r"[,\s]+", value.strip()) if part]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: is not UTF-8 text (byte {exc.start})") from None
    except yaml.MarkedYAMLError as exc:
        # Only the position: the offending line may hold a token.
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown place"
        raise ConfigError(f"config file {path}: cannot be read: invalid YAML at {where}"
                          ) from None
    except yaml.YAMLError:
        raise ConfigError(f"config file {path}: cannot be read: invalid YAML") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read: {exc.strerror or exc}"
                          ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must be a mapping of VARIABLE: value")
    known = set(Settings.model_fields)
    unknown = sorted(str(k) for k in data if str(k).lower() not in known)
    if unknown:
        raise ConfigError(f"{unknown[0].upper()}: unknown setting in {path}")
    return {str(k).lower(): v for k, v in data.items() if v is not None}


def load_settings(path: Path | None = DEFAULT_CONFIG_PATH, **overrides: Any) -> Settings:
    """Read the YAML file (``None`` or missing: none), then ``overrides``, then the
    environment."""
    values = _read_yaml(path) if path is not None else {}
    values.update(overrides)
    try:
        return Settings(**values)
    except SettingsError as exc:
        # pydantic-settings failed to parse a complex value (CAPTURE_RULES) from the
        # environment; its message names the field, the cause holds the value: not shown.
        field = re.search(r'field "(\w+)"', str(exc))
        name = field.group(1).upper() if field else "CONFIG"
        raise ConfigError(f"{name}: is not valid JSON") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]).upper() or "CONFIG"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "is required: set it in the environment or in the config file"
        if not error["loc"] and _NAMED_RE.match(message):  # a rule across settings
            raise ConfigError(message) from None
        raise ConfigError(f"{where}: {mask_userinfo(message)}") from None
