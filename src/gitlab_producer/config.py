"""Configuration: ``configs/conf.yaml`` overridden by environment variables of the same names.

Every setting is read from the environment under its upper-case name (seed 000's table:
``SCHEDULING_POLL_INTERVAL``, ``GITLAB_BASE_URL``, ...). In the YAML file the same names are
used, in either case. A bad value raises :class:`ConfigError` naming the variable.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gitlab_producer.gitlab.calendar import utc_day_start

DEFAULT_CONFIG_PATH = Path("configs/conf.yaml")
LogLevel = Literal["debug", "info", "warning", "error"]


class ArtifactRule(BaseModel):
    """Artifacts of a job to keep when that job succeeds at a captured commit."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    job: str = Field(min_length=1)


class CaptureRule(BaseModel):
    """Files and artifacts to capture when someone pushes to ``branch`` of ``project``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    project: str = Field(min_length=1, description="numeric id or full path")
    branch: str | None = Field(None, description="default: the project's default branch")
    files: tuple[str, ...] = ()
    artifacts: tuple[ArtifactRule, ...] = ()


class ConfigError(Exception):
    """An invalid or missing setting; the message is one line naming the variable."""


class Settings(BaseSettings):
    """Typed, frozen settings. Units are in the names' docs: seconds unless said otherwise."""

    model_config = SettingsConfigDict(frozen=True, case_sensitive=False, extra="forbid")

    # -- seed 000's variables (names kept exactly) ------------------------------------------
    scheduling_poll_interval: float = Field(30.0, ge=0, description="seconds between rounds")
    gitlab_base_url: str = Field(description="GitLab API URL, e.g. https://gitlab.example.com/api/v4")
    gitlab_private_token: SecretStr = Field(description="token sent in the PRIVATE-TOKEN header")
    gitlab_per_page_pagination: int = Field(100, ge=1, le=100)
    kafka_bootstrap_servers: str = Field("", description="empty: events go to OUTPUT_FILE")
    kafka_topic: str = Field("data-bus.gitlab.events", min_length=1)
    kafka_login: str = ""
    kafka_password: SecretStr = SecretStr("")
    cache_ttl: int = Field(1440, ge=1, description="minutes an event id stays marked as sent")
    operations_per_second: float = Field(10.0, gt=0, description="GitLab requests per second")
    metrics_port: int = Field(9000, ge=0, le=65535)
    metrics_url: str = "metrics"
    redis_address: str = Field("", description="host:port; empty: embedded SQLite store")
    redis_password: SecretStr = SecretStr("")
    log_port: int = Field(8002, ge=0, le=65535)
    log_level: LogLevel = "info"

    # -- additions, same style ---------------------------------------------------------------
    sync_since: datetime | None = Field(None, description="where the very first round starts")
    sync_users: bool = True
    sync_overlap: float = Field(300.0, ge=0, description="seconds re-read behind each cursor")
    project_activity_lag: float = Field(3600.0, ge=0, description="GitLab's last_activity_at lag")
    user_resync_interval: float = Field(600.0, ge=0, description="re-read of users active today")
    gitlab_concurrency: int = Field(8, ge=1, le=64, description="entities synced at once")
    gitlab_timeout: float = Field(30.0, gt=0, description="seconds per GitLab request")
    gitlab_max_retries: int = Field(6, ge=0, le=20)
    gitlab_rate_limit_retries: int = Field(30, ge=0, description="429s tolerated per request")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_security_protocol: Literal["", "PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = ""
    kafka_delivery_timeout: float = Field(300.0, gt=0, description="seconds before a send fails")
    kafka_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    redis_db: int = Field(0, ge=0)
    redis_key_prefix: str = "gitlab-producer:"
    state_path: Path = Path("var/state.sqlite3")
    output_file: str = Field("-", description="file sink path when no Kafka; '-' is stdout")
    source_instance: str = Field("", description="instance name in message headers")
    shutdown_grace: float = Field(8.0, ge=0, description="seconds to finish in-flight work")

    # -- real-time path: webhooks and captured files ------------------------------------------
    webhook_port: int = Field(0, ge=0, le=65535, description="0: no webhook receiver")
    webhook_secret: SecretStr = SecretStr("")
    webhook_signing_token: SecretStr = SecretStr("")
    webhook_max_body: int = Field(25 * 1024 * 1024, ge=1024)
    webhook_max_skew: float = Field(300.0, gt=0, description="seconds a signature stays valid")
    kafka_webhook_topic: str = Field("", description="default: <KAFKA_TOPIC>.hooks")
    kafka_artifact_topic: str = Field("", description="default: <KAFKA_TOPIC>.artifacts")
    artifact_store_url: str = "file://var/artifacts"
    capture_rules: tuple[CaptureRule, ...] = ()

    @field_validator("gitlab_base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("must be an http(s) URL such as https://gitlab.example.com/api/v4")
        if parsed.query:
            raise ValueError("must not carry a query string (the token goes in a header)")
        return value.rstrip("/")

    @field_validator("gitlab_private_token")
    @classmethod
    def _token(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
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
            host, _, port = value.removeprefix("redis://").rpartition(":")
            if not host or not port.isdigit():
                raise ValueError("must be host:port, e.g. redis:6379")
        return value

    @model_validator(mode="after")
    def _ttl_covers_overlap(self) -> Settings:
        if self.cache_ttl * 60 <= self.sync_overlap:
            raise ValueError("CACHE_TTL: must be longer than SYNC_OVERLAP, or re-read events "
                             "would be sent twice")
        return self

    @model_validator(mode="after")
    def _webhooks_need_a_secret(self) -> Settings:
        if self.webhook_port and not self.webhook_secret.get_secret_value():
            raise ValueError("WEBHOOK_SECRET: must be set when WEBHOOK_PORT is, or anyone "
                             "could post events")
        return self

    @property
    def webhook_topic(self) -> str:
        return self.kafka_webhook_topic or f"{self.kafka_topic}.hooks"

    @property
    def artifact_topic(self) -> str:
        return self.kafka_artifact_topic or f"{self.kafka_topic}.artifacts"

    @property
    def instance(self) -> str:
        return self.source_instance or urlparse(self.gitlab_base_url).netloc

    def since(self, now: float) -> float:
        """Start of the very first round: SYNC_SINCE, else the start of today (UTC) at ``now``
        (GitLab's time)."""
        return self.sync_since.timestamp() if self.sync_since else utc_day_start(now)

    def redacted(self) -> dict[str, Any]:
        """The effective settings with secrets masked, under their variable names."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump(mode="json", exclude={"capture_rules"}).items():
            secret = isinstance(getattr(self, name), SecretStr)
            out[name.upper()] = ("***" if value else "") if secret else value
        out["CAPTURE_RULES"] = [rule.model_dump(mode="json") for rule in self.capture_rules]
        return out

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


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path}: cannot be read: {exc}".replace("\n", " ")) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must be a mapping of VARIABLE: value")
    known = set(Settings.model_fields)
    unknown = sorted(k for k in data if str(k).lower() not in known)
    if unknown:
        raise ConfigError(f"{str(unknown[0]).upper()}: unknown setting in {path}")
    return {str(k).lower(): v for k, v in data.items() if v is not None}


def load_settings(path: Path | None = DEFAULT_CONFIG_PATH, **overrides: Any) -> Settings:
    """Read the YAML file (``None``: none), then ``overrides``, then the environment."""
    values = _read_yaml(path) if path is not None else {}
    values.update(overrides)
    try:
        return Settings(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]).upper() or "CONFIG"
        message = str(error["msg"]).removeprefix("Value error, ")
        if message.startswith(("CACHE_TTL:", "WEBHOOK_SECRET:")):
            raise ConfigError(message) from exc
        raise ConfigError(f"{where}: {message}") from exc
