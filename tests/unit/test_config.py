"""Configuration: YAML defaults, environment overrides under seed 000's names, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gitlab_producer.config import ConfigError, load_settings
from gitlab_producer.sinks.kafka import kafka_config

SEED_000_NAMES = (
    "SCHEDULING_POLL_INTERVAL", "GITLAB_BASE_URL", "GITLAB_PRIVATE_TOKEN",
    "GITLAB_PER_PAGE_PAGINATION", "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPIC", "KAFKA_LOGIN",
    "KAFKA_PASSWORD", "CACHE_TTL", "OPERATIONS_PER_SECOND", "METRICS_PORT", "METRICS_URL",
    "REDIS_ADDRESS", "REDIS_PASSWORD", "LOG_PORT", "LOG_LEVEL")

REQUIRED = {"gitlab_base_url": "https://gitlab.test/api/v4", "gitlab_private_token": "t0ken"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf.yaml"
    path.write_text(text)
    return path


def test_the_shipped_config_file_loads() -> None:
    settings = load_settings(Path(__file__).parents[2] / "configs" / "conf.yaml")
    assert settings.gitlab_per_page_pagination == 100
    assert settings.redacted()["GITLAB_PRIVATE_TOKEN"] == "***"


def test_every_seed_variable_overrides_the_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "GITLAB_BASE_URL: https://file.test/api/v4\n"
                           "GITLAB_PRIVATE_TOKEN: from-file\nOPERATIONS_PER_SECOND: 1\n")
    values = {"SCHEDULING_POLL_INTERVAL": "7", "GITLAB_BASE_URL": "https://env.test/api/v4",
              "GITLAB_PRIVATE_TOKEN": "from-env", "GITLAB_PER_PAGE_PAGINATION": "10",
              "KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9092", "KAFKA_TOPIC": "t",
              "KAFKA_LOGIN": "user", "KAFKA_PASSWORD": "pass", "CACHE_TTL": "60",
              "OPERATIONS_PER_SECOND": "3", "METRICS_PORT": "9100", "METRICS_URL": "m",
              "REDIS_ADDRESS": "redis:6379", "REDIS_PASSWORD": "pw", "LOG_PORT": "8003",
              "LOG_LEVEL": "debug"}
    assert set(values) == set(SEED_000_NAMES)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    s = load_settings(path)
    assert (s.scheduling_poll_interval, s.gitlab_base_url, s.gitlab_per_page_pagination) == (
        7, "https://env.test/api/v4", 10)
    assert s.gitlab_private_token.get_secret_value() == "from-env"
    assert (s.kafka_bootstrap_servers, s.kafka_topic, s.kafka_login) == ("k1:9092,k2:9092", "t",
                                                                         "user")
    assert (s.cache_ttl, s.operations_per_second, s.metrics_port, s.metrics_url) == (
        60, 3, 9100, "m")
    assert (s.redis_address, s.log_port, s.log_level) == ("redis:6379", 8003, "debug")
    assert s.redis_password.get_secret_value() == "pw"


@pytest.mark.parametrize("field,value,named", [
    ("gitlab_per_page_pagination", 101, "GITLAB_PER_PAGE_PAGINATION"),
    ("gitlab_base_url", "gitlab.test", "GITLAB_BASE_URL"),
    ("gitlab_base_url", "https://g.test/api/v4?private_token=x", "GITLAB_BASE_URL"),
    ("operations_per_second", 0, "OPERATIONS_PER_SECOND"),
    ("log_level", "loud", "LOG_LEVEL"),
    ("cache_ttl", 1, "CACHE_TTL"),  # one minute is shorter than the 300 s overlap
    ("redis_address", "redis", "REDIS_ADDRESS"),
    ("object_sweep_interval", -1, "OBJECT_SWEEP_INTERVAL"),
    # Version marks must outlive the sweep interval, or a sweep produces unchanged objects.
    ("object_sweep_interval", 91 * 86_400, "OBJECT_VERSION_TTL"),
    ("sync_objects", "maybe", "SYNC_OBJECTS"),
    # <prefix>.<kind> must be a legal topic name (else every object send fails at run time).
    ("kafka_object_topic_prefix", "bad/topic", "KAFKA_OBJECT_TOPIC_PREFIX"),
    ("kafka_object_topic_prefix", "x" * 224, "KAFKA_OBJECT_TOPIC_PREFIX"),
])
def test_bad_values_name_their_variable(field: str, value: object, named: str) -> None:
    with pytest.raises(ConfigError, match=f"^{named}: ") as caught:  # first, and only it
        load_settings(None, **{**REQUIRED, field: value})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("address", ["redis host:6379", "redis\\x:6379", "redis;x:6379"])
def test_a_redis_host_must_be_a_host_name(address: str) -> None:
    with pytest.raises(ConfigError, match=r"^REDIS_ADDRESS: "):
        load_settings(None, **REQUIRED, redis_address=address)


@pytest.mark.parametrize("address", ["redis:6379", "redis-0.redis.svc:6380", "[::1]:6379",
                                     "redis://:pw@10.0.0.1:6379", "redis_1:6379"])
def test_redis_hosts_that_are_fine(address: str) -> None:
    assert load_settings(None, **REQUIRED, redis_address=address).redis_address == address


def test_choices_are_taken_in_any_case() -> None:
    s = load_settings(None, **REQUIRED, log_level="DEBUG", kafka_compression="Zstd",
                      kafka_sasl_mechanism="scram-sha-512", kafka_security_protocol="sasl_ssl")
    assert (s.log_level, s.kafka_compression, s.kafka_sasl_mechanism,
            s.kafka_security_protocol) == ("debug", "zstd", "SCRAM-SHA-512", "SASL_SSL")
    with pytest.raises(ConfigError, match=r"^LOG_LEVEL: .*'debug'"):
        load_settings(None, **REQUIRED, log_level="verbose")


def test_a_missing_required_setting_says_where_to_set_it() -> None:
    with pytest.raises(ConfigError, match=r"^GITLAB_PRIVATE_TOKEN: is required"):
        load_settings(None, gitlab_base_url="https://gitlab.test/api/v4")


@pytest.mark.parametrize("other", ["metrics_port", "log_port"])
def test_the_webhook_port_is_its_own(other: str) -> None:
    with pytest.raises(ConfigError, match=f"^WEBHOOK_PORT: must differ from {other.upper()}"):
        load_settings(None, **REQUIRED, webhook_port=9100, webhook_secret="s", **{other: 9100})
    same = load_settings(None, **REQUIRED, metrics_port=9100, log_port=9100)  # one server
    assert same.metrics_port == same.log_port


def test_unknown_keys_in_the_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GITLAB_URL: unknown setting"):
        load_settings(write(tmp_path, "GITLAB_URL: x\n"))


def test_broken_yaml_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read") as caught:
        load_settings(write(tmp_path, "a: [unclosed\n"))
    assert "\n" not in str(caught.value)


def test_object_sync_is_off_by_default_and_sweeps_daily() -> None:
    s = load_settings(None, **REQUIRED)
    assert (s.sync_objects, s.object_sweep_interval) == (False, 86_400)
    every_round = load_settings(None, **REQUIRED, sync_objects="true", object_sweep_interval=0)
    assert (every_round.sync_objects, every_round.object_sweep_interval) == (True, 0)


def test_sync_since_accepts_dates_and_times() -> None:
    day = load_settings(None, **REQUIRED, sync_since="2026-03-01")
    assert day.sync_since is not None and day.sync_since.isoformat() == "2026-03-01T00:00:00+00:00"
    moment = load_settings(None, **REQUIRED, sync_since="2026-03-01T10:30:00")
    assert moment.sync_since is not None and moment.sync_since.hour == 10


def test_kafka_client_configuration_plain_and_sasl() -> None:
    plain = kafka_config(load_settings(None, **REQUIRED, kafka_bootstrap_servers="k:9092"))
    assert plain["enable.idempotence"] is True and plain["acks"] == "all"
    assert "sasl.mechanism" not in plain and "security.protocol" not in plain
    for mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        sasl = kafka_config(load_settings(
            None, **REQUIRED, kafka_bootstrap_servers="k:9092", kafka_login="u",
            kafka_password="p", kafka_sasl_mechanism=mechanism))
        assert (sasl["sasl.mechanism"], sasl["sasl.username"], sasl["sasl.password"]) == (
            mechanism, "u", "p")
        assert sasl["security.protocol"] == "SASL_SSL"
    local = kafka_config(load_settings(None, **REQUIRED, kafka_bootstrap_servers="k:9092",
                                       kafka_login="u", kafka_security_protocol="SASL_PLAINTEXT"))
    assert local["security.protocol"] == "SASL_PLAINTEXT"


def test_the_config_librdkafka_accepts() -> None:
    from confluent_kafka import Producer

    settings = load_settings(None, **REQUIRED, kafka_bootstrap_servers="127.0.0.1:1",
                             kafka_login="u", kafka_password="p",
                             kafka_sasl_mechanism="SCRAM-SHA-512",
                             kafka_security_protocol="SASL_PLAINTEXT")
    Producer(kafka_config(settings)).flush(0)  # raises on any key librdkafka does not know
